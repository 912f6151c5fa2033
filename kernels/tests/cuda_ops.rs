//! Every CUDA op against the CPU backend (see `kernels::cuda::check`). Needs a GPU:
//! `cargo test -p kernels --test cuda_ops -- --ignored --nocapture`.

use kernels::cuda::check;
use kernels::Cuda;

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_ops_match_cpu() {
    let cuda = Cuda::new(0).expect("a CUDA GPU");
    println!("device: {}", cuda.describe());
    let (seed, res) = check::run_all(&cuda, false);
    println!("seed {seed}\n{}", check::table(&res));
    let failed: Vec<_> =
        res.iter().filter(|r| !r.passed).map(|r| format!("{} {} {}", r.op, r.size, r.output)).collect();
    assert!(failed.is_empty(), "{} of {} checks failed: {failed:#?}", failed.len(), res.len());
}

fn assert_all_pass(what: &str, seed: u64, res: &[check::CheckResult]) {
    println!("{what}: seed {seed}\n{}", check::table(res));
    let failed: Vec<_> =
        res.iter().filter(|r| !r.passed).map(|r| format!("{} {} {}", r.op, r.size, r.output)).collect();
    assert!(failed.is_empty(), "{} of {} checks failed: {failed:#?}", failed.len(), res.len());
}

/// Attention at head dimensions 32, 64 and 128 (t = 50, 77, 130, ..., causal and not).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_attention_every_head_dim() {
    let cuda = Cuda::new(0).expect("a CUDA GPU");
    let (seed, res) = check::run_attention(&cuda, false);
    assert_all_pass("attention", seed, &res);
}

/// InfoNCE at widths 64, 96, 128, 512, 768, 1000 and 1024.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_infonce_every_width() {
    let cuda = Cuda::new(0).expect("a CUDA GPU");
    let (seed, res) = check::run_infonce(&cuda, false);
    assert_all_pass("infonce", seed, &res);
}
