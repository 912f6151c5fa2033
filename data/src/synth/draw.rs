//! Drawing primitives on an attenuation buffer: soft-edged segments, bands and noise fields.
//! Everything is additive in attenuation units; the tone curve turns it into brightness later.

use rand::Rng;

/// Maps the canonical anatomy frame (unit = image width, midline at x = 0.5) to pixels, with the
/// patient's own shift and size.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub w: usize,
    pub h: usize,
    /// Patient centre in image-normalised units.
    pub xc: f32,
    pub yc: f32,
    /// Patient scale (1 = canonical size).
    pub sc: f32,
    /// Vertical pixel offset that centres the square anatomy frame in a taller image.
    pub y0: f32,
}

impl Frame {
    /// Canonical coordinates to pixel coordinates (pixel centres at +0.5).
    #[inline]
    pub fn to_px(&self, cx: f32, cy: f32) -> (f32, f32) {
        let w = self.w as f32;
        (((cx - 0.5) * self.sc + self.xc) * w, ((cy - 0.5) * self.sc + self.yc) * w + self.y0)
    }
    /// Pixel coordinates to canonical coordinates.
    #[inline]
    pub fn to_canon(&self, px: f32, py: f32) -> (f32, f32) {
        let w = self.w as f32;
        ((px / w - self.xc) / self.sc + 0.5, ((py - self.y0) / w - self.yc) / self.sc + 0.5)
    }
    /// Canonical length to pixels.
    #[inline]
    pub fn len_px(&self, l: f32) -> f32 {
        l * self.sc * self.w as f32
    }
}

/// A thick segment with a rounded (parabolic) profile, added to `buf`. When `weight` is given the
/// amount is multiplied by it per pixel (lung markings only show where there is air).
#[allow(clippy::too_many_arguments)]
pub fn segment(
    buf: &mut [f32],
    f: &Frame,
    p0: (f32, f32),
    p1: (f32, f32),
    half_width: f32,
    amp: f32,
    weight: Option<&[f32]>,
) {
    let hw_true = f.len_px(half_width);
    // Sub-pixel lines keep their integrated density by widening and dimming.
    let hw = hw_true.max(0.8);
    let amp = amp * (hw_true / hw).min(1.0);
    let inv_hw2 = 1.0 / (hw * hw);
    near_segment(f, p0, p1, hw, |i, _, e2| {
        let d2 = e2 * inv_hw2;
        if d2 < 1.0 {
            let wgt = weight.map_or(1.0, |w| w[i]);
            buf[i] += amp * (1.0 - d2) * wgt;
        }
    });
}

/// Visits every pixel within `reach` pixels of the bounding box of the segment `p0`-`p1`
/// (canonical points) with its index, the position `t` in [0, 1] of its nearest point on the
/// segment, and its squared distance in pixels to that point.
#[inline]
fn near_segment(f: &Frame, p0: (f32, f32), p1: (f32, f32), reach: f32, mut visit: impl FnMut(usize, f32, f32)) {
    let (x0, y0) = f.to_px(p0.0, p0.1);
    let (x1, y1) = f.to_px(p1.0, p1.1);
    let (w, h) = (f.w as i32, f.h as i32);
    let xa = ((x0.min(x1) - reach - 1.0).floor() as i32).max(0);
    let xb = ((x0.max(x1) + reach + 1.0).ceil() as i32).min(w - 1);
    let ya = ((y0.min(y1) - reach - 1.0).floor() as i32).max(0);
    let yb = ((y0.max(y1) + reach + 1.0).ceil() as i32).min(h - 1);
    if xa > xb || ya > yb {
        return;
    }
    let (dx, dy) = (x1 - x0, y1 - y0);
    let len2 = (dx * dx + dy * dy).max(1e-6);
    for py in ya..=yb {
        let fy = py as f32 + 0.5;
        let row = py as usize * f.w;
        for px in xa..=xb {
            let fx = px as f32 + 0.5;
            let t = (((fx - x0) * dx + (fy - y0) * dy) / len2).clamp(0.0, 1.0);
            let ex = fx - (x0 + t * dx);
            let ey = fy - (y0 + t * dy);
            visit(row + px as usize, t, ex * ex + ey * ey);
        }
    }
}

/// A tube along a polyline (a vessel seen side-on): each pixel takes the profile of its nearest
/// segment, so the joints do not double up as `polyline` would.
pub fn tube(buf: &mut [f32], f: &Frame, pts: &[(f32, f32)], half_width: f32, amp: f32) {
    let p: Vec<(f32, f32)> = pts.iter().map(|q| f.to_px(q.0, q.1)).collect();
    let hw = f.len_px(half_width).max(0.8);
    let xa = (p.iter().map(|q| q.0).fold(f32::MAX, f32::min) - hw - 1.0).floor().max(0.0) as usize;
    let xb = (p.iter().map(|q| q.0).fold(f32::MIN, f32::max) + hw + 1.0).ceil().min(f.w as f32 - 1.0);
    let ya = (p.iter().map(|q| q.1).fold(f32::MAX, f32::min) - hw - 1.0).floor().max(0.0) as usize;
    let yb = (p.iter().map(|q| q.1).fold(f32::MIN, f32::max) + hw + 1.0).ceil().min(f.h as f32 - 1.0);
    if xb < 0.0 || yb < 0.0 {
        return;
    }
    let inv_hw2 = 1.0 / (hw * hw);
    for py in ya..=yb as usize {
        let fy = py as f32 + 0.5;
        for px in xa..=xb as usize {
            let fx = px as f32 + 0.5;
            let mut d2 = f32::MAX;
            for s in p.windows(2) {
                let (dx, dy) = (s[1].0 - s[0].0, s[1].1 - s[0].1);
                let t = (((fx - s[0].0) * dx + (fy - s[0].1) * dy) / (dx * dx + dy * dy).max(1e-6)).clamp(0.0, 1.0);
                let (ex, ey) = (fx - s[0].0 - t * dx, fy - s[0].1 - t * dy);
                d2 = d2.min(ex * ex + ey * ey);
            }
            let q = d2 * inv_hw2;
            if q < 1.0 {
                buf[py * f.w + px] += amp * (1.0 - q).sqrt();
            }
        }
    }
}

/// A polyline through canonical points.
pub fn polyline(buf: &mut [f32], f: &Frame, pts: &[(f32, f32)], half_width: f32, amp: f32) {
    for w in pts.windows(2) {
        segment(buf, f, w[0], w[1], half_width, amp, None);
    }
}

/// A mostly-horizontal band drawn column by column: `centre(cx)` gives the canonical y of the
/// band's middle and its half thickness for canonical x in `[x0, x1]` (or None for a gap), and
/// `profile(d)` the amount at normalised distance d in [0, 1) from the middle.
pub fn band(
    buf: &mut [f32],
    f: &Frame,
    x0: f32,
    x1: f32,
    centre: impl Fn(f32) -> Option<(f32, f32)>,
    profile: impl Fn(f32) -> f32,
) {
    let (pa, _) = f.to_px(x0.min(x1), 0.0);
    let (pb, _) = f.to_px(x0.max(x1), 0.0);
    let pa = (pa.floor() as i32).max(0);
    let pb = (pb.ceil() as i32).min(f.w as i32 - 1);
    for px in pa..=pb {
        let (cx, _) = f.to_canon(px as f32 + 0.5, 0.0);
        let Some((cy, half)) = centre(cx) else { continue };
        let (_, pyc) = f.to_px(cx, cy);
        let hp = f.len_px(half).max(0.7);
        let ya = ((pyc - hp - 1.0).floor() as i32).max(0);
        let yb = ((pyc + hp + 1.0).ceil() as i32).min(f.h as i32 - 1);
        for py in ya..=yb {
            let d = ((py as f32 + 0.5 - pyc) / hp).abs();
            // A one-pixel soft edge keeps the band anti-aliased.
            let edge = ((1.0 - d) * hp + 0.5).clamp(0.0, 1.0);
            if edge > 0.0 {
                buf[py as usize * f.w + px as usize] += profile(d.min(1.0)) * edge;
            }
        }
    }
}

/// A long bone (or, with `p0 == p1`, a round one) seen in projection: a capsule whose radius goes
/// from `r0` at `p0` to `r1` at `p1`, drawn as a tube of cortex around marrow. The path through
/// the cortex is longest where the beam grazes it, so the margins are brighter than the middle,
/// as on a film. `cortex` is the cortical thickness as a fraction of the radius, `marrow` the
/// density of the medulla relative to the cortex.
#[allow(clippy::too_many_arguments)]
pub fn bone(
    buf: &mut [f32],
    f: &Frame,
    p0: (f32, f32),
    p1: (f32, f32),
    r0: f32,
    r1: f32,
    cortex: f32,
    marrow: f32,
    amp: f32,
) {
    let (rp0, rp1) = (f.len_px(r0).max(0.8), f.len_px(r1).max(0.8));
    let k2 = (1.0 - cortex).max(0.0).powi(2);
    near_segment(f, p0, p1, rp0.max(rp1), |i, t, e2| {
        let r = rp0 + (rp1 - rp0) * t;
        let d2 = e2 / (r * r);
        if d2 < 1.0 {
            let outer = (1.0 - d2).sqrt();
            let inner = (k2 - d2).max(0.0).sqrt();
            buf[i] += amp * (outer - inner + marrow * inner);
        }
    });
}

/// A filled convex polygon (canonical points, either winding), soft edge of `soft_px` pixels.
pub fn convex(buf: &mut [f32], f: &Frame, pts: &[(f32, f32)], amp: f32, soft_px: f32) {
    let px: Vec<(f32, f32)> = pts.iter().map(|p| f.to_px(p.0, p.1)).collect();
    let n = px.len();
    if n < 3 {
        return;
    }
    // Signed area picks the winding, so each edge's inward normal points inside.
    let area: f32 = (0..n).map(|i| px[i].0 * px[(i + 1) % n].1 - px[(i + 1) % n].0 * px[i].1).sum();
    let sgn = if area > 0.0 { 1.0 } else { -1.0 };
    let edges: Vec<(f32, f32, f32)> = (0..n)
        .map(|i| {
            let (a, b) = (px[i], px[(i + 1) % n]);
            let (ex, ey) = (b.0 - a.0, b.1 - a.1);
            let l = (ex * ex + ey * ey).sqrt().max(1e-6);
            let (nx, ny) = (-ey * sgn / l, ex * sgn / l);
            (nx, ny, -(nx * a.0 + ny * a.1))
        })
        .collect();
    let xa = (px.iter().map(|p| p.0).fold(f32::MAX, f32::min) - soft_px).floor().max(0.0) as usize;
    let xb = (px.iter().map(|p| p.0).fold(f32::MIN, f32::max) + soft_px).ceil().min(f.w as f32 - 1.0);
    let ya = (px.iter().map(|p| p.1).fold(f32::MAX, f32::min) - soft_px).floor().max(0.0) as usize;
    let yb = (px.iter().map(|p| p.1).fold(f32::MIN, f32::max) + soft_px).ceil().min(f.h as f32 - 1.0);
    if xb < 0.0 || yb < 0.0 {
        return;
    }
    let inv = 1.0 / soft_px.max(0.5);
    for py in ya..=yb as usize {
        let fy = py as f32 + 0.5;
        for px_ in xa..=xb as usize {
            let fx = px_ as f32 + 0.5;
            let d = edges.iter().map(|e| e.0 * fx + e.1 * fy + e.2).fold(f32::MAX, f32::min);
            let m = (d * inv + 0.5).clamp(0.0, 1.0);
            if m > 0.0 {
                buf[py * f.w + px_] += amp * m;
            }
        }
    }
}

/// Filled ellipse (rotated by `ang`), soft edge of `soft_px` pixels.
#[allow(clippy::too_many_arguments)]
pub fn ellipse(buf: &mut [f32], f: &Frame, c: (f32, f32), r: (f32, f32), ang: f32, amp: f32, soft_px: f32) {
    let (cx, cy) = f.to_px(c.0, c.1);
    let (rx, ry) = (f.len_px(r.0).max(0.5), f.len_px(r.1).max(0.5));
    let rm = rx.max(ry) + soft_px + 1.0;
    let (s, co) = ang.sin_cos();
    let xa = ((cx - rm).floor() as i32).max(0);
    let xb = ((cx + rm).ceil() as i32).min(f.w as i32 - 1);
    let ya = ((cy - rm).floor() as i32).max(0);
    let yb = ((cy + rm).ceil() as i32).min(f.h as i32 - 1);
    let rmin = rx.min(ry);
    for py in ya..=yb {
        for px in xa..=xb {
            let dx = px as f32 + 0.5 - cx;
            let dy = py as f32 + 0.5 - cy;
            let u = (dx * co + dy * s) / rx;
            let v = (-dx * s + dy * co) / ry;
            let q = (u * u + v * v).sqrt();
            let m = ((1.0 - q) * rmin / soft_px.max(0.5) + 0.5).clamp(0.0, 1.0);
            if m > 0.0 {
                buf[py as usize * f.w + px as usize] += amp * m;
            }
        }
    }
}

/// Bilinear value noise on an `n` x `n` lattice over the unit square, values in [0, 1].
pub struct ValueNoise {
    n: usize,
    g: Vec<f32>,
}

impl ValueNoise {
    pub fn new(rng: &mut impl Rng, n: usize) -> Self {
        ValueNoise { n, g: (0..(n + 1) * (n + 1)).map(|_| rng.random::<f32>()).collect() }
    }
    #[inline]
    pub fn at(&self, x: f32, y: f32) -> f32 {
        let s = self.n as f32;
        let fx = (x * s).clamp(0.0, s - 1e-3);
        let fy = (y * s).clamp(0.0, s - 1e-3);
        let (ix, iy) = (fx as usize, fy as usize);
        let (tx, ty) = (fx - ix as f32, fy - iy as f32);
        let n1 = self.n + 1;
        let g = &self.g;
        let a = g[iy * n1 + ix] + (g[iy * n1 + ix + 1] - g[iy * n1 + ix]) * tx;
        let b = g[(iy + 1) * n1 + ix] + (g[(iy + 1) * n1 + ix + 1] - g[(iy + 1) * n1 + ix]) * tx;
        a + (b - a) * ty
    }
}

/// In-place separable [1, 2, 1] / 4 blur (edges clamped): rows from `buf` into `tmp`, then
/// columns from `tmp` back into `buf`. The interior loops run over zipped slices, so they carry
/// no bounds checks and vectorise.
pub fn blur121(buf: &mut [f32], w: usize, h: usize, tmp: &mut Vec<f32>) {
    tmp.resize(w * h, 0.0);
    if w < 2 || h < 2 {
        tmp.copy_from_slice(buf);
    }
    if w >= 2 {
        for (r, o) in buf.chunks_exact(w).zip(tmp.chunks_exact_mut(w)) {
            o[0] = 0.25 * (r[0] + r[1]) + 0.5 * r[0];
            o[w - 1] = 0.25 * (r[w - 2] + r[w - 1]) + 0.5 * r[w - 1];
            for (o, t) in o[1..w - 1].iter_mut().zip(r.windows(3)) {
                *o = 0.25 * (t[0] + t[2]) + 0.5 * t[1];
            }
        }
    }
    if h >= 2 {
        for y in 0..h {
            let up = &tmp[y.saturating_sub(1) * w..][..w];
            let me = &tmp[y * w..][..w];
            let dn = &tmp[(y + 1).min(h - 1) * w..][..w];
            for (((o, &u), &m), &d) in buf[y * w..(y + 1) * w].iter_mut().zip(up).zip(me).zip(dn) {
                *o = 0.25 * (u + d) + 0.5 * m;
            }
        }
    } else {
        buf.copy_from_slice(tmp);
    }
}

#[inline]
pub fn ramp(d: f32) -> f32 {
    (d + 0.5).clamp(0.0, 1.0)
}

#[inline]
pub fn smooth(t: f32) -> f32 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The blur as first written: index arithmetic with clamped neighbours.
    fn blur_reference(buf: &mut [f32], w: usize, h: usize) {
        let t = buf.to_vec();
        for y in 0..h {
            for x in 0..w {
                let (l, r) = (t[y * w + x.saturating_sub(1)], t[y * w + (x + 1).min(w - 1)]);
                buf[y * w + x] = 0.25 * (l + r) + 0.5 * t[y * w + x];
            }
        }
        let t = buf.to_vec();
        for y in 0..h {
            for x in 0..w {
                let (u, d) = (t[y.saturating_sub(1) * w + x], t[(y + 1).min(h - 1) * w + x]);
                buf[y * w + x] = 0.25 * (u + d) + 0.5 * t[y * w + x];
            }
        }
    }

    #[test]
    fn blur_matches_the_reference_exactly() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rand::rng().random());
        for (w, h) in [(1, 1), (1, 5), (5, 1), (2, 2), (17, 9), (64, 77)] {
            let a: Vec<f32> = (0..w * h).map(|_| rng.random_range(-1.0f32..3.0)).collect();
            let mut fast = a.clone();
            let mut slow = a.clone();
            blur121(&mut fast, w, h, &mut Vec::new());
            blur_reference(&mut slow, w, h);
            assert_eq!(fast, slow, "{w}x{h}");
        }
    }
}
