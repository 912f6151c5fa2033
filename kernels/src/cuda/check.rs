//! GPU checks: every CUDA op against the CPU op (the reference) on fresh random inputs, at
//! several sizes including ones that are not multiples of the kernels' tiles.
//!
//! Each check is written once, generic over the backend, and run on [`Cpu`] and [`Cuda`].
//! Tensors the model keeps in bf16 on CUDA are asked for as `DType::Bf16` (the CPU serves
//! them in f32), and their random inputs are rounded to bf16 first so that both backends see
//! the same numbers. Forward outputs are poisoned with NaN before the launch, so an element
//! a kernel fails to write shows up as NaN; gradient outputs (which ops add into) start from
//! random values, so an unwritten element misses its gradient. NaN never passes. An output
//! passes when `‖cuda − cpu‖ / ‖cpu‖ <= tol` and every element is within
//! `atol + rtol * |cpu|` with `rtol = tol` and `atol = tol * rms(cpu)`.
//!
//! One check per op family of [`crate::families`], under the family's name (`layernorm` covers
//! the fused residual add too, `embed` every embedding op): `coordinator gpu-check` runs them
//! all, `coordinator gpu-check --op NAME` one, and so do the ignored tests in
//! `kernels/tests/cuda_ops.rs`.
//! **Not yet run on a GPU** (written in a session without one).

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;

use super::{bf16_to_f32, f32_to_bf16, Cuda};
use crate::backend::{Activation, AdamWStep, Backend, DType, InfoNceDims};
use crate::cpu::Cpu;
use crate::tensor::Tensor;

/// One compared output.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub op: String,
    pub size: String,
    pub output: String,
    /// ‖cuda − cpu‖ / ‖cpu‖.
    pub rel_err: f64,
    /// The largest |cuda − cpu| / (atol + rtol |cpu|) over the elements (pass: <= 1).
    pub worst: f64,
    pub tol: f64,
    pub passed: bool,
    pub note: String,
}

/// Tolerance (relative) of outputs computed from bf16 operands; f32 paths use `TOL_F32`.
pub const TOL_BF16: f64 = 2e-2;
pub const TOL_F32: f64 = 1e-4;

/// A small, seedable generator (xorshift64*), seeded from the clock by default: fresh inputs
/// every run, and the seed is printed so that a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn from_clock() -> Self {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        Self::new(t ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn seed(&self) -> u64 {
        self.0
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    /// Values exactly representable in bf16.
    pub fn vec_bf16(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| bf16_to_f32(f32_to_bf16(self.uniform() * scale))).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn up<B: Backend>(be: &B, data: &[f32], dt: DType) -> Result<Tensor<B>> {
    let t = be.alloc(data.len(), dt)?;
    be.upload_f32(&t, data)?;
    Ok(t)
}

fn up_i32<B: Backend>(be: &B, data: &[i32]) -> Result<Tensor<B>> {
    let t = be.alloc(data.len(), DType::I32)?;
    be.upload_i32(&t, data)?;
    Ok(t)
}

/// An output buffer filled with NaN.
fn poisoned<B: Backend>(be: &B, n: usize, dt: DType) -> Result<Tensor<B>> {
    let t = be.alloc(n, dt)?;
    be.fill(&t, f32::NAN);
    Ok(t)
}

fn down<B: Backend>(be: &B, t: &Tensor<B>) -> Result<Vec<f32>> {
    let mut v = vec![0.0; t.len()];
    be.download_f32(t, &mut v)?;
    Ok(v)
}

type Outs = Vec<(&'static str, Vec<f32>)>;

/// Runs the same block on the CPU and on CUDA (`$be` bound to each in turn).
macro_rules! both {
    ($cuda:expr, |$be:ident| $body:block) => {{
        let cpu_out: Result<Outs> = {
            let $be = &Cpu;
            (|| -> Result<Outs> { $body })()
        };
        let gpu_out: Result<Outs> = {
            let $be = $cuda;
            (|| -> Result<Outs> { $body })()
        };
        (cpu_out, gpu_out)
    }};
}

/// Compares named outputs and appends one result per output.
fn compare(res: &mut Vec<CheckResult>, op: &str, size: &str, tol: f64, outs: (Result<Outs>, Result<Outs>)) {
    let fail = |res: &mut Vec<CheckResult>, what: String| {
        res.push(CheckResult {
            op: op.into(),
            size: size.into(),
            output: "-".into(),
            rel_err: f64::NAN,
            worst: f64::NAN,
            tol,
            passed: false,
            note: what,
        })
    };
    let (cpu, gpu) = match outs {
        (Ok(c), Ok(g)) => (c, g),
        (Err(e), _) => return fail(res, format!("cpu: {e:#}")),
        (_, Err(e)) => return fail(res, format!("cuda: {e:#}")),
    };
    for ((name, r), (_, g)) in cpu.iter().zip(&gpu) {
        res.push(judge(op, size, name, r, g, tol));
    }
}

/// The verdict on one output.
pub fn judge(op: &str, size: &str, output: &str, reference: &[f32], got: &[f32], tol: f64) -> CheckResult {
    let mut note = String::new();
    let n = reference.len().max(1) as f64;
    let ref_sq: f64 = reference.iter().map(|&x| (x as f64).powi(2)).sum();
    let rms = (ref_sq / n).sqrt();
    let (mut diff_sq, mut worst, mut nans) = (0.0f64, 0.0f64, 0usize);
    for (&r, &g) in reference.iter().zip(got) {
        if !g.is_finite() || !r.is_finite() {
            nans += 1;
            continue;
        }
        let d = (g as f64 - r as f64).abs();
        diff_sq += d * d;
        let bound = tol * rms + tol * (r as f64).abs();
        if bound > 0.0 {
            worst = worst.max(d / bound);
        } else if d > 0.0 {
            worst = f64::INFINITY;
        }
    }
    if reference.len() != got.len() {
        note = format!("length {} vs {}", got.len(), reference.len());
    }
    if nans > 0 {
        note = format!("{nans} non-finite elements (unwritten or overflowed)");
    }
    if ref_sq == 0.0 {
        note = "reference is all zeros: not a test".into();
    }
    let rel_err = if ref_sq > 0.0 { (diff_sq / ref_sq).sqrt() } else { f64::NAN };
    let passed = note.is_empty() && rel_err <= tol && worst <= 1.0;
    CheckResult { op: op.into(), size: size.into(), output: output.into(), rel_err, worst, tol, passed, note }
}

/// One family's GPU check: appends its results (CUDA against the CPU on fresh random inputs).
type CheckFn = fn(&Cuda, &mut Rng, &mut Vec<CheckResult>, bool);

/// The check of a family of [`crate::families::FAMILIES`] (a test keeps every family covered).
fn harness(family: &str) -> Option<CheckFn> {
    Some(match family {
        "elementwise" => elementwise,
        "linear" => linear,
        "layernorm" => layernorm,
        "l2norm" => l2norm,
        "activation" => activation,
        "attention" => attention,
        "embed" => embed,
        "infonce" => infonce,
        "bce" => bce,
        "adamw" => adamw,
        _ => return None,
    })
}

/// The checks of one family (`coordinator gpu-check --op NAME`); `quick` keeps the small sizes
/// only. Returns the seed and the results; an unknown name is refused with the family list.
pub fn run_family(cuda: &Cuda, family: &str, quick: bool) -> Result<(u64, Vec<CheckResult>)> {
    let f = crate::families::find(family)?;
    let check = harness(f.name).ok_or_else(|| anyhow::anyhow!("family {} has no GPU check", f.name))?;
    let mut rng = Rng::from_clock();
    let seed = rng.seed();
    let mut res = Vec::new();
    check(cuda, &mut rng, &mut res, quick);
    Ok((seed, res))
}

/// Runs every family's check, then the per-op profiler's; `quick` keeps the small sizes only.
/// Returns the seed and the results.
pub fn run_all(cuda: &Cuda, quick: bool) -> (u64, Vec<CheckResult>) {
    let mut rng = Rng::from_clock();
    let seed = rng.seed();
    let mut res = Vec::new();
    for f in crate::families::FAMILIES {
        match harness(f.name) {
            Some(check) => check(cuda, &mut rng, &mut res, quick),
            None => res.push(failed(f.name, "-", anyhow::anyhow!("no GPU check for this family"))),
        }
    }
    res.push(op_timing(cuda));
    (seed, res)
}

fn elementwise(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let sizes: &[usize] = if quick { &[1, 1000, 65_537] } else { &[1, 1000, 65_537, 3_000_001] };
    for &n in sizes {
        let size = format!("n={n}");
        let (a, b) = (rng.vec(n, 2.0), rng.vec(n, 2.0));
        let s = rng.uniform() * 3.0;
        let out = both!(cuda, |be| {
            let ta = up(be, &a, DType::F32)?;
            let tb = up(be, &b, DType::F32)?;
            let o = poisoned(be, n, DType::F32)?;
            be.add(&o, &ta, &tb);
            let acc = up(be, &a, DType::F32)?;
            be.accumulate(&acc, &tb);
            be.scale(&acc, s);
            be.clamp_max(&acc, 0.5);
            let cast = poisoned(be, n, DType::Bf16)?;
            be.copy(&cast, &ta);
            let back = poisoned(be, n, DType::F32)?;
            be.copy(&back, &cast);
            let ss = up(be, &[1.5], DType::F32)?;
            be.sum_squares(&ss, &ta);
            let f = poisoned(be, n, DType::F32)?;
            be.fill(&f, s);
            Ok(vec![
                ("add", down(be, &o)?),
                ("acc,scale,clamp", down(be, &acc)?),
                ("cast f32>bf16>f32", down(be, &back)?),
                ("sum_squares", down(be, &ss)?),
                ("fill", down(be, &f)?),
            ])
        });
        compare(res, "elementwise", &size, TOL_BF16.min(4e-3), out);
    }
}

fn linear(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let sizes: &[(usize, usize, usize)] = if quick {
        &[(7, 64, 40), (77, 512, 512)]
    } else {
        &[(7, 64, 40), (77, 512, 512), (394, 768, 3072), (50, 3072, 768)]
    };
    for &(n, c, oc) in sizes {
        let size = format!("n={n} c={c} oc={oc}");
        let x = rng.vec_bf16(n * c, 1.0);
        let w = rng.vec_bf16(oc * c, 1.0 / (c as f32).sqrt());
        let bias = rng.vec(oc, 0.5);
        let dy = rng.vec_bf16(n * oc, 1.0);
        let (g0, gw0, gb0) = (rng.vec(n * c, 0.1), rng.vec(oc * c, 0.1), rng.vec(oc, 0.1));
        let out = both!(cuda, |be| {
            let tx = up(be, &x, DType::Bf16)?;
            let tw = up(be, &w, DType::Bf16)?;
            let tb = up(be, &bias, DType::F32)?;
            let y = poisoned(be, n * oc, DType::F32)?;
            be.linear_fwd(&y, &tx, &tw, Some(&tb), n, c, oc);
            let y2 = poisoned(be, n * oc, DType::Bf16)?;
            be.linear_fwd(&y2, &tx, &tw, None, n, c, oc);
            let tdy = up(be, &dy, DType::Bf16)?;
            let dx = up(be, &g0, DType::F32)?;
            let dw = up(be, &gw0, DType::F32)?;
            let db = up(be, &gb0, DType::F32)?;
            be.linear_bwd(Some(&dx), Some(&dw), Some(&db), &tdy, &tx, &tw, n, c, oc);
            Ok(vec![
                ("out (bias, f32)", down(be, &y)?),
                ("out (bf16)", down(be, &y2)?),
                ("dinp", down(be, &dx)?),
                ("dw", down(be, &dw)?),
                ("dbias", down(be, &db)?),
            ])
        });
        compare(res, "linear", &size, TOL_BF16, out);
    }
}

fn layernorm(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let sizes: &[(usize, usize)] =
        if quick { &[(5, 100), (197, 768)] } else { &[(5, 100), (197, 768), (3 * 257, 1024)] };
    for &(n, c) in sizes {
        let size = format!("n={n} c={c}");
        let x: Vec<f32> = rng.vec_bf16(n * c, 2.0).iter().map(|v| v + 0.3).collect();
        let gamma = rng.vec(c, 1.0);
        let beta = rng.vec(c, 0.5);
        let dy = rng.vec_bf16(n * c, 1.0);
        let (g0, gg0, gb0) = (rng.vec(n * c, 0.1), rng.vec(c, 0.1), rng.vec(c, 0.1));
        let out = both!(cuda, |be| {
            let tx = up(be, &x, DType::Bf16)?;
            let tg = up(be, &gamma, DType::F32)?;
            let tb = up(be, &beta, DType::F32)?;
            let y = poisoned(be, n * c, DType::Bf16)?;
            let mean = poisoned(be, n, DType::F32)?;
            let rstd = poisoned(be, n, DType::F32)?;
            be.layernorm_fwd(&y, &mean, &rstd, &tx, &tg, &tb, n, c, 1e-5);
            let tdy = up(be, &dy, DType::Bf16)?;
            let dx = up(be, &g0, DType::F32)?;
            let dg = up(be, &gg0, DType::F32)?;
            let db = up(be, &gb0, DType::F32)?;
            be.layernorm_bwd(&dx, Some(&dg), Some(&db), &tdy, &tx, &tg, &mean, &rstd, n, c);
            Ok(vec![
                ("out", down(be, &y)?),
                ("mean", down(be, &mean)?),
                ("rstd", down(be, &rstd)?),
                ("dinp", down(be, &dx)?),
                ("dgamma", down(be, &dg)?),
                ("dbeta", down(be, &db)?),
            ])
        });
        compare(res, "layernorm", &size, TOL_BF16, out);
    }
    add_layernorm(cuda, rng, res, quick);
}

fn l2norm(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let sizes: &[(usize, usize)] =
        if quick { &[(5, 100), (197, 512)] } else { &[(5, 100), (197, 512), (3 * 257, 1024), (4096, 512)] };
    for &(n, c) in sizes {
        let size = format!("n={n} d={c}");
        let x: Vec<f32> = rng.vec_bf16(n * c, 2.0).iter().map(|v| v + 0.3).collect();
        let dy = rng.vec_bf16(n * c, 1.0);
        let g0 = rng.vec(n * c, 0.1);
        let out = both!(cuda, |be| {
            let tx = up(be, &x, DType::Bf16)?;
            let tdy = up(be, &dy, DType::Bf16)?;
            let l2 = poisoned(be, n * c, DType::F32)?;
            let nrm = poisoned(be, n, DType::F32)?;
            be.l2norm_fwd(&l2, &nrm, &tx, n, c);
            let dl2 = up(be, &g0, DType::F32)?;
            be.l2norm_bwd(&dl2, &tdy, &l2, &nrm, n, c);
            Ok(vec![("out", down(be, &l2)?), ("norm", down(be, &nrm)?), ("dinp", down(be, &dl2)?)])
        });
        compare(res, "l2norm", &size, TOL_BF16, out);
    }
}

/// The residual add fused with the layer norm after it, in place (`x` is `a`, the model's
/// way) and into a separate `x`, at row counts that are not multiples of the kernel's 8 rows
/// per block and widths that are not multiples of the warp.
fn add_layernorm(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let sizes: &[(usize, usize)] =
        if quick { &[(5, 100), (13, 37), (197, 768)] } else { &[(5, 100), (13, 37), (197, 768), (3 * 257, 1024)] };
    for &(n, c) in sizes {
        for in_place in [true, false] {
            let size = format!("n={n} c={c}{}", if in_place { " in place" } else { "" });
            let a: Vec<f32> = rng.vec_bf16(n * c, 2.0).iter().map(|v| v + 0.3).collect();
            let b = rng.vec_bf16(n * c, 1.0);
            let gamma = rng.vec(c, 1.0);
            let beta = rng.vec(c, 0.5);
            let dy = rng.vec_bf16(n * c, 1.0);
            let (g0, gg0, gb0) = (rng.vec(n * c, 0.1), rng.vec(c, 0.1), rng.vec(c, 0.1));
            let out = both!(cuda, |be| {
                let ta = up(be, &a, DType::Bf16)?;
                let tb = up(be, &b, DType::Bf16)?;
                let tg = up(be, &gamma, DType::F32)?;
                let tbe = up(be, &beta, DType::F32)?;
                let x = if in_place { ta.clone() } else { poisoned(be, n * c, DType::Bf16)? };
                let y = poisoned(be, n * c, DType::Bf16)?;
                let mean = poisoned(be, n, DType::F32)?;
                let rstd = poisoned(be, n, DType::F32)?;
                be.add_layernorm_fwd(&y, &x, &mean, &rstd, &ta, &tb, &tg, &tbe, n, c, 1e-5);
                let tdy = up(be, &dy, DType::Bf16)?;
                let dx = up(be, &g0, DType::F32)?;
                let dg = up(be, &gg0, DType::F32)?;
                let db = up(be, &gb0, DType::F32)?;
                be.add_layernorm_bwd(&dx, Some(&dg), Some(&db), &tdy, &x, &tg, &mean, &rstd, n, c);
                Ok(vec![
                    ("x = a + b", down(be, &x)?),
                    ("out", down(be, &y)?),
                    ("mean", down(be, &mean)?),
                    ("rstd", down(be, &rstd)?),
                    ("d(a, b)", down(be, &dx)?),
                    ("dgamma", down(be, &dg)?),
                    ("dbeta", down(be, &db)?),
                ])
            });
            compare(res, "layernorm", &format!("add_layernorm {size}"), TOL_BF16, out);
        }
    }
}

fn activation(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let n = if quick { 10_001 } else { 1_000_003 };
    for kind in [Activation::QuickGelu, Activation::Gelu] {
        let size = format!("n={n} {kind:?}");
        let x = rng.vec_bf16(n, 4.0);
        let dy = rng.vec_bf16(n, 1.0);
        let g0 = rng.vec(n, 0.1);
        let out = both!(cuda, |be| {
            let tx = up(be, &x, DType::Bf16)?;
            let y = poisoned(be, n, DType::F32)?;
            be.act_fwd(kind, &y, &tx);
            let tdy = up(be, &dy, DType::Bf16)?;
            let dx = up(be, &g0, DType::F32)?;
            be.act_bwd(kind, &dx, &tdy, &tx);
            Ok(vec![("out", down(be, &y)?), ("dinp", down(be, &dx)?)])
        });
        compare(res, "activation", &size, 1e-3, out);
    }
}

/// Attention at every head dimension the kernels take, sequence lengths that are and are not
/// multiples of the 64-row tiles, causal and not. The q and k entries reach +-4, so logits
/// (q . k / sqrt(hd)) reach tens and the softmax is sharp: a wrong mask or a misplaced key
/// moves the outputs by far more than bf16 round-off. dQ, dK and dV are judged apart, at
/// `TOL_ATTENTION`, so that a 2% error in one of them fails (see the test below).
fn attention(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let sizes: &[(usize, usize, usize, bool)] = if quick {
        &[(2, 50, 3, false), (2, 77, 2, true), (1, 130, 2, false)]
    } else {
        &[
            (2, 50, 3, false),
            (2, 50, 2, true),
            (2, 77, 2, true),
            (2, 77, 3, false),
            (1, 64, 1, false),
            (3, 130, 2, true),
            (1, 130, 2, false),
            (2, 197, 4, false),
            (1, 257, 2, false),
        ]
    };
    for &hd in crate::limits::CUDA.attention_head_dims.unwrap_or(&[64]) {
        for &(b, t, h, causal) in sizes {
            let size = format!("hd={hd} b={b} t={t} h={h}{}", if causal { " causal" } else { "" });
            let inputs = AttentionInputs::new(rng, b, t, h, hd);
            let out = (inputs.run(&Cpu, causal), inputs.run(cuda, causal));
            compare(res, "attention", &size, TOL_ATTENTION, out);
        }
    }
}

/// Relative tolerance of the attention outputs: bf16 operands (P and dS rounded to bf16 for
/// the second products) against the f32 CPU reference. A 2% error in a gradient must fail.
pub const TOL_ATTENTION: f64 = 1e-2;

/// Random attention inputs with sharp logits, rounded to bf16.
struct AttentionInputs {
    b: usize,
    t: usize,
    h: usize,
    hd: usize,
    qkv: Vec<f32>,
    dy: Vec<f32>,
    /// The gradient buffer's initial content (the op adds into it).
    g0: Vec<f32>,
}

impl AttentionInputs {
    fn new(rng: &mut Rng, b: usize, t: usize, h: usize, hd: usize) -> Self {
        let mut qkv = rng.vec_bf16(b * t * 3 * h * hd, 1.0);
        // q and k (the first 2 * h * hd columns of each row) up to +-4; v up to +-1.
        for row in qkv.chunks_exact_mut(3 * h * hd) {
            for x in &mut row[..2 * h * hd] {
                *x = bf16_to_f32(f32_to_bf16(*x * 4.0));
            }
        }
        let dy = rng.vec_bf16(b * t * h * hd, 1.0);
        let g0 = rng.vec(b * t * 3 * h * hd, 0.01);
        Self { b, t, h, hd, qkv, dy, g0 }
    }

    /// out, dQ, dK and dV (each [b, t, h, hd], gradients with the initial content included).
    fn run<B: Backend>(&self, be: &B, causal: bool) -> Result<Outs> {
        let &Self { b, t, h, hd, .. } = self;
        let tq = up(be, &self.qkv, DType::Bf16)?;
        let o = poisoned(be, b * t * h * hd, DType::Bf16)?;
        // (The saved state differs: probabilities on the CPU, log-sum-exps on CUDA.)
        let saved = poisoned(be, be.attention_saved_len(b, t, h), DType::F32)?;
        be.attention_fwd(&o, &saved, &tq, b, t, h, hd, causal);
        let tdy = up(be, &self.dy, DType::Bf16)?;
        let dq = up(be, &self.g0, DType::F32)?;
        be.attention_bwd(&dq, &tdy, &tq, &o, &saved, b, t, h, hd, causal);
        let dqkv = down(be, &dq)?;
        let part = |k: usize| -> Vec<f32> {
            dqkv.chunks_exact(3 * h * hd).flat_map(|row| row[k * h * hd..(k + 1) * h * hd].to_vec()).collect()
        };
        Ok(vec![("out", down(be, &o)?), ("dq", part(0)), ("dk", part(1)), ("dv", part(2))])
    }
}

fn embed(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let (b, img, p, d) = if quick { (2, 64, 16, 64) } else { (4, 224, 32, 768) };
    let np = (img / p) * (img / p);
    let size = format!("b={b} img={img} p={p} d={d}");
    let pixels = rng.vec(b * 3 * img * img, 1.0);
    let patches = rng.vec_bf16(b * np * d, 1.0);
    let cls = rng.vec(d, 1.0);
    let pos = rng.vec((np + 1) * d, 1.0);
    let dy = rng.vec_bf16(b * (np + 1) * d, 1.0);
    let (gp0, gc0, gpos0) = (rng.vec(b * np * d, 0.1), rng.vec(d, 0.1), rng.vec((np + 1) * d, 0.1));
    let out = both!(cuda, |be| {
        let tp = up(be, &pixels, DType::F32)?;
        let cols = poisoned(be, pixels.len(), DType::Bf16)?;
        be.im2col(&cols, &tp, b, img, p);
        let tpa = up(be, &patches, DType::Bf16)?;
        let tc = up(be, &cls, DType::F32)?;
        let tpos = up(be, &pos, DType::F32)?;
        let e = poisoned(be, b * (np + 1) * d, DType::Bf16)?;
        be.vision_embed_fwd(&e, &tpa, &tc, &tpos, b, np, d);
        let tdy = up(be, &dy, DType::Bf16)?;
        let (dp, dc, dpos) = (up(be, &gp0, DType::F32)?, up(be, &gc0, DType::F32)?, up(be, &gpos0, DType::F32)?);
        be.vision_embed_bwd(Some(&dp), Some(&dc), Some(&dpos), &tdy, b, np, d);
        Ok(vec![
            ("im2col", down(be, &cols)?),
            ("vision embed", down(be, &e)?),
            ("dpatches", down(be, &dp)?),
            ("dcls", down(be, &dc)?),
            ("dpos", down(be, &dpos)?),
        ])
    });
    compare(res, "embed", &format!("vision {size}"), 1e-2, out);

    // im2col's backward (col2im) against the CPU reference, adding into a non-zero gradient.
    let dcols = rng.vec(pixels.len(), 1.0);
    let dpx0 = rng.vec(pixels.len(), 0.1);
    let out = both!(cuda, |be| {
        let tdc = up(be, &dcols, DType::F32)?;
        let dpx = up(be, &dpx0, DType::F32)?;
        be.im2col_bwd(&dpx, &tdc, b, img, p);
        Ok(vec![("dpixels", down(be, &dpx)?)])
    });
    compare(res, "embed", &format!("im2col_bwd {size}"), TOL_F32, out);

    let (bt, t, dt, vocab) = if quick { (3, 77, 64, 1000) } else { (16, 77, 512, 49_408) };
    let size = format!("b={bt} t={t} d={dt} vocab={vocab}");
    // Repeated ids on purpose: their gradients must add up.
    let ids: Vec<i32> = (0..bt * t).map(|_| rng.below(vocab.min(50)) as i32).collect();
    let wte = rng.vec(vocab * dt, 1.0);
    let wpe = rng.vec(t * dt, 1.0);
    let seq = rng.vec_bf16(bt * t * dt, 1.0);
    let eot: Vec<i32> = (0..bt).map(|_| rng.below(t) as i32).collect();
    let dpool = rng.vec_bf16(bt * dt, 1.0);
    let (gwte0, gwpe0, gseq0) = (rng.vec(vocab * dt, 0.1), rng.vec(t * dt, 0.1), rng.vec(bt * t * dt, 0.1));
    let out = both!(cuda, |be| {
        let tid = up_i32(be, &ids)?;
        let te = up(be, &wte, DType::F32)?;
        let tpe = up(be, &wpe, DType::F32)?;
        let o = poisoned(be, bt * t * dt, DType::Bf16)?;
        be.token_embed_fwd(&o, &tid, &te, &tpe, bt, t, dt);
        let (dwte, dwpe) = (up(be, &gwte0, DType::F32)?, up(be, &gwpe0, DType::F32)?);
        let tdy = up(be, &seq, DType::Bf16)?;
        be.token_embed_bwd(Some(&dwte), Some(&dwpe), &tdy, &tid, bt, t, dt);
        let ts = up(be, &seq, DType::Bf16)?;
        let ti = up_i32(be, &eot)?;
        let pooled = poisoned(be, bt * dt, DType::Bf16)?;
        be.gather_rows(&pooled, &ts, &ti, bt, t, dt);
        let tdp = up(be, &dpool, DType::Bf16)?;
        let dseq = up(be, &gseq0, DType::F32)?;
        be.gather_rows_bwd(&dseq, &tdp, &ti, bt, t, dt);
        Ok(vec![
            ("token embed", down(be, &o)?),
            ("dwte", down(be, &dwte)?),
            ("dwpe", down(be, &dwpe)?),
            ("gather", down(be, &pooled)?),
            ("gather dinp", down(be, &dseq)?),
        ])
    });
    compare(res, "embed", &format!("token+pool {size}"), 1e-2, out);
    token_table_grad(cuda, rng, res, quick);
}

/// The token table's gradient at the default text batch (256 texts of 77 tokens, width 512),
/// texts of 8 to 60 tokens padded with id 0 as the tokenizer does: the padding id is a run of
/// thousands of tokens across many pieces of the sorted list, every text's start and end ids
/// runs of 256. Against the CPU, then against itself:
/// a second run from the same start must give the same bits.
fn token_table_grad(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let (b, t, d, vocab) = if quick { (64, 77, 96, 49_408) } else { (256, 77, 512, 49_408) };
    let size = format!("token_embed_bwd b={b} t={t} d={d} padded");
    let mut ids = vec![0i32; b * t];
    for row in ids.chunks_exact_mut(t) {
        let len = 8 + rng.below(53);
        row[0] = 49_406;
        for x in &mut row[1..len - 1] {
            *x = 1 + rng.below(2000) as i32;
        }
        row[len - 1] = 49_407;
    }
    let dy = rng.vec_bf16(b * t * d, 1.0);
    let g0 = rng.vec(vocab * d, 0.01);
    let cpu = (|| -> Result<Vec<f32>> {
        let (tid, dwte, tdy) = (up_i32(&Cpu, &ids)?, up(&Cpu, &g0, DType::F32)?, up(&Cpu, &dy, DType::Bf16)?);
        Cpu.token_embed_bwd(Some(&dwte), None, &tdy, &tid, b, t, d);
        down(&Cpu, &dwte)
    })();
    let gpu = || -> Result<Vec<f32>> {
        let (tid, dwte, tdy) = (up_i32(cuda, &ids)?, up(cuda, &g0, DType::F32)?, up(cuda, &dy, DType::Bf16)?);
        cuda.token_embed_bwd(Some(&dwte), None, &tdy, &tid, b, t, d);
        down(cuda, &dwte)
    };
    let (first, second) = (gpu(), gpu());
    let first_ok = first.as_ref().ok().cloned();
    compare(res, "embed", &size, 1e-4, (cpu.map(|v| vec![("dwte", v)]), first.map(|v| vec![("dwte", v)])));
    let same = match (first_ok, second) {
        (Some(a), Ok(b)) => a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        _ => false,
    };
    res.push(CheckResult {
        op: "embed".into(),
        size,
        output: "dwte run twice".into(),
        rel_err: 0.0,
        worst: 0.0,
        tol: 0.0,
        passed: same,
        note: if same { String::new() } else { "two runs differ (or failed): not deterministic".into() },
    });
}

fn failed(op: &str, size: &str, e: anyhow::Error) -> CheckResult {
    CheckResult {
        op: op.into(),
        size: size.into(),
        output: "-".into(),
        rel_err: f64::NAN,
        worst: f64::NAN,
        tol: 0.0,
        passed: false,
        note: format!("{e:#}"),
    }
}

fn normalized_rows(rng: &mut Rng, n: usize, d: usize) -> Vec<f32> {
    let mut v = rng.vec(n * d, 1.0);
    for r in v.chunks_exact_mut(d) {
        let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        for x in r.iter_mut() {
            *x = bf16_to_f32(f32_to_bf16(*x / norm));
        }
    }
    v
}

fn infonce(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    // Widths that are multiples of 64 and not (96, 1000: zero-padded columns), one chunk of
    // shared memory and several (768, 1000: past 512 the kernels walk the width in chunks).
    let sizes: &[(usize, usize, usize, usize)] = if quick {
        &[(64, 128, 64, 64), (100, 300, 96, 150), (70, 200, 768, 100)]
    } else {
        &[
            (64, 128, 64, 64),
            (100, 300, 96, 150),
            (100, 300, 128, 150),
            (256, 1024, 512, 512),
            (37, 37, 512, 0),
            (512, 4096, 512, 1024),
            (200, 600, 768, 200),
            (130, 390, 1000, 260),
            (64, 256, 1024, 128),
        ]
    };
    for &(local, global, dim, offset) in sizes {
        for ls in [(1.0f32 / 0.07).ln(), 100f32.ln()] {
            let size = format!("local={local} global={global} d={dim} off={offset} scale={:.1}", ls.exp());
            let all_txt = normalized_rows(rng, global, dim);
            let img = normalized_rows(rng, local, dim);
            let dims = InfoNceDims { local, global, dim, offset };
            let g = |rng: &mut Rng, n| rng.vec(n, 1e-3);
            let (gi, gat) = (g(rng, local * dim), g(rng, global * dim));
            // Another rank's column maxima above this one's by up to 2: the rescale then does
            // real work (and the column log-sum-exps come out the same).
            let other: Vec<f32> = rng.vec(global, 1.0).iter().map(|x| 1.0 + x).collect();
            let out = both!(cuda, |be| {
                let (ti, tat) = (up(be, &img, DType::Bf16)?, up(be, &all_txt, DType::Bf16)?);
                let tls = up(be, &[ls], DType::F32)?;
                let loss = poisoned(be, 1, DType::F32)?;
                let (row_lse, pos) = (poisoned(be, local, DType::F32)?, poisoned(be, local, DType::F32)?);
                let (col_max, col_sum) = (poisoned(be, global, DType::F32)?, poisoned(be, global, DType::F32)?);
                let col_lse = poisoned(be, global, DType::F32)?;
                be.infonce_block_fwd(&row_lse, &pos, &col_max, &col_sum, &ti, &tat, &tls, dims);
                let fwd_max = down(be, &col_max)?;
                let fwd_sum = down(be, &col_sum)?;
                let gmax: Vec<f32> = fwd_max.iter().zip(&other).map(|(m, o)| m.max(m + o)).collect();
                let gmax_t = up(be, &gmax, DType::F32)?;
                be.infonce_col_rescale(&col_sum, &col_max, &gmax_t);
                be.infonce_block_loss(&loss, &col_lse, &row_lse, &pos, &gmax_t, &col_sum, dims);
                let (di, dat) = (up(be, &gi, DType::F32)?, up(be, &gat, DType::F32)?);
                let dls = up(be, &[0.25], DType::F32)?;
                be.infonce_block_bwd(&di, &dat, Some(&dls), 1.0, &ti, &tat, &tls, &row_lse, &col_lse, dims);
                Ok(vec![
                    ("loss", down(be, &loss)?),
                    ("row_lse", down(be, &row_lse)?),
                    ("pos", down(be, &pos)?),
                    ("col_max", fwd_max),
                    ("col_sum", fwd_sum),
                    ("col_sum rescaled", down(be, &col_sum)?),
                    ("col_lse", down(be, &col_lse)?),
                    ("d_img", down(be, &di)?),
                    ("d_all_txt", down(be, &dat)?),
                    ("d_logit_scale", down(be, &dls)?),
                ])
            });
            compare(res, "infonce", &size, TOL_BF16, out);
        }
    }
}

fn adamw(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let n = if quick { 10_007 } else { 3_000_017 };
    let size = format!("n={n}");
    let p = rng.vec(n, 1.0);
    let g = rng.vec(n, 0.1);
    let m0 = rng.vec(n, 0.01);
    let v0: Vec<f32> = rng.vec(n, 1e-4).iter().map(|x| x.abs()).collect();
    let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.2, step: 7 };
    let out = both!(cuda, |be| {
        let (tp, tg, tm, tv) =
            (up(be, &p, DType::F32)?, up(be, &g, DType::F32)?, up(be, &m0, DType::F32)?, up(be, &v0, DType::F32)?);
        be.adamw(&tp, &tg, &tm, &tv, hp);
        Ok(vec![("param", down(be, &tp)?), ("m", down(be, &tm)?), ("v", down(be, &tv)?)])
    });
    compare(res, "adamw", &size, TOL_F32, out);

    // The same update writing the bf16 copy of the weights; poisoned, so an unwritten element
    // fails. Both backends round to nearest even: the copies agree to the last bit unless the
    // f32 masters differ across a rounding boundary (then by one bf16 step, within 1e-2).
    let out = both!(cuda, |be| {
        let (tp, tg, tm, tv) =
            (up(be, &p, DType::F32)?, up(be, &g, DType::F32)?, up(be, &m0, DType::F32)?, up(be, &v0, DType::F32)?);
        let copy = poisoned(be, n, DType::Bf16)?;
        be.adamw_with_bf16_copy(&tp, &tg, &tm, &tv, Some(&copy), hp);
        let master = down(be, &tp)?;
        let rounded: Vec<f32> = master.iter().map(|&x| crate::bf16::round_bf16(x)).collect();
        let copied = down(be, &copy)?;
        // 0 where the copy is the master weight rounded, 1 elsewhere (compared as a count).
        let off: f32 = rounded.iter().zip(&copied).map(|(a, b)| (a != b) as i32 as f32).sum();
        Ok(vec![("param (with copy)", master), ("bf16 copy", copied), ("copy != round(param)", vec![off + 1.0])])
    });
    compare(res, "adamw", &format!("{size} bf16 copy"), 1e-2, out);
}

/// BCE with logits, plain and masked (about a third of the entries left out), f32 and bf16
/// logits, at lengths that are not multiples of the 256-thread block; then a mask of zeros
/// only, whose loss must be exactly 0 and whose backward must add nothing.
fn bce(cuda: &Cuda, rng: &mut Rng, res: &mut Vec<CheckResult>, quick: bool) {
    let sizes: &[usize] = if quick { &[14, 14 * 37, 70_001] } else { &[14, 14 * 37, 70_001, 14 * 4096 + 3] };
    for &n in sizes {
        for (masked, dt) in [(false, DType::F32), (true, DType::F32), (true, DType::Bf16)] {
            let size =
                format!("n={n}{}{}", if masked { " masked" } else { "" }, if dt == DType::Bf16 { " bf16" } else { "" });
            let x = rng.vec_bf16(n, 6.0);
            // Soft targets too: any value in [0, 1].
            let y: Vec<f32> =
                (0..n).map(|_| if rng.below(4) == 0 { rng.uniform().abs() } else { rng.below(2) as f32 }).collect();
            let mut mask: Vec<f32> = (0..n).map(|_| (rng.below(3) != 0) as i32 as f32).collect();
            mask[0] = 1.0;
            let g0 = rng.vec(n, 1e-3);
            let out = both!(cuda, |be| {
                let (tx, ty) = (up(be, &x, dt)?, up(be, &y, DType::F32)?);
                let tm = if masked { Some(up(be, &mask, DType::F32)?) } else { None };
                let loss = poisoned(be, 1, DType::F32)?;
                be.bce_with_logits_fwd(&loss, &tx, &ty, tm.as_ref());
                let dx = up(be, &g0, DType::F32)?;
                be.bce_with_logits_bwd(&dx, &tx, &ty, tm.as_ref(), 3.0);
                Ok(vec![("loss", down(be, &loss)?), ("dlogits", down(be, &dx)?)])
            });
            compare(res, "bce", &size, 1e-4, out);
        }
    }
    let n = 1000;
    let size = format!("n={n} all masked");
    let r = (|| -> Result<Vec<CheckResult>> {
        let (tx, ty) = (up(cuda, &rng.vec(n, 4.0), DType::F32)?, up(cuda, &rng.vec(n, 1.0), DType::F32)?);
        let tm = up(cuda, &vec![0.0; n], DType::F32)?;
        let loss = poisoned(cuda, 1, DType::F32)?;
        cuda.bce_with_logits_fwd(&loss, &tx, &ty, Some(&tm));
        let g0 = rng.vec(n, 1.0);
        let dx = up(cuda, &g0, DType::F32)?;
        cuda.bce_with_logits_bwd(&dx, &tx, &ty, Some(&tm), 1.0);
        let exact = |output: &str, ok: bool| CheckResult {
            op: "bce".into(),
            size: size.clone(),
            output: output.into(),
            rel_err: 0.0,
            worst: 0.0,
            tol: 0.0,
            passed: ok,
            note: if ok { String::new() } else { "expected exactly 0 / unchanged".into() },
        };
        Ok(vec![exact("loss is 0", down(cuda, &loss)? == [0.0]), exact("dlogits unchanged", down(cuda, &dx)? == g0)])
    })();
    match r {
        Ok(v) => res.extend(v),
        Err(e) => res.push(failed("bce", &size, e)),
    }
}

/// The per-op profiler on CUDA: with `crate::profile` on, each op is timed by a pair of CUDA
/// events and lands in the profiler's table at the next synchronisation, as
/// `coordinator bench train-step --profile --device cuda` reads it.
fn op_timing(cuda: &Cuda) -> CheckResult {
    use crate::profile;
    let size = "n=4194304, 3 launches";
    let r = (|| -> Result<Vec<(&'static str, u64, f64)>> {
        let t = cuda.alloc(1 << 22, DType::F32)?;
        cuda.synchronize()?;
        let _ = profile::take();
        profile::enable(true);
        for _ in 0..3 {
            cuda.fill(&t, 1.5);
        }
        cuda.scale(&t, 2.0);
        profile::enable(false);
        cuda.synchronize()?;
        Ok(profile::take())
    })();
    profile::enable(false);
    let mut out = CheckResult {
        op: "op timing".into(),
        size: size.into(),
        output: "profiler rows".into(),
        rel_err: 0.0,
        worst: 0.0,
        tol: 0.0,
        passed: false,
        note: String::new(),
    };
    match r {
        Ok(rows) => {
            let get = |op: &str| rows.iter().find(|r| r.0 == op).map(|r| (r.1, r.2));
            match (get("fill"), get("scale")) {
                (Some((3, tf)), Some((1, ts))) if tf > 0.0 && ts > 0.0 && tf.is_finite() && ts.is_finite() => {
                    out.passed = true;
                    out.note = format!("fill 3 calls {:.3} ms, scale 1 call {:.3} ms", tf * 1e3, ts * 1e3);
                }
                _ => out.note = format!("unexpected profiler rows {rows:?}"),
            }
        }
        Err(e) => out.note = format!("{e:#}"),
    }
    out
}

/// The results as a fixed-width table, failures first.
pub fn table(res: &[CheckResult]) -> String {
    let mut rows: Vec<&CheckResult> = res.iter().collect();
    rows.sort_by_key(|r| r.passed);
    let mut s =
        format!("{:<18} {:<44} {:<20} {:>10} {:>8} {:>8}  result\n", "op", "size", "output", "rel err", "worst", "tol");
    for r in rows {
        s += &format!(
            "{:<18} {:<44} {:<20} {:>10.2e} {:>8.2} {:>8.0e}  {}{}\n",
            r.op,
            r.size,
            r.output,
            r.rel_err,
            r.worst,
            r.tol,
            if r.passed { "ok" } else { "FAIL" },
            if r.note.is_empty() { String::new() } else { format!(" ({})", r.note) }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_a_gpu_check() {
        for f in crate::families::FAMILIES {
            assert!(harness(f.name).is_some(), "no GPU check for {}", f.name);
        }
        assert!(harness("ceilings").is_none());
    }

    /// The attention check catches a 2% error in one gradient: the CPU against itself with dK
    /// scaled by 1.02 fails at `TOL_ATTENTION`, unscaled it passes. (Sharp logits keep the
    /// gradients well above the buffer's initial content, which would otherwise dilute it.)
    #[test]
    fn attention_check_fails_a_two_percent_gradient_error() {
        let mut rng = Rng::from_clock();
        for causal in [false, true] {
            let inputs = AttentionInputs::new(&mut rng, 2, 50, 2, 32);
            let outs = inputs.run(&Cpu, causal).unwrap();
            let (_, dk) = &outs[2];
            let bad: Vec<f32> = dk.iter().map(|x| x * 1.02).collect();
            let seed = rng.seed();
            let r = judge("attention", "test", "dk", dk, &bad, TOL_ATTENTION);
            assert!(!r.passed, "seed {seed}: a 2% dK error passed: {r:?}");
            assert!(judge("attention", "test", "dk", dk, dk, TOL_ATTENTION).passed);
        }
    }
}
