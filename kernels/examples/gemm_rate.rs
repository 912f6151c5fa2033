//! Matrix-product rate of the CPU backend's `linear` at the shapes of a CLIP step, with a
//! large square product as the machine's ceiling in the same run.
//! `cargo run --release -p kernels --example gemm_rate`

use std::time::Instant;

use kernels::cpu::linear;

fn rate(n: usize, c: usize, oc: usize, reps: usize) -> (f64, f64) {
    let inp: Vec<f32> = (0..n * c).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let w: Vec<f32> = (0..oc * c).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let dout: Vec<f32> = (0..n * oc).map(|i| ((i * 31) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut out = vec![0.0; n * oc];
    let mut dinp = vec![0.0; n * c];
    let mut dw = vec![0.0; oc * c];
    linear::fwd(&mut out, &inp, &w, None, n, c, oc);
    let flops = 2.0 * (n * c * oc) as f64;
    let t = Instant::now();
    for _ in 0..reps {
        linear::fwd(&mut out, &inp, &w, None, n, c, oc);
    }
    let f = flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9;
    let t = Instant::now();
    for _ in 0..reps {
        linear::bwd(Some(&mut dinp), Some(&mut dw), None, &dout, &inp, &w, n, c, oc);
    }
    let b = 2.0 * flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9;
    (f, b)
}

fn main() {
    println!("{:>22} {:>10} {:>10}", "n x c -> oc", "fwd GF/s", "bwd GF/s");
    for &(n, c, oc) in &[(2048, 2048, 2048), (4928, 256, 768), (4928, 256, 1024), (4928, 1024, 256), (4160, 256, 256)] {
        let (f, b) = rate(n, c, oc, 5);
        println!("{:>22} {f:>10.1} {b:>10.1}", format!("{n} x {c} -> {oc}"));
    }
}
