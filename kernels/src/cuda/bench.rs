//! `coordinator bench kernels`: one timing harness per op family of [`crate::families`] (the
//! GPU check of the same name proves it right first), on CUDA or on the CPU backend. On CUDA
//! the machine's own ceilings (a large bf16 matrix product through cuBLASLt and a large device
//! copy) are measured first, so that every figure comes with its floor, and the fused attention
//! and InfoNCE kernels run against their unfused baselines in the same run.
//!
//! Times are medians after warm-up: CUDA events over input sets rotated so that their total
//! exceeds the L2 cache where it matters, the host clock on the CPU. Peak memory is the caching
//! allocator's peak above what the inputs hold (CUDA), or the process heap's peak above it where
//! the binary meters its heap ([`crate::cpu::heap`]; 0 otherwise). **The CUDA side has not yet
//! run on a GPU** (written in sessions without one).

use std::time::Instant;

use anyhow::{bail, Result};

use super::blas::Operand;
use super::check::Rng;
use super::{Cuda, TensorArgs};
use crate::backend::{Activation, AdamWStep, Backend, DType, InfoNceDims};
use crate::cpu::{heap, Cpu};
use crate::families;
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
    /// The larger of FLOPs over the measured matrix rate and bytes over the measured bandwidth
    /// (0 on the CPU, which measures no ceilings).
    pub floor_ms: f64,
    pub peak_bytes: usize,
    pub note: String,
}

/// The `--op` that is no family: the CUDA matrix rate and copy bandwidth alone.
pub const CEILINGS: &str = "ceilings";

/// Checks an `--op` value: a family, or `ceilings`; anything else is refused with one line
/// listing them.
pub fn check_op(op: &str) -> Result<()> {
    if op == CEILINGS || families::find(op).is_ok() {
        return Ok(());
    }
    bail!("unknown op {op:?}; ops: {}, {CEILINGS}", families::names())
}

/// Which InfoNCE implementations a run times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InfonceVariant {
    /// The fused kernels (CUDA) or the tiled CPU op: the logits never held whole.
    Fused,
    /// OpenCLIP's way: the local x global logits of each direction materialised, softmax,
    /// backward through two matrix products.
    Baseline,
    Both,
}

impl InfonceVariant {
    fn fused(self) -> bool {
        self != InfonceVariant::Baseline
    }
    fn baseline(self) -> bool {
        self != InfonceVariant::Fused
    }
}

/// The InfoNCE sizes and variants of a run: the default sweep, or one size given with
/// `--local L --global G --dim D`.
#[derive(Clone, Copy, Debug)]
pub struct InfonceShape {
    /// `(local, global, dim)`; `None` for the default sizes.
    pub size: Option<(usize, usize, usize)>,
    pub variant: InfonceVariant,
}

impl Default for InfonceShape {
    fn default() -> Self {
        Self { size: None, variant: InfonceVariant::Both }
    }
}

impl InfonceShape {
    fn sizes(&self, quick: bool) -> Vec<(usize, usize, usize)> {
        match self.size {
            Some(s) => vec![s],
            None if quick => vec![(2048, 16_384, 512)],
            None => vec![(2048, 16_384, 512), (2048, 65_536, 512), (2048, 262_144, 512)],
        }
    }

    fn cpu_sizes(&self) -> Vec<(usize, usize, usize)> {
        self.size.map_or_else(|| vec![(256, 2048, 512)], |s| vec![s])
    }
}

/// What a bench run measures.
#[derive(Clone, Copy, Debug, Default)]
pub struct BenchOptions<'a> {
    /// One family (or `ceilings`); every family when `None`.
    pub op: Option<&'a str>,
    /// Smaller sizes (a quick look, not the recorded figures).
    pub quick: bool,
    pub infonce: InfonceShape,
}

const WARMUP: usize = 3;

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] as f64
}

fn down<B: Backend>(be: &B, t: &Tensor<B>) -> Result<Vec<f32>> {
    let mut v = vec![0.0; t.len()];
    be.download_f32(t, &mut v)?;
    Ok(v)
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

    fn bench_attention_cuda(&self, rows: &mut Vec<BenchRow>, ceil: &Ceil, quick: bool) -> Result<()> {
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

    fn bench_infonce(&self, rows: &mut Vec<BenchRow>, ceil: &Ceil, quick: bool, shape: InfonceShape) -> Result<()> {
        let mut rng = Rng::from_clock();
        for (local, global, dim) in shape.sizes(quick) {
            let size = format!("B_local={local} B_global={global} D={dim}");
            let lgd = (local * global * dim) as f64;
            // The baseline's: per direction the logits, G . y and G^T . x.
            let flops = 12.0 * lgd;
            let bytes = (2 * (local + global) * dim * (2 + 4)) as f64;
            let floor = (flops / (ceil.tflops * 1e12)).max(bytes / (ceil.gbs * 1e9)) * 1e3;
            let sets = (120usize << 20).div_ceil(2 * global * dim * 2).clamp(1, 3);
            let dims = InfoNceDims { local, global, dim, offset: (global / 2).min(global - local) };
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
            let (loss, row_lse, pos) =
                (self.alloc(1, DType::F32)?, self.alloc(local, DType::F32)?, self.alloc(local, DType::F32)?);
            let (di, dt) = (self.alloc(local * dim, DType::F32)?, self.alloc(local * dim, DType::F32)?);
            let (dai, dat) = (self.alloc(global * dim, DType::F32)?, self.alloc(global * dim, DType::F32)?);
            let (col_max, col_sum) = (self.alloc(global, DType::F32)?, self.alloc(global, DType::F32)?);
            let (gmax, col_lse) = (self.alloc(global, DType::F32)?, self.alloc(global, DType::F32)?);
            let dls = self.alloc(1, DType::F32)?;
            let inputs = self.memory_stats().0 - base;
            let mut fused_peak = None;
            if shape.variant.fused() {
                self.reset_peak_memory();
                // The one block of this rank (the column all-reduce is the identity here).
                let ms = self.time_median(10, |k| {
                    let (_, at, i, _) = &feats[k % sets];
                    self.infonce_block_fwd(&row_lse, &pos, &col_max, &col_sum, i, at, &scale, dims);
                    self.copy(&gmax, &col_max);
                    self.infonce_col_rescale(&col_sum, &col_max, &gmax);
                    self.infonce_block_loss(&loss, &col_lse, &row_lse, &pos, &gmax, &col_sum, dims);
                    self.infonce_block_bwd(&di, &dat, Some(&dls), 1.0, i, at, &scale, &row_lse, &col_lse, dims);
                })?;
                let peak = self.peak_above(base + inputs);
                fused_peak = Some(peak);
                // Useful work 8 L G D; the kernels do 10 (the backward's two passes each
                // recompute the block).
                let floor = (8.0 * lgd / (ceil.tflops * 1e12)).max(bytes / (ceil.gbs * 1e9)) * 1e3;
                let note = "kernels do 10 LGD";
                rows.push(row("infonce", "fused one block fwd+bwd", &size, ms, 8.0 * lgd, bytes, floor, peak, note));
            }
            if !shape.variant.baseline() {
                continue;
            }

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
            let note = fused_peak
                .map(|f| format!("fused peak = {:.2}% of this", 100.0 * f as f64 / peak.max(1) as f64))
                .unwrap_or_default();
            rows.push(row("infonce", "unfused (materialised logits)", &size, ms, flops, ubytes, floor, peak, &note));
        }
        Ok(())
    }
}

/// A backend's clock for the benches: CUDA events on the device's stream, the host clock on
/// the (synchronous) CPU backend.
trait Clock: Backend {
    /// Median milliseconds of `f(k)` over `reps` runs after warm-up (`k` picks an input set).
    fn median_ms(&self, reps: usize, f: &mut dyn FnMut(usize)) -> Result<f64>;
    /// The peak memory an op used above `base` bytes (see the module docs), after
    /// [`Clock::reset_peak`].
    fn peak_above_bytes(&self, base: isize) -> usize;
    fn reset_peak(&self);
    /// The bytes in use now (the base the peak is measured above; the CPU's meter counts from
    /// when it started, so it can be negative).
    fn in_use(&self) -> isize;
    fn is_cpu(&self) -> bool;
}

impl Clock for Cpu {
    /// One rep is one cold run (sizes that take tens of seconds); more get a warm-up first.
    fn median_ms(&self, reps: usize, f: &mut dyn FnMut(usize)) -> Result<f64> {
        if reps > 1 {
            f(0);
        }
        let mut v = Vec::new();
        for k in 0..reps.clamp(1, 5) {
            let t0 = Instant::now();
            f(k + 1);
            v.push(t0.elapsed().as_secs_f32() * 1e3);
        }
        Ok(median(v))
    }
    fn peak_above_bytes(&self, base: isize) -> usize {
        (heap::peak() - base).max(0) as usize
    }
    fn reset_peak(&self) {
        heap::reset_peak();
    }
    fn in_use(&self) -> isize {
        heap::current()
    }
    fn is_cpu(&self) -> bool {
        true
    }
}

impl Clock for Cuda {
    fn median_ms(&self, reps: usize, f: &mut dyn FnMut(usize)) -> Result<f64> {
        self.time_median(reps, f)
    }
    fn peak_above_bytes(&self, base: isize) -> usize {
        self.peak_above(base.max(0) as usize)
    }
    fn reset_peak(&self) {
        self.reset_peak_memory();
    }
    fn in_use(&self) -> isize {
        self.memory_stats().0 as isize
    }
    fn is_cpu(&self) -> bool {
        false
    }
}

/// One family's timing run on one backend: sizes by device, rows with their floors.
struct Harness<'a, B: Clock> {
    be: &'a B,
    rng: Rng,
    ceil: Option<&'a Ceil>,
    quick: bool,
    rows: &'a mut Vec<BenchRow>,
}

impl<B: Clock> Harness<'_, B> {
    /// `gpu` at full size, `quick` with `--quick`, `cpu` on the CPU backend.
    fn pick<T>(&self, gpu: T, quick: T, cpu: T) -> T {
        if self.be.is_cpu() {
            cpu
        } else if self.quick {
            quick
        } else {
            gpu
        }
    }

    fn random(&mut self, n: usize, scale: f32, dt: DType) -> Result<Tensor<B>> {
        random(self.be, &mut self.rng, n, scale, dt)
    }

    /// Times `f` and adds a row: `flops` and `bytes` give the rates and the floor.
    fn time(
        &mut self,
        (op, variant, size): (&str, &str, &str),
        (flops, bytes): (f64, f64),
        reps: usize,
        f: &mut dyn FnMut(usize),
    ) -> Result<()> {
        let base = self.be.in_use();
        self.be.reset_peak();
        let ms = self.be.median_ms(reps, f)?;
        let peak = self.be.peak_above_bytes(base);
        let floor = self.ceil.map_or(0.0, |c| (flops / (c.tflops * 1e12)).max(bytes / (c.gbs * 1e9)) * 1e3);
        let variant = if self.be.is_cpu() { format!("cpu {variant}") } else { variant.to_string() };
        let note = match (self.be.is_cpu(), heap::installed()) {
            (true, true) => "host clock",
            (true, false) => "host clock; heap not metered (peak 0)",
            (false, _) => "",
        };
        self.rows.push(row(op, &variant, size, ms, flops, bytes, floor, peak, note));
        Ok(())
    }

    fn elementwise(&mut self) -> Result<()> {
        let n = self.pick(1 << 26, 1 << 24, 1 << 22);
        let size = format!("n={n}");
        let (a, b) = (self.random(n, 1.0, DType::F32)?, self.random(n, 1.0, DType::F32)?);
        let (o, h) = (self.be.alloc(n, DType::F32)?, self.be.alloc(n, DType::Bf16)?);
        let ss = self.be.alloc(1, DType::F32)?;
        let be = self.be;
        let nf = n as f64;
        self.time(("elementwise", "add", &size), (nf, 12.0 * nf), 20, &mut |_| be.add(&o, &a, &b))?;
        self.time(("elementwise", "copy f32>bf16", &size), (0.0, 6.0 * nf), 20, &mut |_| be.copy(&h, &a))?;
        self.time(("elementwise", "sum_squares", &size), (2.0 * nf, 4.0 * nf), 20, &mut |_| be.sum_squares(&ss, &a))
    }

    fn linear(&mut self) -> Result<()> {
        // ViT-B's MLP up-projection: tokens x 768 -> 3072.
        let (n, c, oc) = self.pick((8192, 768, 3072), (2048, 768, 3072), (512, 768, 3072));
        let size = format!("n={n} c={c} oc={oc}");
        let x = self.random(n * c, 1.0, DType::Bf16)?;
        let w = self.random(oc * c, 0.03, DType::Bf16)?;
        let bias = self.random(oc, 0.1, DType::F32)?;
        let dy = self.random(n * oc, 1.0, DType::Bf16)?;
        let y = self.be.alloc(n * oc, DType::Bf16)?;
        let (dx, dw, db) =
            (self.be.alloc(n * c, DType::F32)?, self.be.alloc(oc * c, DType::F32)?, self.be.alloc(oc, DType::F32)?);
        let be = self.be;
        let flops = 6.0 * (n * c * oc) as f64;
        let bytes = 2.0 * (2 * (n * c + oc * c + n * oc)) as f64 + 8.0 * (n * c + oc * c) as f64;
        self.time(("linear", "fwd+bwd", &size), (flops, bytes), 10, &mut |_| {
            be.linear_fwd(&y, &x, &w, Some(&bias), n, c, oc);
            be.linear_bwd(Some(&dx), Some(&dw), Some(&db), &dy, &x, &w, n, c, oc);
        })
    }

    fn layernorm(&mut self) -> Result<()> {
        // ViT-B/16 at batch 128: 128 x 197 rows of 768.
        let (n, c) = self.pick((128 * 197, 768), (16 * 197, 768), (8 * 197, 768));
        let size = format!("n={n} c={c}");
        let (x, r) = (self.random(n * c, 1.0, DType::Bf16)?, self.random(n * c, 1.0, DType::Bf16)?);
        let (g, bta) = (self.random(c, 1.0, DType::F32)?, self.random(c, 0.1, DType::F32)?);
        let dy = self.random(n * c, 1.0, DType::Bf16)?;
        let (y, xs) = (self.be.alloc(n * c, DType::Bf16)?, self.be.alloc(n * c, DType::Bf16)?);
        let (mean, rstd) = (self.be.alloc(n, DType::F32)?, self.be.alloc(n, DType::F32)?);
        let (dx, dg, db) =
            (self.be.alloc(n * c, DType::F32)?, self.be.alloc(c, DType::F32)?, self.be.alloc(c, DType::F32)?);
        let be = self.be;
        let e = (n * c) as f64;
        self.time(("layernorm", "fwd+bwd", &size), (16.0 * e, 2.0 * 4.0 * e + 8.0 * e), 10, &mut |_| {
            be.layernorm_fwd(&y, &mean, &rstd, &x, &g, &bta, n, c, 1e-5);
            be.layernorm_bwd(&dx, Some(&dg), Some(&db), &dy, &x, &g, &mean, &rstd, n, c);
        })?;
        self.time(("layernorm", "add_layernorm fwd+bwd", &size), (18.0 * e, 2.0 * 6.0 * e + 8.0 * e), 10, &mut |_| {
            be.add_layernorm_fwd(&y, &xs, &mean, &rstd, &x, &r, &g, &bta, n, c, 1e-5);
            be.add_layernorm_bwd(&dx, Some(&dg), Some(&db), &dy, &xs, &g, &mean, &rstd, n, c);
        })
    }

    fn l2norm(&mut self) -> Result<()> {
        let (n, d) = self.pick((65_536, 512), (8192, 512), (4096, 512));
        let size = format!("n={n} d={d}");
        let x = self.random(n * d, 1.0, DType::Bf16)?;
        let dy = self.random(n * d, 1.0, DType::F32)?;
        let (y, nrm, dx) =
            (self.be.alloc(n * d, DType::F32)?, self.be.alloc(n, DType::F32)?, self.be.alloc(n * d, DType::F32)?);
        let be = self.be;
        let e = (n * d) as f64;
        self.time(("l2norm", "fwd+bwd", &size), (8.0 * e, 2.0 * e + 4.0 * e + 3.0 * 4.0 * e + 8.0 * e), 10, &mut |_| {
            be.l2norm_fwd(&y, &nrm, &x, n, d);
            be.l2norm_bwd(&dx, &dy, &y, &nrm, n, d);
        })
    }

    fn activation(&mut self) -> Result<()> {
        // ViT-B/16's MLP activations at batch 128: 128 x 197 x 3072.
        let n = self.pick(128 * 197 * 3072, 16 * 197 * 3072, 1 << 22);
        let x = self.random(n, 2.0, DType::Bf16)?;
        let dy = self.random(n, 1.0, DType::Bf16)?;
        let (y, dx) = (self.be.alloc(n, DType::Bf16)?, self.be.alloc(n, DType::F32)?);
        let be = self.be;
        for kind in [Activation::QuickGelu, Activation::Gelu] {
            let size = format!("n={n} {kind:?}");
            self.time(("activation", "fwd+bwd", &size), (20.0 * n as f64, 14.0 * n as f64), 10, &mut |_| {
                be.act_fwd(kind, &y, &x);
                be.act_bwd(kind, &dx, &dy, &x);
            })?;
        }
        Ok(())
    }

    /// The token embedding at the default text batch (b = 256 texts of 77 tokens, width 512,
    /// CLIP's 49,408-token vocabulary), texts of 8 to 60 tokens padded with id 0 as the
    /// tokenizer does: the padding id is one long run of repeated ids in the table's gradient.
    /// Then the vision embedding (ViT-B/16 at 224 px) and the pooling gather.
    fn embed(&mut self) -> Result<()> {
        let (b, t, d, vocab) = (256usize, 77usize, 512usize, 49_408usize);
        let mut ids = vec![0i32; b * t];
        let mut eot = vec![0i32; b];
        for (s, row) in ids.chunks_exact_mut(t).enumerate() {
            let len = 8 + self.rng.below(53);
            row[0] = 49_406;
            for x in &mut row[1..len - 1] {
                *x = 1 + self.rng.below(49_000) as i32;
            }
            row[len - 1] = 49_407;
            eot[s] = (len - 1) as i32;
        }
        let size = format!("b={b} t={t} d={d} vocab={vocab}");
        let tid = self.be.alloc(b * t, DType::I32)?;
        self.be.upload_i32(&tid, &ids)?;
        let (wte, wpe) = (self.random(vocab * d, 0.02, DType::F32)?, self.random(t * d, 0.01, DType::F32)?);
        let out = self.be.alloc(b * t * d, DType::Bf16)?;
        let dy = self.random(b * t * d, 1.0, DType::Bf16)?;
        let (dwte, dwpe) = (self.be.alloc(vocab * d, DType::F32)?, self.be.alloc(t * d, DType::F32)?);
        let be = self.be;
        let e = (b * t * d) as f64;
        self.time(("embed", "token_embed fwd", &size), (e, 4.0 * e + 2.0 * e), 20, &mut |_| {
            be.token_embed_fwd(&out, &tid, &wte, &wpe, b, t, d);
        })?;
        self.time(("embed", "token_embed bwd (wte + wpe)", &size), (2.0 * e, 2.0 * e + 8.0 * e), 20, &mut |_| {
            be.token_embed_bwd(Some(&dwte), Some(&dwpe), &dy, &tid, b, t, d);
        })?;
        let ti = self.be.alloc(b, DType::I32)?;
        self.be.upload_i32(&ti, &eot)?;
        let pooled = self.be.alloc(b * d, DType::Bf16)?;
        let dseq = self.be.alloc(b * t * d, DType::F32)?;
        let dp = self.random(b * d, 1.0, DType::Bf16)?;
        self.time(("embed", "gather_rows fwd+bwd", &size), (0.0, 2.0 * 4.0 * (b * d) as f64), 20, &mut |_| {
            be.gather_rows(&pooled, &out, &ti, b, t, d);
            be.gather_rows_bwd(&dseq, &dp, &ti, b, t, d);
        })?;

        let (b, img, p, d) = (self.pick(128, 16, 4), 224usize, 16usize, 768usize);
        let np = (img / p) * (img / p);
        let size = format!("b={b} img={img} p={p} d={d}");
        let pixels = self.random(b * 3 * img * img, 1.0, DType::F32)?;
        let cols = self.be.alloc(b * 3 * img * img, DType::Bf16)?;
        let patches = self.random(b * np * d, 1.0, DType::Bf16)?;
        let (cls, pos) = (self.random(d, 0.1, DType::F32)?, self.random((np + 1) * d, 0.1, DType::F32)?);
        let emb = self.be.alloc(b * (np + 1) * d, DType::Bf16)?;
        let demb = self.random(b * (np + 1) * d, 1.0, DType::Bf16)?;
        let (dpa, dcls, dpos) = (
            self.be.alloc(b * np * d, DType::F32)?,
            self.be.alloc(d, DType::F32)?,
            self.be.alloc((np + 1) * d, DType::F32)?,
        );
        let px = (b * 3 * img * img) as f64;
        self.time(("embed", "im2col", &size), (0.0, 6.0 * px), 20, &mut |_| be.im2col(&cols, &pixels, b, img, p))?;
        let e = (b * (np + 1) * d) as f64;
        self.time(("embed", "vision_embed fwd+bwd", &size), (2.0 * e, 4.0 * e + 10.0 * e), 20, &mut |_| {
            be.vision_embed_fwd(&emb, &patches, &cls, &pos, b, np, d);
            be.vision_embed_bwd(Some(&dpa), Some(&dcls), Some(&dpos), &demb, b, np, d);
        })
    }

    fn bce(&mut self) -> Result<()> {
        // The fine-tuning head: 14 labels over a batch, about a third masked out.
        let n = self.pick(14 * 4096, 14 * 1024, 14 * 4096);
        let size = format!("n={n} masked");
        let x = self.random(n, 4.0, DType::F32)?;
        let y = self.be.alloc(n, DType::F32)?;
        let labels: Vec<f32> = (0..n).map(|_| self.rng.below(2) as f32).collect();
        self.be.upload_f32(&y, &labels)?;
        let m = self.be.alloc(n, DType::F32)?;
        let mask: Vec<f32> = (0..n).map(|_| (self.rng.below(3) != 0) as i32 as f32).collect();
        self.be.upload_f32(&m, &mask)?;
        let (loss, dx) = (self.be.alloc(1, DType::F32)?, self.be.alloc(n, DType::F32)?);
        let be = self.be;
        self.time(("bce", "fwd+bwd", &size), (30.0 * n as f64, 2.0 * 12.0 * n as f64 + 8.0 * n as f64), 20, &mut |_| {
            be.bce_with_logits_fwd(&loss, &x, &y, Some(&m));
            be.bce_with_logits_bwd(&dx, &x, &y, Some(&m), 1.0);
        })
    }

    fn adamw(&mut self) -> Result<()> {
        // A CLIP ViT-B/16's 150 M parameters on a GPU; 16 M on the CPU.
        let n = self.pick(150_000_000, 16_000_000, 16_000_000);
        let size = format!("n={n}");
        let p = self.random(n, 0.1, DType::F32)?;
        let g = self.random(n, 0.01, DType::F32)?;
        let (m, v) = (self.be.alloc(n, DType::F32)?, self.be.alloc(n, DType::F32)?);
        let copy = self.be.alloc(n, DType::Bf16)?;
        let be = self.be;
        let hp = AdamWStep { lr: 1e-4, beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.2, step: 10 };
        let nf = n as f64;
        self.time(("adamw", "with bf16 copy", &size), (12.0 * nf, 28.0 * nf + 2.0 * nf), 10, &mut |_| {
            be.adamw_with_bf16_copy(&p, &g, &m, &v, Some(&copy), hp);
        })
    }

    /// The CPU's own attention and InfoNCE rows (CUDA has its fused-against-unfused benches).
    fn attention_cpu(&mut self) -> Result<()> {
        let (b, h, t, hd) = (8, 12, 197, 64);
        let elems = b * h * t * hd;
        let q = self.random(3 * elems, 1.0, DType::F32)?;
        let out = self.be.alloc(elems, DType::F32)?;
        let saved = self.be.alloc(self.be.attention_saved_len(b, t, h), DType::F32)?;
        let dout = self.random(elems, 1.0, DType::F32)?;
        let dq = self.be.alloc(3 * elems, DType::F32)?;
        let be = self.be;
        let flops = 12.0 * (b * h * t * t * hd) as f64;
        self.time(("attention", "fwd+bwd", &format!("{}x{t}x{hd}", b * h)), (flops, 0.0), 5, &mut |_| {
            be.attention_fwd(&out, &saved, &q, b, t, h, hd, false);
            be.attention_bwd(&dq, &dout, &q, &out, &saved, b, t, h, hd, false);
        })
    }

    fn infonce_cpu(&mut self, shape: InfonceShape) -> Result<()> {
        for (local, global, dim) in shape.cpu_sizes() {
            let size = format!("B_local={local} B_global={global} D={dim}");
            let dims = InfoNceDims { local, global, dim, offset: (global / 2).min(global - local) };
            let lgd = (local * global * dim) as f64;
            // Past a few hundred GFLOP a run takes seconds: one cold run each.
            let reps = if lgd > 1e10 { 1 } else { 3 };
            let ai = self.random(global * dim, 0.05, DType::F32)?;
            let at = self.random(global * dim, 0.05, DType::F32)?;
            let i = ai.slice(dims.offset * dim, local * dim);
            let t = at.slice(dims.offset * dim, local * dim);
            let scale = self.be.alloc(1, DType::F32)?;
            self.be.upload_f32(&scale, &[(1.0f32 / 0.07).ln()])?;
            let be = self.be;
            if shape.variant.fused() {
                // The one-block op, forward and backward; the column statistics' all-reduce is
                // the identity in one process (the global maxima are the local ones).
                let (loss, row_lse, pos) =
                    (be.alloc(1, DType::F32)?, be.alloc(local, DType::F32)?, be.alloc(local, DType::F32)?);
                let (col_max, col_sum) = (be.alloc(global, DType::F32)?, be.alloc(global, DType::F32)?);
                let (gmax, col_lse) = (be.alloc(global, DType::F32)?, be.alloc(global, DType::F32)?);
                let (di, dat) = (be.alloc(local * dim, DType::F32)?, be.alloc(global * dim, DType::F32)?);
                // fwd: one block product; bwd: the block again, then G . TXT and G^T . img.
                self.time(("infonce", "fused one block fwd+bwd", &size), (8.0 * lgd, 0.0), reps, &mut |_| {
                    be.infonce_block_fwd(&row_lse, &pos, &col_max, &col_sum, &i, &at, &scale, dims);
                    be.copy(&gmax, &col_max);
                    be.infonce_col_rescale(&col_sum, &col_max, &gmax);
                    be.infonce_block_loss(&loss, &col_lse, &row_lse, &pos, &gmax, &col_sum, dims);
                    be.infonce_block_bwd(&di, &dat, None, 1.0, &i, &at, &scale, &row_lse, &col_lse, dims);
                })?;
            }
            if shape.variant.baseline() {
                let s = 1.0f32 / 0.07;
                let (vi, vt, vai, vat) = (down(be, &i)?, down(be, &t)?, down(be, &ai)?, down(be, &at)?);
                let (mut gi, mut gt) = (vec![0.0; local * dim], vec![0.0; local * dim]);
                let (mut gai, mut gat) = (vec![0.0; global * dim], vec![0.0; global * dim]);
                // Per direction: the logits, then G . y and G^T . x.
                self.time(("infonce", "baseline (materialised logits)", &size), (12.0 * lgd, 0.0), reps, &mut |_| {
                    infonce_baseline_cpu(&vi, &vat, &mut gi, &mut gat, s, dims);
                    infonce_baseline_cpu(&vt, &vai, &mut gt, &mut gai, s, dims);
                })?;
            }
        }
        Ok(())
    }
}

/// One direction of InfoNCE the way OpenCLIP's `ClipLoss` does it on the CPU: the local x
/// global logits `s x y^T` held whole, a softmax per row, `G = (P - onehot) / (2 global)`,
/// then `dx += s G y` and `dy += s G^T x`. Returns the direction's loss share.
fn infonce_baseline_cpu(x: &[f32], y: &[f32], dx: &mut [f32], dy: &mut [f32], s: f32, dims: InfoNceDims) -> f32 {
    use crate::cpu::linear;
    let InfoNceDims { local, global, dim, offset } = dims;
    let mut z = vec![0.0f32; local * global];
    linear::fwd(&mut z, x, y, None, local, dim, global);
    let mut loss = 0.0f64;
    let coef = s / (2 * global) as f32;
    for (r, row) in z.chunks_exact_mut(global).enumerate() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(s * v));
        let sum: f32 = row.iter().map(|&v| (s * v - max).exp()).sum();
        let lse = max + sum.ln();
        loss += (lse - s * row[offset + r]) as f64;
        for v in row.iter_mut() {
            *v = (s * *v - lse).exp() * coef;
        }
        row[offset + r] -= coef;
    }
    linear::bwd(Some(dx), Some(dy), None, &z, x, y, local, dim, global);
    (loss / (2 * global) as f64) as f32
}

/// Runs the CUDA kernel bench: the ceilings first, then the family `opts.op` (or every one).
pub fn run_cuda(cuda: &Cuda, opts: BenchOptions) -> Result<Vec<BenchRow>> {
    if let Some(o) = opts.op {
        check_op(o)?;
    }
    let mut rows = Vec::new();
    let ceil = cuda.ceilings(&mut rows, opts.quick)?;
    for f in families::FAMILIES {
        if opts.op.is_some_and(|o| o != f.name) {
            continue;
        }
        match f.name {
            "attention" => cuda.bench_attention_cuda(&mut rows, &ceil, opts.quick)?,
            "infonce" => cuda.bench_infonce(&mut rows, &ceil, opts.quick, opts.infonce)?,
            name => {
                cuda.dev.release_scratch()?;
                let mut h =
                    Harness { be: cuda, rng: Rng::from_clock(), ceil: Some(&ceil), quick: opts.quick, rows: &mut rows };
                h.family(name)?;
            }
        }
    }
    cuda.synchronize()?;
    Ok(rows)
}

/// Every family on the CPU backend (host clock, median of a few runs), at sizes a CPU finishes
/// in seconds; InfoNCE's baseline is OpenCLIP's materialised logits, there are no ceilings.
pub fn run_cpu(opts: BenchOptions) -> Result<Vec<BenchRow>> {
    if let Some(o) = opts.op {
        check_op(o)?;
        if o == CEILINGS {
            bail!("the ceilings are measured on CUDA only (--device cuda)");
        }
    }
    heap::start_metering();
    let mut rows = Vec::new();
    let mut h = Harness { be: &Cpu, rng: Rng::from_clock(), ceil: None, quick: opts.quick, rows: &mut rows };
    for f in families::FAMILIES {
        if opts.op.is_some_and(|o| o != f.name) {
            continue;
        }
        match f.name {
            "attention" => h.attention_cpu()?,
            "infonce" => h.infonce_cpu(opts.infonce)?,
            name => h.family(name)?,
        }
    }
    Ok(rows)
}

impl<B: Clock> Harness<'_, B> {
    /// The families whose bench is the same on both backends.
    fn family(&mut self, name: &str) -> Result<()> {
        match name {
            "elementwise" => self.elementwise(),
            "linear" => self.linear(),
            "layernorm" => self.layernorm(),
            "l2norm" => self.l2norm(),
            "activation" => self.activation(),
            "embed" => self.embed(),
            "bce" => self.bce(),
            "adamw" => self.adamw(),
            _ => bail!("family {name} has no shared bench"),
        }
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

/// The rows as a fixed-width table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:<11} {:<34} {:<44} {:>10} {:>9} {:>9} {:>10} {:>11}  note\n",
        "op", "variant", "size", "ms", "TFLOP/s", "GB/s", "floor ms", "peak MiB"
    );
    for r in rows {
        s += &format!(
            "{:<11} {:<34} {:<44} {:>10.3} {:>9.3} {:>9.1} {:>10.3} {:>11.1}  {}\n",
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
