//! What the optimiser moves: the image's parameters, and how they make a grayscale image.
//!
//! Both parameterisations end in a sigmoid, so the image stays in [0, 1] whatever the steps do.
//! `Pixels` holds one logit per pixel. `Fourier` holds the coefficients of an orthonormal 2-D
//! cosine basis (DCT-II), each scaled by 1/frequency: white steps on the coefficients become
//! steps with a 1/f spectrum on the image, the spectrum of natural images, so that the
//! optimisation favours smooth structure over the high-frequency patterns a pixel
//! parameterisation drifts into (Lucid's "decorrelated" parameterisation, with a real basis).

use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Parameterization {
    /// One logit per pixel.
    Pixels,
    /// Cosine-basis coefficients scaled by 1/frequency (smoother images).
    Fourier,
}

impl Parameterization {
    pub fn name(self) -> &'static str {
        match self {
            Parameterization::Pixels => "pixels",
            Parameterization::Fourier => "fourier",
        }
    }
}

/// The map from parameters to logits (before the sigmoid), for images of `n x n`.
pub enum Basis {
    Pixels,
    Cosine {
        n: usize,
        /// `c[k * n + m] = alpha_k cos(pi (m + 1/2) k / n)`: row k is the k-th basis vector.
        c: Vec<f32>,
        /// Per-coefficient scale, 1/frequency, normalised so that unit coefficients give
        /// logits of unit mean square (the pixel parameterisation's scale).
        scale: Vec<f32>,
    },
}

impl Basis {
    pub fn new(kind: Parameterization, n: usize) -> Self {
        match kind {
            Parameterization::Pixels => Basis::Pixels,
            Parameterization::Fourier => {
                let mut c = vec![0.0f32; n * n];
                for k in 0..n {
                    let alpha = if k == 0 { (1.0 / n as f64).sqrt() } else { (2.0 / n as f64).sqrt() };
                    for m in 0..n {
                        let angle = std::f64::consts::PI * (m as f64 + 0.5) * k as f64 / n as f64;
                        c[k * n + m] = (alpha * angle.cos()) as f32;
                    }
                }
                // Frequency of coefficient (k, l) in cycles per pixel; the constant term gets
                // the lowest non-zero one so that its scale stays finite.
                let floor = 1.0 / n as f64;
                let mut scale: Vec<f64> = (0..n * n)
                    .map(|i| {
                        let (k, l) = ((i / n) as f64, (i % n) as f64);
                        let f = (k * k + l * l).sqrt() / (2.0 * n as f64);
                        1.0 / f.max(floor)
                    })
                    .collect();
                // An orthonormal basis keeps the sum of squares: sum scale^2 = n^2 gives logits
                // of unit mean square for unit coefficients.
                let norm = (n as f64) / scale.iter().map(|s| s * s).sum::<f64>().sqrt();
                scale.iter_mut().for_each(|s| *s *= norm);
                Basis::Cosine { n, c, scale: scale.into_iter().map(|s| s as f32).collect() }
            }
        }
    }

    /// Logits of the image from its parameters (`n * n` each).
    pub fn logits(&self, params: &[f32]) -> Vec<f32> {
        match self {
            Basis::Pixels => params.to_vec(),
            Basis::Cosine { n, c, scale } => {
                // z = C^T (S . theta) C
                let s: Vec<f32> = params.iter().zip(scale).map(|(p, s)| p * s).collect();
                let t = matmul_tn(c, &s, *n); // C^T S
                matmul(&t, c, *n) // (C^T S) C
            }
        }
    }

    /// The parameters whose logits are `logits`: the inverse of [`Basis::logits`] (an
    /// orthonormal basis inverts by its transpose), for starting from a given image.
    pub fn params_for(&self, logits: &[f32]) -> Vec<f32> {
        // S . theta = C z C^T
        self.to_coefficients(logits, |u, s| u / s)
    }

    /// The gradient of the parameters from the gradient of the logits.
    pub fn backward(&self, d_logits: &[f32]) -> Vec<f32> {
        // d(S . theta) = C dz C^T, and d theta = S . d(S . theta)
        self.to_coefficients(d_logits, |u, s| u * s)
    }

    /// `C z C^T` (the coefficients of `z` in the basis), each combined with its scale by
    /// `with_scale`; the identity for pixels.
    fn to_coefficients(&self, z: &[f32], with_scale: impl Fn(f32, f32) -> f32) -> Vec<f32> {
        match self {
            Basis::Pixels => z.to_vec(),
            Basis::Cosine { n, c, scale } => {
                let t = matmul(c, z, *n);
                let u = matmul_nt(&t, c, *n);
                u.iter().zip(scale).map(|(&u, &s)| with_scale(u, s)).collect()
            }
        }
    }
}

/// The image in [0, 1] and, for the backward, its derivative with respect to the logits.
pub fn sigmoid(logits: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = logits.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect();
    let dx = x.iter().map(|&v| v * (1.0 - v)).collect();
    (x, dx)
}

/// The logit of gray values, clamped to [`LOGIT_FLOOR`, 1 - `LOGIT_FLOOR`] first: a black or
/// white pixel of a starting image would need an infinite logit, and one that far out could
/// not move (the sigmoid's slope there is ~0).
pub fn logit(gray: &[f32]) -> Vec<f32> {
    gray.iter()
        .map(|&x| {
            let x = x.clamp(LOGIT_FLOOR, 1.0 - LOGIT_FLOOR);
            (x / (1.0 - x)).ln()
        })
        .collect()
}

/// How close to black or white a starting image's pixels may be (see [`logit`]): 0.02 keeps
/// the slope at 0.02 of its peak, so the steps can still change them.
pub const LOGIT_FLOOR: f32 = 0.02;

/// `a b` for `n x n` row-major matrices.
fn matmul(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * n];
    for i in 0..n {
        let row = &mut out[i * n..(i + 1) * n];
        for k in 0..n {
            let x = a[i * n + k];
            for (o, &y) in row.iter_mut().zip(&b[k * n..(k + 1) * n]) {
                *o += x * y;
            }
        }
    }
    out
}

/// `a^T b`.
fn matmul_tn(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * n];
    for k in 0..n {
        for i in 0..n {
            let x = a[k * n + i];
            let row = &mut out[i * n..(i + 1) * n];
            for (o, &y) in row.iter_mut().zip(&b[k * n..(k + 1) * n]) {
                *o += x * y;
            }
        }
    }
    out
}

/// `a b^T`.
fn matmul_nt(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = a[i * n..(i + 1) * n].iter().zip(&b[j * n..(j + 1) * n]).map(|(x, y)| x * y).sum();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(model::testkit::seed("IMAGINE_SEED"))
    }

    #[test]
    fn the_cosine_basis_is_orthonormal() {
        let n = 12;
        let Basis::Cosine { c, .. } = Basis::new(Parameterization::Fourier, n) else { panic!("not a cosine basis") };
        let cct = matmul_nt(&c, &c, n);
        for i in 0..n {
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((cct[i * n + j] - want).abs() <= 1e-5, "C C^T[{i},{j}] = {}", cct[i * n + j]);
            }
        }
    }

    /// The backward is the adjoint of the forward: <dz, z(theta)> = <backward(dz), theta>
    /// for a linear map, checked in f64 sums on random inputs.
    #[test]
    fn the_backward_is_the_adjoint() {
        let mut r = rng();
        for kind in [Parameterization::Pixels, Parameterization::Fourier] {
            let n = 10;
            let basis = Basis::new(kind, n);
            let theta: Vec<f32> = (0..n * n).map(|_| r.random_range(-1.0..1.0)).collect();
            let dz: Vec<f32> = (0..n * n).map(|_| r.random_range(-1.0..1.0)).collect();
            let z = basis.logits(&theta);
            let g = basis.backward(&dz);
            let lhs: f64 = dz.iter().zip(&z).map(|(&a, &b)| a as f64 * b as f64).sum();
            let rhs: f64 = g.iter().zip(&theta).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!((lhs - rhs).abs() <= 1e-4 + 1e-4 * lhs.abs(), "{kind:?}: {lhs} vs {rhs}");
        }
    }

    /// Starting from an image: its parameters give back its logits, in both bases.
    #[test]
    fn params_for_inverts_the_logits() {
        let mut r = rng();
        for kind in [Parameterization::Pixels, Parameterization::Fourier] {
            let n = 12;
            let basis = Basis::new(kind, n);
            let gray: Vec<f32> = (0..n * n).map(|_| r.random_range(0.05..0.95)).collect();
            let z = logit(&gray);
            let back = basis.logits(&basis.params_for(&z));
            for (k, (a, b)) in z.iter().zip(&back).enumerate() {
                assert!((a - b).abs() <= 1e-4 + 1e-4 * a.abs(), "{kind:?} logit {k}: {a} vs {b}");
            }
            let (img, _) = sigmoid(&back);
            assert!(img.iter().zip(&gray).all(|(a, b)| (a - b).abs() <= 1e-4), "{kind:?}: the image changed");
        }
        // Black and white are pulled in to the floor, so their logits stay finite.
        let z = logit(&[0.0, 1.0, 0.5]);
        assert!(z.iter().all(|v| v.is_finite()) && z[2] == 0.0 && (z[0] + z[1]).abs() < 1e-6, "{z:?}");
    }

    /// Unit white coefficients give logits of about unit mean square, low frequencies first.
    #[test]
    fn fourier_scale_favours_low_frequencies() {
        let n = 32;
        let Basis::Cosine { scale, .. } = Basis::new(Parameterization::Fourier, n) else {
            panic!("not a cosine basis")
        };
        let ms: f64 = scale.iter().map(|&s| (s as f64).powi(2)).sum::<f64>() / (n * n) as f64;
        assert!((ms - 1.0).abs() < 1e-4, "mean square scale {ms}");
        assert!(scale[1] > scale[n / 2] && scale[n / 2] > scale[n * n - 1]);
    }
}
