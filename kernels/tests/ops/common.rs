//! Shared test helpers: seeded inputs, tolerance checks, finite differences.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random inputs from a seed taken from the clock (or `KERNELS_SEED`), printed so that a
/// failure can be reproduced.
pub struct Ctx {
    pub seed: u64,
    pub rng: StdRng,
}

pub fn ctx() -> Ctx {
    let seed = match std::env::var("KERNELS_SEED") {
        Ok(s) => s.parse().expect("KERNELS_SEED must be an integer"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    println!("seed {seed} (rerun with KERNELS_SEED={seed})");
    Ctx { seed, rng: StdRng::seed_from_u64(seed) }
}

impl Ctx {
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.random_range(lo..hi)).collect()
    }
    /// Uniform in [-1, 1).
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        self.uniform(n, -1.0, 1.0)
    }
    /// `k` distinct random indices below `n`, or all of them when `n <= k`.
    pub fn coords(&mut self, n: usize, k: usize) -> Vec<usize> {
        if n <= k {
            return (0..n).collect();
        }
        let mut picked = std::collections::BTreeSet::new();
        while picked.len() < k {
            picked.insert(self.rng.random_range(0..n));
        }
        picked.into_iter().collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }
}

pub fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Fails unless `|ours - want| <= atol + rtol |want|` everywhere; NaN and infinity fail.
/// Reports the worst element (relative to its allowance) and the seed.
pub fn assert_close(c: &Ctx, what: &str, ours: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(ours.len(), want.len(), "{what}: {} values where {} are expected", ours.len(), want.len());
    let mut worst = (0usize, 0.0f64);
    for (i, (&o, &w)) in ours.iter().zip(want).enumerate() {
        assert!(w.is_finite(), "{what}[{i}]: the reference is {w} (seed {})", c.seed);
        assert!(o.is_finite(), "{what}[{i}] = {o}, reference {w} (seed {})", c.seed);
        let ratio = (o as f64 - w).abs() / (atol + rtol * w.abs());
        if ratio > worst.1 {
            worst = (i, ratio);
        }
    }
    let (i, ratio) = worst;
    assert!(
        ratio <= 1.0,
        "{what}[{i}] = {} vs reference {}: error {:.3e} is {ratio:.2}x the allowance {atol:e} + {rtol:e}|ref| \
         ({} values, seed {})",
        ours[i],
        want[i],
        (ours[i] as f64 - want[i]).abs(),
        ours.len(),
        c.seed
    );
}

/// Same check for a subset of coordinates: `want[k]` is the reference at `ours[idx[k]]`.
pub fn assert_close_at(c: &Ctx, what: &str, ours: &[f32], idx: &[usize], want: &[f64], atol: f64, rtol: f64) {
    let picked: Vec<f32> = idx.iter().map(|&i| ours[i]).collect();
    assert_close(c, &format!("{what} (at {} sampled coordinates)", idx.len()), &picked, want, atol, rtol);
}

pub const FD_EPS: f64 = 1e-6;

/// Central difference of `f` at `x` along coordinate `i`.
pub fn fd(f: &dyn Fn(&[f64]) -> f64, x: &[f64], i: usize) -> f64 {
    let mut xp = x.to_vec();
    xp[i] = x[i] + FD_EPS;
    let up = f(&xp);
    xp[i] = x[i] - FD_EPS;
    let down = f(&xp);
    (up - down) / (2.0 * FD_EPS)
}

/// Checks an accumulated gradient: `ours` (the buffer after the backward) must equal
/// `start` (its value before) plus the finite-difference gradient of `f` at `x`, at the
/// coordinates `idx`.
#[allow(clippy::too_many_arguments)]
pub fn check_grad(
    c: &Ctx,
    what: &str,
    f: &dyn Fn(&[f64]) -> f64,
    x: &[f32],
    start: &[f32],
    ours: &[f32],
    idx: &[usize],
    atol: f64,
    rtol: f64,
) {
    let x64 = to64(x);
    let want: Vec<f64> = idx.iter().map(|&i| start[i] as f64 + fd(f, &x64, i)).collect();
    assert_close_at(c, what, ours, idx, &want, atol, rtol);
}

/// `sum out . r` in f64, the scalar loss whose gradients the tests check.
pub fn dot(out: &[f64], r: &[f32]) -> f64 {
    assert_eq!(out.len(), r.len());
    out.iter().zip(r).map(|(a, &b)| a * b as f64).sum()
}
