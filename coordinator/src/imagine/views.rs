//! The augmented views shown to CLIP at each step: a random crop and scale, a small rotation
//! and shift, resampled bilinearly to the model's input size, plus pixel noise. Optimising the
//! mean similarity over such views rewards images that keep their meaning under small changes
//! (the adversarial, pixel-exact patterns that fool one fixed view do not survive them).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The centre square of an 8-bit gray image, resampled to `size x size`, in [0, 1] (a real
/// radiograph shown beside, or used as the start of, a generated one).
pub fn centre_square(img: &data::dicom::GreyImage, size: usize) -> Vec<f32> {
    let side = img.w.min(img.h);
    let (x0, y0) = ((img.w - side) / 2, (img.h - side) / 2);
    let mut sq = vec![0.0f32; side * side];
    for y in 0..side {
        for x in 0..side {
            sq[y * side + x] = img.pixels[(y0 + y) * img.w + x0 + x] as f32 / 255.0;
        }
    }
    let mut out = vec![0.0f32; size * size];
    View::identity(side, size).gather(&sq, &mut out);
    out
}

/// Ranges of the random view transform.
#[derive(Clone, Copy, Debug)]
pub struct ViewRanges {
    /// The crop's side as a fraction of the image, drawn uniformly in `[min_scale, 1]`.
    pub min_scale: f64,
    /// Rotation, uniform in +-`max_degrees`.
    pub max_degrees: f64,
    /// Shift of the crop's centre beyond where it still fits, as a fraction of the image.
    pub max_shift: f64,
    /// Standard deviation of the Gaussian noise added to the view (image values in [0, 1]).
    pub noise: f32,
}

impl Default for ViewRanges {
    fn default() -> Self {
        Self { min_scale: 0.8, max_degrees: 5.0, max_shift: 0.03, noise: 0.02 }
    }
}

/// One view: for each of its `m x m` output pixels, the four source pixels of the image and
/// their bilinear weights (the forward gathers, the backward scatters the same weights).
pub struct View {
    taps: Vec<[(u32, f32); 4]>,
}

impl View {
    /// The whole image resampled to `m x m`, no augmentation (for scoring the result).
    pub fn identity(size: usize, m: usize) -> Self {
        Self::affine(size, m, 1.0, 0.0, 0.0, 0.0)
    }

    /// A random view of a `size x size` image at `m x m`.
    pub fn random(size: usize, m: usize, r: &ViewRanges, rng: &mut ChaCha8Rng) -> Self {
        let scale = rng.random_range(r.min_scale..=1.0);
        let theta = rng.random_range(-r.max_degrees..=r.max_degrees).to_radians();
        // Anywhere the crop fits, plus a small shift beyond (the border is clamped).
        let room = (1.0 - scale) / 2.0 + r.max_shift;
        let (dx, dy) = (rng.random_range(-room..=room), rng.random_range(-room..=room));
        Self::affine(size, m, scale, theta, dx, dy)
    }

    /// Output pixel (i, j) samples the image at centre + R(theta) * scale * size * (u, w), with
    /// (u, w) its position in [-1/2, 1/2]^2 and the centre shifted by (dx, dy) * size.
    fn affine(size: usize, m: usize, scale: f64, theta: f64, dx: f64, dy: f64) -> Self {
        let s = size as f64;
        let (cx, cy) = (s / 2.0 + dx * s, s / 2.0 + dy * s);
        let (cos, sin) = (theta.cos(), theta.sin());
        let side = scale * s;
        let last = (size - 1) as f64;
        let mut taps = Vec::with_capacity(m * m);
        for i in 0..m {
            let w = (i as f64 + 0.5) / m as f64 - 0.5;
            for j in 0..m {
                let u = (j as f64 + 0.5) / m as f64 - 0.5;
                // Continuous coordinates, pixel centres at integer + 1/2; clamped to the border.
                let x = (cx + side * (cos * u - sin * w) - 0.5).clamp(0.0, last);
                let y = (cy + side * (sin * u + cos * w) - 0.5).clamp(0.0, last);
                let (x0, y0) = (x.floor() as usize, y.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
                let (fx, fy) = ((x - x0 as f64) as f32, (y - y0 as f64) as f32);
                let at = |yy: usize, xx: usize| (yy * size + xx) as u32;
                taps.push([
                    (at(y0, x0), (1.0 - fx) * (1.0 - fy)),
                    (at(y0, x1), fx * (1.0 - fy)),
                    (at(y1, x0), (1.0 - fx) * fy),
                    (at(y1, x1), fx * fy),
                ]);
            }
        }
        Self { taps }
    }

    /// `out[k] = sum of the taps of output pixel k` over `image`.
    pub fn gather(&self, image: &[f32], out: &mut [f32]) {
        for (o, t) in out.iter_mut().zip(&self.taps) {
            *o = t.iter().map(|&(i, w)| w * image[i as usize]).sum();
        }
    }

    /// The adjoint of [`View::gather`]: adds `d_out`'s share into `d_image`.
    pub fn scatter(&self, d_out: &[f32], d_image: &mut [f32]) {
        for (&g, t) in d_out.iter().zip(&self.taps) {
            for &(i, w) in t {
                d_image[i as usize] += w * g;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn identity_at_the_same_size_copies() {
        let n = 9;
        let img: Vec<f32> = (0..n * n).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut out = vec![0.0; n * n];
        View::identity(n, n).gather(&img, &mut out);
        for (a, b) in out.iter().zip(&img) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }

    /// The scatter is the adjoint of the gather: <d, G x> = <G^T d, x>, on random views.
    #[test]
    fn scatter_is_the_adjoint_of_gather() {
        let mut rng = ChaCha8Rng::seed_from_u64(model::testkit::seed("IMAGINE_SEED"));
        for (size, m) in [(16, 8), (12, 20), (32, 32)] {
            let v = View::random(size, m, &ViewRanges::default(), &mut rng);
            let x: Vec<f32> = (0..size * size).map(|_| rng.random_range(-1.0..1.0)).collect();
            let d: Vec<f32> = (0..m * m).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut gx = vec![0.0; m * m];
            v.gather(&x, &mut gx);
            let mut gtd = vec![0.0; size * size];
            v.scatter(&d, &mut gtd);
            let lhs: f64 = d.iter().zip(&gx).map(|(&a, &b)| a as f64 * b as f64).sum();
            let rhs: f64 = gtd.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!((lhs - rhs).abs() <= 1e-4 + 1e-5 * lhs.abs(), "size {size} m {m}: {lhs} vs {rhs}");
            // Bilinear weights sum to one: a constant image stays constant.
            let mut c = vec![0.0; m * m];
            v.gather(&vec![0.7; size * size], &mut c);
            assert!(c.iter().all(|&y| (y - 0.7).abs() < 1e-5));
        }
    }
}
