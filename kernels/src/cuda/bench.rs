//! `coordinator bench kernels`: the fused kernels against their unfused baselines in the same
//! run, with the machine's own ceilings (a large bf16 matrix product through cuBLASLt and a
//! large device copy) measured first, so that every figure comes with its floor.
//!
//! Times are CUDA-event medians after warm-up, over input sets rotated so that their total
//! exceeds the L2 cache; peak memory is the caching allocator's peak above what the inputs
//! hold. **Not yet run on a GPU** (written in a session without one).

use std::time::Instant;

use anyhow::{bail, Result};

use super::blas::Operand;
use super::check::Rng;
use super::{Cuda, TensorArgs};
use crate::backend::{Backend, DType, InfoNceDims};
use crate::cpu::Cpu;
use crate::tensor::Tensor;

/// One measured line.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub op: String,
    pub variant: String,
    pub size: String,
    pub ms: f64,
    pub tflops: f64,
    pub gbs: f64,
    /// The larger of FLOPs over the measured matrix rate and bytes over the measured bandwidth.
    pub floor_ms: f64,
    pub peak_bytes: usize,
    pub note: String,
}

/// The ops `bench kernels --op` takes.
pub const OPS: [&str; 3] = ["attention", "infonce", "ceilings"];

const WARMUP: usize = 3;

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] as f64
}

fn random<B: Backend>(be: &B, rng: &mut Rng, n: usize, scale: f32, dt: DType) -> Result<Tensor<B>> {
    let t = be.alloc(n, dt)?;
    be.upload_f32(&t, &rng.vec(n, scale))?;
    Ok(t)
}

struct Ceil {
    tflops: f64,
    gbs: f64,
}

impl Cuda {
    /// Median event time of `f` over `reps` runs after warm-up; `f(k)` runs with input set k.
    fn time_median(&self, reps: usize, mut f: impl FnMut(usize)) -> Result<f64> {
        for k in 0..WARMUP {
            f(k);
        }
        let mut times = Vec::with_capacity(reps);
        for k in 0..reps {
            times.push(self.time_ms(|| f(k))?);
        }
        Ok(median(times))
    }

    /// Row-major `Z[m, n] = alpha op(A)[m, k] . op(B)[k, n]`, `op` transposing a matrix stored
    /// `[k, m]` (A) or `[n, k]` (B) when `ta` / `tb`; `batch` products of consecutive matrices.
    /// cuBLASLt is column-major: a row-major `[r, c]` matrix is a column-major `[c, r]` one, so
    /// this computes `Z^T[n, m] = op(B)^T . op(A)^T` with B first.
    #[allow(clippy::too_many_arguments)]
    fn mm(
        &self,
        a: &Tensor<Cuda>,
        ta: bool,
        b: &Tensor<Cuda>,
        tb: bool,
        z: &Tensor<Cuda>,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        batch: usize,
    ) -> Result<()> {
        // Each operand as stored (column-major rows x cols, leading dimension = rows).
        let (br, bc) = if tb { (k, n) } else { (n, k) };
        let (ar, ac) = if ta { (m, k) } else { (k, m) };
        let first = Operand {
            ptr: super::dptr(b),
            dtype: b.dtype(),
            rows: br as u64,
            cols: bc as u64,
            ld: br as i64,
            trans: tb,
        };
        let second = Operand {
            ptr: super::dptr(a),
            dtype: a.dtype(),
            rows: ar as u64,
            cols: ac as u64,
            ld: ar as i64,
            trans: ta,
        };
        let bt = (batch > 1).then_some((batch as i32, (k * n) as i64, (m * k) as i64, (m * n) as i64));
        self.blas.matmul_batched(
            self.dev.stream.0 as _,
            self.blas_workspace,
            first,
            second,
            (super::dptr(z), z.dtype(), n as i64),
            n as u64,
            m as u64,
            alpha,
            0.0,
            bt,
        )
    }

    /// `Z[r1, r2] = alpha X[r1, d] . Y[r2, d]^T`.
    #[allow(clippy::too_many_arguments)]
    fn abt(
        &self,
        x: &Tensor<Cuda>,
        y: &Tensor<Cuda>,
        z: &Tensor<Cuda>,
        r1: usize,
        r2: usize,
        d: usize,
        alpha: f32,
        batch: usize,
    ) -> Result<()> {
        self.mm(x, false, y, true, z, (r1, r2, d), alpha, batch)
    }

    /// `Z[r1, d] = alpha P[r1, r2] . V[r2, d]`.
    #[allow(clippy::too_many_arguments)]
    fn ab(
        &self,
        p: &Tensor<Cuda>,
        v: &Tensor<Cuda>,
        z: &Tensor<Cuda>,
        r1: usize,
        r2: usize,
        d: usize,
        alpha: f32,
        batch: usize,
    ) -> Result<()> {
        self.mm(p, false, v, false, z, (r1, d, r2), alpha, batch)
    }

    /// `Z[r2, d] = alpha P[r1, r2]^T . X[r1, d]`.
    #[allow(clippy::too_many_arguments)]
    fn atb(
        &self,
        p: &Tensor<Cuda>,
        x: &Tensor<Cuda>,
        z: &Tensor<Cuda>,
        r1: usize,
        r2: usize,
        d: usize,
        alpha: f32,
        batch: usize,
    ) -> Result<()> {
        self.mm(p, true, x, false, z, (r2, d, r1), alpha, batch)
    }

    #[allow(clippy::too_many_arguments)]
    fn softmax_rows(
        &self,
        x: &Tensor<Cuda>,
        lse: Option<&Tensor<Cuda>>,
        rows: usize,
        cols: usize,
        scale: f32,
        causal: bool,
        t: usize,
    ) {
        self.launch(
            "softmax_rows",
            (rows.div_ceil(8) as u32, 1, 1),
            256,
            0,
            super::Args::new()
                .t(x)
                .ptr(lse.map(super::dptr).unwrap_or(0))
                .i64(rows as i64)
                .i32(cols as i32)
                .f32(scale)
                .i32(causal as i32)
                .i32(t as i32),
        );
    }

    fn peak_above(&self, base: usize) -> usize {
        self.memory_stats().2.saturating_sub(base)
    }

    fn ceilings(&self, rows: &mut Vec<BenchRow>, quick: bool) -> Result<Ceil> {
        let mut rng = Rng::from_clock();
        let n = if quick { 4096 } else { 8192 };
        let a = random(self, &mut rng, n * n, 1.0, DType::Bf16)?;
        let b = random(self, &mut rng, n * n, 1.0, DType::Bf16)?;
        let c = self.alloc(n * n, DType::Bf16)?;
        let ms = self.time_median(10, |_| self.run(self.abt(&a, &b, &c, n, n, n, 1.0, 1)))?;
        let tflops = 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12;
        rows.push(BenchRow {
            op: "ceiling".into(),
            variant: "cuBLASLt bf16".into(),
            size: format!("{n}x{n}x{n}"),
            ms,
            tflops,
            gbs: 0.0,
            floor_ms: ms,
            peak_bytes: 0,
            note: "matrix rate on random data".into(),
        });
        let len = if quick { 64 << 20 } else { 256 << 20 };
        let src = random(self, &mut rng, len, 1.0, DType::F32)?;
        let dst = self.alloc(len, DType::F32)?;
        let ms = self.time_median(10, |_| self.copy(&dst, &src))?;
        let gbs = (len * 8) as f64 / (ms * 1e-3) / 1e9;
        rows.push(BenchRow {
            op: "ceiling".into(),
            variant: "copy".into(),
            size: format!("{} MiB", (len * 4) >> 20),
            ms,
            tflops: 0.0,
            gbs,
            floor_ms: ms,
            peak_bytes: 0,
            note: "bytes read + written".into(),
        });
        Ok(Ceil { tflops, gbs })
    }

    fn bench_attention(&self, rows: &mut Vec<BenchRow>, ceil: &Ceil, quick: bool) -> Result<()> {
        let sizes: &[(usize, usize, usize, bool)] = if quick {
            &[(16, 12, 197, false), (96, 8, 77, true)]
        } else {
            &[(128, 12, 197, false), (768, 8, 77, true)]
        };
        let mut rng = Rng::from_clock();
        let hd = 64;
        for &(b, h, t, causal) in sizes {
            let bh = b * h;
            let size = format!("{bh}x{t}x{hd}{}", if causal { " causal" } else { "" });
            let frac = if causal { 0.5 } else { 1.0 };
            let flops = 12.0 * (bh * t * t * hd) as f64 * frac;
            let elems = bh * t * hd;
            let bytes = (8 * elems * 2) as f64;
            let floor = (flops / (ceil.tflops * 1e12)).max(bytes / (ceil.gbs * 1e9)) * 1e3;
            let sets = (120usize << 20).div_ceil(3 * elems * 2).clamp(1, 4);
            // Fused: forward + backward through the Backend ops.
            self.dev.release_scratch()?;
            let base = self.memory_stats().0;
            self.reset_peak_memory();
            let mut ins = Vec::new();
            for _ in 0..sets {
                ins.push(random(self, &mut rng, 3 * elems, 1.0, DType::Bf16)?);
            }
            let out = self.alloc(elems, DType::Bf16)?;
            let saved = self.alloc(self.attention_saved_len(b, t, h), DType::F32)?;
            let dout = random(self, &mut rng, elems, 1.0, DType::Bf16)?;
            let dqkv = self.alloc(3 * elems, DType::Bf16)?;
            let inputs = self.memory_stats().0 - base;
            self.reset_peak_memory();
            let ms = self.time_median(20, |k| {
                let q = &ins[k % sets];
                self.attention_fwd(&out, &saved, q, b, t, h, hd, causal);
                self.attention_bwd(&dqkv, &dout, q, &out, &saved, b, t, h, hd, causal);
            })?;
            let peak = self.peak_above(base + inputs);
            rows.push(row("attention", "fused fwd+bwd", &size, ms, flops, bytes, floor, peak, ""));
            drop((ins, out, saved, dout, dqkv));

            // Unfused: cuBLASLt Q K^T, softmax over the stored scores, P V; and the backward.
            self.dev.release_scratch()?;
            let base = self.memory_stats().0;
            let mut qs = Vec::new();
            for _ in 0..sets {
                let q = random(self, &mut rng, elems, 1.0, DType::Bf16)?;
                let k = random(self, &mut rng, elems, 1.0, DType::Bf16)?;
                let v = random(self, &mut rng, elems, 1.0, DType::Bf16)?;
                qs.push((q, k, v));
            }
            let (o, dout) = (self.alloc(elems, DType::Bf16)?, random(self, &mut rng, elems, 1.0, DType::Bf16)?);
            let (dq, dk, dv) =
                (self.alloc(elems, DType::Bf16)?, self.alloc(elems, DType::Bf16)?, self.alloc(elems, DType::Bf16)?);
            let inputs = self.memory_stats().0 - base;
            self.reset_peak_memory();
            let s = self.alloc(bh * t * t, DType::Bf16)?;
            let dp = self.alloc(bh * t * t, DType::Bf16)?;
            let scale = 1.0 / (hd as f32).sqrt();
            let ms = self.time_median(20, |i| {
                let (q, k, v) = &qs[i % sets];
                let r = (|| {
                    self.abt(q, k, &s, t, t, hd, 1.0, bh)?;
                    self.softmax_rows(&s, None, bh * t, t, scale, causal, t);
                    self.ab(&s, v, &o, t, t, hd, 1.0, bh)?;
                    self.atb(&s, &dout, &dv, t, t, hd, 1.0, bh)?;
                    self.abt(&dout, v, &dp, t, t, hd, 1.0, bh)?;
                    self.launch(
                        "softmax_rows_bwd",
                        ((bh * t).div_ceil(8) as u32, 1, 1),
                        256,
                        0,
                        super::Args::new()
                            .ptr(super::dptr(&dp))
                            .i32(1)
                            .ptr(super::dptr(&s))
                            .i32(1)
                            .i64((bh * t) as i64)
                            .i32(t as i32)
                            .f32(scale),
                    );
                    self.ab(&dp, k, &dq, t, t, hd, 1.0, bh)?;
                    self.atb(&dp, q, &dk, t, t, hd, 1.0, bh)
                })();
                self.run(r);
            })?;
            let peak = self.peak_above(base + inputs);
            let ubytes = bytes + (6 * bh * t * t * 2) as f64;
            rows.push(row(
                "attention",
                "unfused (cuBLASLt + softmax)",
                &size,
                ms,
                flops,
                ubytes,
                floor,
                peak,
                "baseline",
            ));
        }
        Ok(())
    }

    fn bench_infonce(&self, rows: &mut Vec<BenchRow>, ceil: &Ceil, quick: bool) -> Result<()> {
        let (local, dim) = (2048usize, 512usize);
        let globals: &[usize] = if quick { &[16_384] } else { &[16_384, 65_536, 262_144] };
        let mut rng = Rng::from_clock();
        for &global in globals {
            let size = format!("B_local={local} B_global={global} D={dim}");
            let flops = 12.0 * (local * global * dim) as f64;
            let bytes = (2 * (local + global) * dim * (2 + 4)) as f64;
            let floor = (flops / (ceil.tflops * 1e12)).max(bytes / (ceil.gbs * 1e9)) * 1e3;
            let sets = (120usize << 20).div_ceil(2 * global * dim * 2).clamp(1, 3);
            let dims = InfoNceDims { local, global, dim, offset: global / 2 };
            let ls = (1.0f32 / 0.07).ln();

            self.dev.release_scratch()?;
            let base = self.memory_stats().0;
            let mut feats = Vec::new();
            for _ in 0..sets {
                let ai = random(self, &mut rng, global * dim, 0.05, DType::Bf16)?;
                let at = random(self, &mut rng, global * dim, 0.05, DType::Bf16)?;
                let i = ai.slice(dims.offset * dim, local * dim);
                let t = at.slice(dims.offset * dim, local * dim);
                feats.push((ai, at, i, t));
            }
            let scale = self.alloc(1, DType::F32)?;
            self.upload_f32(&scale, &[ls])?;
            let (loss, li, lt) =
                (self.alloc(1, DType::F32)?, self.alloc(local, DType::F32)?, self.alloc(local, DType::F32)?);
            let (di, dt) = (self.alloc(local * dim, DType::F32)?, self.alloc(local * dim, DType::F32)?);
            let (dai, dat) = (self.alloc(global * dim, DType::F32)?, self.alloc(global * dim, DType::F32)?);
            let dls = self.alloc(1, DType::F32)?;
            let inputs = self.memory_stats().0 - base;
            self.reset_peak_memory();
            let ms = self.time_median(10, |k| {
                let (ai, at, i, t) = &feats[k % sets];
                self.infonce_fwd(&loss, &li, &lt, i, t, ai, at, &scale, dims);
                self.infonce_bwd(&di, &dt, &dai, &dat, Some(&dls), 1.0, i, t, ai, at, &scale, &li, &lt, dims);
            })?;
            let fused_peak = self.peak_above(base + inputs);
            rows.push(row("infonce", "fused fwd+bwd", &size, ms, flops, bytes, floor, fused_peak, ""));

            // Unfused: the logits of each direction materialised in f32, softmax, G, two products.
            self.dev.release_scratch()?;
            self.reset_peak_memory();
            let z = self.alloc(local * global, DType::F32)?;
            let zb = self.alloc(local * global, DType::Bf16)?;
            let lse = self.alloc(local, DType::F32)?;
            let s = ls.exp();
            let coef = 1.0 / (2.0 * global as f32);
            let ms = self.time_median(10, |k| {
                let (ai, at, i, t) = &feats[k % sets];
                for (x, y, dx, dy) in [(i, at, &di, &dat), (t, ai, &dt, &dai)] {
                    let r = (|| {
                        self.abt(x, y, &z, local, global, dim, s, 1)?;
                        self.softmax_rows(&z, Some(&lse), local, global, 1.0, false, global);
                        self.launch(
                            "infonce_baseline_grad",
                            (((local * global).div_ceil(256)).min(65_535) as u32, 1, 1),
                            256,
                            0,
                            super::Args::new()
                                .ptr(super::dptr(&z))
                                .i32(0)
                                .i64(local as i64)
                                .i64(global as i64)
                                .i64(dims.offset as i64)
                                .f32(coef),
                        );
                        // G in bf16 for the two products with the bf16 features (as autocast would).
                        self.copy(&zb, &z);
                        self.ab(&zb, y, dx, local, global, dim, s, 1)?;
                        self.atb(&zb, x, dy, local, global, dim, s, 1)
                    })();
                    self.run(r);
                }
            })?;
            let peak = self.peak_above(base + inputs);
            let ubytes = bytes + (local * global * 2 * (4 * 4 + 2 * 2)) as f64;
            let note = format!("fused peak = {:.2}% of this", 100.0 * fused_peak as f64 / peak.max(1) as f64);
            rows.push(row("infonce", "unfused (materialised logits)", &size, ms, flops, ubytes, floor, peak, &note));
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn row(
    op: &str,
    variant: &str,
    size: &str,
    ms: f64,
    flops: f64,
    bytes: f64,
    floor: f64,
    peak: usize,
    note: &str,
) -> BenchRow {
    BenchRow {
        op: op.into(),
        variant: variant.into(),
        size: size.into(),
        ms,
        tflops: flops / (ms * 1e-3) / 1e12,
        gbs: bytes / (ms * 1e-3) / 1e9,
        floor_ms: floor,
        peak_bytes: peak,
        note: note.into(),
    }
}

/// Runs the CUDA kernel bench: the ceilings first, then `op` (or every op).
pub fn run_cuda(cuda: &Cuda, op: Option<&str>, quick: bool) -> Result<Vec<BenchRow>> {
    if let Some(o) = op {
        if !OPS.contains(&o) {
            bail!("unknown op {o:?}; ops: {}", OPS.join(", "));
        }
    }
    let mut rows = Vec::new();
    let ceil = cuda.ceilings(&mut rows, quick)?;
    if op.is_none_or(|o| o == "attention") {
        cuda.bench_attention(&mut rows, &ceil, quick)?;
    }
    if op.is_none_or(|o| o == "infonce") {
        cuda.bench_infonce(&mut rows, &ceil, quick)?;
    }
    cuda.synchronize()?;
    Ok(rows)
}

/// The same fused ops on the CPU backend (host clock, median of a few runs), at sizes a CPU
/// finishes in seconds; there is no unfused baseline or ceiling on the CPU.
pub fn run_cpu(op: Option<&str>) -> Result<Vec<BenchRow>> {
    let be = Cpu;
    let mut rng = Rng::from_clock();
    let mut rows = Vec::new();
    let time = |f: &mut dyn FnMut()| {
        f();
        let mut v = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            f();
            v.push(t0.elapsed().as_secs_f32() * 1e3);
        }
        median(v)
    };
    if op.is_none_or(|o| o == "attention") {
        let (b, h, t, hd) = (8, 12, 197, 64);
        let elems = b * h * t * hd;
        let q = random(&be, &mut rng, 3 * elems, 1.0, DType::F32)?;
        let out = be.alloc(elems, DType::F32)?;
        let saved = be.alloc(be.attention_saved_len(b, t, h), DType::F32)?;
        let dout = random(&be, &mut rng, elems, 1.0, DType::F32)?;
        let dq = be.alloc(3 * elems, DType::F32)?;
        let ms = time(&mut || {
            be.attention_fwd(&out, &saved, &q, b, t, h, hd, false);
            be.attention_bwd(&dq, &dout, &q, &out, &saved, b, t, h, hd, false);
        });
        let flops = 12.0 * (b * h * t * t * hd) as f64;
        rows.push(row(
            "attention",
            "cpu fwd+bwd",
            &format!("{}x{t}x{hd}", b * h),
            ms,
            flops,
            0.0,
            0.0,
            0,
            "host clock",
        ));
    }
    if op.is_none_or(|o| o == "infonce") {
        let (local, global, dim) = (256, 2048, 512);
        let dims = InfoNceDims { local, global, dim, offset: 0 };
        let ai = random(&be, &mut rng, global * dim, 0.05, DType::F32)?;
        let at = random(&be, &mut rng, global * dim, 0.05, DType::F32)?;
        let (i, t) = (ai.slice(0, local * dim), at.slice(0, local * dim));
        let scale = be.alloc(1, DType::F32)?;
        be.upload_f32(&scale, &[2.659])?;
        let (loss, li, lt) = (be.alloc(1, DType::F32)?, be.alloc(local, DType::F32)?, be.alloc(local, DType::F32)?);
        let (di, dt) = (be.alloc(local * dim, DType::F32)?, be.alloc(local * dim, DType::F32)?);
        let (dai, dat) = (be.alloc(global * dim, DType::F32)?, be.alloc(global * dim, DType::F32)?);
        let ms = time(&mut || {
            be.infonce_fwd(&loss, &li, &lt, &i, &t, &ai, &at, &scale, dims);
            be.infonce_bwd(&di, &dt, &dai, &dat, None, 1.0, &i, &t, &ai, &at, &scale, &li, &lt, dims);
        });
        let flops = 12.0 * (local * global * dim) as f64;
        rows.push(row(
            "infonce",
            "cpu fwd+bwd",
            &format!("B_local={local} B_global={global} D={dim}"),
            ms,
            flops,
            0.0,
            0.0,
            0,
            "host clock",
        ));
    }
    Ok(rows)
}

/// The rows as a fixed-width table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:<10} {:<30} {:<38} {:>10} {:>9} {:>9} {:>10} {:>11}  note\n",
        "op", "variant", "size", "ms", "TFLOP/s", "GB/s", "floor ms", "peak MiB"
    );
    for r in rows {
        s += &format!(
            "{:<10} {:<30} {:<38} {:>10.3} {:>9.3} {:>9.1} {:>10.3} {:>11.1}  {}\n",
            r.op,
            r.variant,
            r.size,
            r.ms,
            r.tflops,
            r.gbs,
            r.floor_ms,
            r.peak_bytes as f64 / (1 << 20) as f64,
            r.note
        );
    }
    s
}
