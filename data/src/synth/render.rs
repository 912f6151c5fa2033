//! Draws a chest radiograph from a study's ground truth: anatomy first (soft tissue, lungs, heart,
//! mediastinum, spine, ribs, clavicles, diaphragm), findings as the changes they make to a film,
//! then the site's detector (tone curve, blur, grain).
//!
//! The model is additive attenuation: soft tissue adds, aerated lung removes, and opacities act by
//! replacing air (fluid, pus, collapse), so they only show inside the lungs, as on a real film.

use std::f32::consts::PI;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::draw::{band, blur121, bone, convex, ellipse, polyline, ramp, segment, smooth, tube, Frame, ValueNoise};
use super::site::Site;
use super::truth::{idx::*, Side, Truth, View, Zone};
use super::visibility::Visibility;

/// Per-thread buffers reused between images.
#[derive(Default)]
pub struct Scratch {
    a: Vec<f32>,
    vis: Vec<f32>,
    fill: Vec<f32>,
    tmp: Vec<f32>,
    /// The tone curve of the last site, kept because building it costs thousands of exp/powf.
    lut: Vec<f32>,
    lut_key: [u32; 3],
}

/// A focal opacity in one lung, in lung-local coordinates (u = distance from the midline).
#[derive(Clone, Copy, Debug)]
struct Blob {
    side: Side,
    u: f32,
    v: f32,
    ru: f32,
    rv: f32,
    cos: f32,
    sin: f32,
    dens: f32,
    /// Width of the soft edge relative to the radius (ill-defined vs sharp margins).
    soft: f32,
}

impl Blob {
    #[inline]
    fn at(&self, u: f32, v: f32, tex: f32) -> f32 {
        let du = u - self.u;
        let dv = v - self.v;
        let a = (du * self.cos + dv * self.sin) / self.ru;
        let b = (-du * self.sin + dv * self.cos) / self.rv;
        let q = a * a + b * b;
        if q > 2.0 {
            return 0.0;
        }
        // The texture roughens the margin: patchy airspace disease is never a clean ellipse.
        let m = ((1.0 - q + (tex - 0.5) * self.soft * 1.5) / self.soft).clamp(0.0, 1.0);
        self.dens * m
    }
}

/// The lung outline of one side, in lung-local coordinates.
#[derive(Clone, Copy, Debug)]
struct Lung {
    lmax: f32,
    apex: f32,
    dome: f32,
}

impl Lung {
    #[inline]
    fn lateral(&self, v: f32) -> f32 {
        let t = ((0.40 - v) / 0.31).max(0.0);
        self.lmax - 0.20 * t * t
    }
    /// The hemidiaphragm: a dome peaking near the mid-clavicular line that falls away steeply
    /// laterally (the cubic term), so it meets the chest wall in a sharp, deep costophrenic angle,
    /// and gently medially towards the cardiophrenic angle.
    #[inline]
    fn bottom(&self, u: f32) -> f32 {
        let a = (u - 0.17).max(0.0);
        let b = (0.17 - u).max(0.0);
        self.dome + 0.8 * a * a + 6.0 * a * a * a + 1.5 * b * b
    }
    /// The apex: a rounded cap rising above the clavicle, highest a little lateral to the spine.
    #[inline]
    fn top(&self, u: f32) -> f32 {
        self.apex + 2.6 * (u - 0.15) * (u - 0.15)
    }
    /// Soft inside-ness in [0, 1]; `e` is the edge width in canonical units.
    #[inline]
    fn mask(&self, u: f32, v: f32, e: f32, lat_v: f32) -> f32 {
        if v < self.apex - e || u > self.lmax + e || v > self.dome + 0.15 || u < 0.035 - e {
            return 0.0;
        }
        let ie = 1.0 / e;
        let m2 = ramp((lat_v - u) * ie);
        if m2 <= 0.0 {
            return 0.0;
        }
        let m1 = ramp((u - 0.035) * ie);
        let m3 = ramp((v - self.top(u)) * ie);
        let m4 = ramp((self.bottom(u) - v) * ie);
        m1 * m2 * m3 * m4
    }
}

/// Everything drawn for one image, chosen from the truth and the image's own randomness.
struct Scene {
    lungs: [Lung; 2],
    /// Heart extent from the midline to the right-atrial border and to the left-ventricular
    /// border (their sum over the thoracic width is the cardiothoracic ratio), and its height.
    heart_rw: f32,
    heart_lw: f32,
    heart_h: f32,
    med_hw: f32,
    blobs: Vec<Blob>,
    effusion: [f32; 2],
    edema: f32,
    ptx: [f32; 2],
    /// Severity of a rib fracture as drawn (visibility applied); 0 when there is none.
    fracture: f32,
    /// The first `n_pneumonic` blobs are consolidation / pneumonia (the RSNA boxes).
    n_pneumonic: usize,
    /// Centre of the humeral head (lateral offset from the midline, height).
    shoulder: (f32, f32),
}

fn side_index(s: Side) -> usize {
    match s {
        Side::Right => 0,
        _ => 1,
    }
}

fn zone_v(z: Zone, lung: &Lung) -> f32 {
    match z {
        Zone::Upper => lung.apex + 0.12,
        Zone::Middle => 0.42,
        Zone::Lower => lung.dome - 0.08,
    }
}

fn sides(s: Side) -> &'static [Side] {
    match s {
        Side::Both => &[Side::Right, Side::Left],
        Side::Right => &[Side::Right],
        Side::Left => &[Side::Left],
    }
}

/// The scene of a frontal film. Anatomy draws from `rng`, findings from `fr`: the anatomy of a
/// study is the same whichever findings it has (see [`render`]).
fn build_scene(rng: &mut impl Rng, fr: &mut impl Rng, t: &Truth, view: View, vis: &Visibility) -> Scene {
    let sev = |i: usize| vis.drawn(i, t.severity[i]);
    let ap = view == View::Ap;
    // Portable AP films are taken with less inspiration: higher domes, broader-looking heart.
    let dome = if ap { rng.random_range(0.62..0.67) } else { rng.random_range(0.67..0.72) };
    let mut lungs = [
        Lung { lmax: rng.random_range(0.38..0.41), apex: rng.random_range(0.085..0.105), dome },
        Lung { lmax: rng.random_range(0.38..0.41), apex: rng.random_range(0.085..0.105), dome: dome + 0.025 },
    ];
    if t.present(ATELECTASIS) {
        // Volume loss pulls the hemidiaphragm up on the collapsed side.
        for s in sides(t.side[ATELECTASIS]) {
            lungs[side_index(*s)].dome -= 0.035 * sev(ATELECTASIS);
        }
    }
    let thoracic = lungs[0].lmax + lungs[1].lmax;
    // Normal hearts span a range of sizes (habitus, inspiration), up to just under the 0.5 a
    // radiologist calls enlarged; an enlarged one starts just over it, so that mild cardiomegaly
    // is a judgement at the border, not a different silhouette.
    let mut ctr: f32 = rng.random_range(0.39..0.47) + if ap { 0.03 } else { 0.0 };
    if t.present(CARDIOMEGALY) {
        ctr = ctr.max(0.505 + 0.14 * sev(CARDIOMEGALY));
    }
    let hw = ctr * thoracic;
    // Under a third of the heart lies right of the midline (the right atrium), the rest left
    // (the left ventricle); an enlarged heart also grows taller.
    let heart_rw = hw * rng.random_range(0.27..0.32);
    let heart_lw = hw - heart_rw;
    let heart_h = 0.27 + 0.06 * (ctr - 0.45).max(0.0) / 0.2;
    let mut med_hw = rng.random_range(0.055..0.065) + if ap { 0.01 } else { 0.0 };
    // Supine AP films catch the shoulders higher and closer in.
    let shoulder = (
        rng.random_range(0.445..0.47) - if ap { 0.01 } else { 0.0 },
        rng.random_range(0.145..0.17) - if ap { 0.015 } else { 0.0 },
    );
    if t.present(ECM) {
        med_hw += 0.006 + 0.06 * sev(ECM);
    }

    let mut blobs = Vec::new();
    let push = |blobs: &mut Vec<Blob>,
                rng: &mut dyn rand::RngCore,
                s: Side,
                u: f32,
                v: f32,
                r: (f32, f32),
                dens: f32,
                soft: f32| {
        let ang: f32 = rng.random_range(-0.6..0.6);
        blobs.push(Blob { side: s, u, v, ru: r.0, rv: r.1, cos: ang.cos(), sin: ang.sin(), dens, soft });
    };
    let mut n_pneumonic = 0;
    for (i, dens, size, count) in [(CONSOLIDATION, 0.85, 0.09, 1), (PNEUMONIA, 0.7, 0.07, 2), (OPACITY, 0.45, 0.05, 3)]
    {
        if i == OPACITY {
            n_pneumonic = blobs.len();
        }
        if !t.present(i) {
            continue;
        }
        for s in sides(t.side[i]) {
            let lung = lungs[side_index(*s)];
            let v0 = zone_v(t.zone[i], &lung);
            let n = fr.random_range(1..=count);
            for _ in 0..n {
                let u = fr.random_range(0.14..lung.lmax - 0.06);
                let v = v0 + fr.random_range(-0.05..0.05);
                let r = size * (0.6 + 0.7 * sev(i));
                let r = (r * fr.random_range(0.8..1.3), r * fr.random_range(0.7..1.1));
                push(&mut blobs, fr, *s, u, v, r, dens * (0.2 + 0.8 * sev(i)).min(1.1), 0.5);
            }
        }
    }
    if t.present(ATELECTASIS) {
        // Plate-like (discoid) atelectasis: a thin, slightly oblique band at the base.
        for s in sides(t.side[ATELECTASIS]) {
            let lung = lungs[side_index(*s)];
            let u = fr.random_range(0.17..0.27);
            let v = lung.dome - fr.random_range(0.05..0.1);
            let r = (0.08 + 0.04 * sev(ATELECTASIS), 0.009 + 0.006 * sev(ATELECTASIS));
            push(&mut blobs, fr, *s, u, v, r, 0.8 * sev(ATELECTASIS).min(1.0), 0.35);
        }
    }
    if t.present(LESION) {
        let s = t.side[LESION];
        let lung = lungs[side_index(s)];
        let r = 0.012 + 0.03 * sev(LESION) * fr.random::<f32>();
        let u = fr.random_range(0.14..lung.lmax - 0.05);
        let v = zone_v(t.zone[LESION], &lung) + fr.random_range(-0.04..0.04);
        let rv = r * fr.random_range(0.85..1.0);
        push(&mut blobs, fr, s, u, v, (r, rv), 0.9 * (0.3 + 0.7 * sev(LESION)).min(1.0), 0.12);
    }
    if t.present(PLEURAL_OTHER) {
        // Pleural thickening / plaque: a lentiform density hugging the lateral chest wall.
        let s = t.side[PLEURAL_OTHER];
        let lung = lungs[side_index(s)];
        let v = zone_v(t.zone[PLEURAL_OTHER], &lung);
        let u = lung.lateral(v) - 0.008;
        let ang = 1.5;
        blobs.push(Blob {
            side: s,
            u,
            v,
            ru: 0.06 + 0.05 * sev(PLEURAL_OTHER),
            rv: 0.012 + 0.01 * sev(PLEURAL_OTHER),
            cos: f32::cos(ang),
            sin: f32::sin(ang),
            dens: 0.8,
            soft: 0.25,
        });
    }
    let mut effusion = [0.0; 2];
    if t.present(EFFUSION) {
        for s in sides(t.side[EFFUSION]) {
            effusion[side_index(*s)] = sev(EFFUSION);
        }
    }
    let mut ptx = [0.0; 2];
    if t.present(PNEUMOTHORAX) {
        ptx[side_index(t.side[PNEUMOTHORAX])] = sev(PNEUMOTHORAX);
    }
    let edema = if t.present(EDEMA) { sev(EDEMA) } else { 0.0 };
    let fracture = if t.present(FRACTURE) { sev(FRACTURE) } else { 0.0 };
    Scene { lungs, heart_rw, heart_lw, heart_h, med_hw, blobs, effusion, edema, ptx, fracture, n_pneumonic, shoulder }
}

/// Renders one image of `truth` in `view` as 8-bit grey, `w` x `h`, into `out`.
#[allow(clippy::too_many_arguments)]
pub fn render(
    rng: &mut impl Rng,
    truth: &Truth,
    view: View,
    site: &Site,
    w: usize,
    h: usize,
    visibility: &Visibility,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> Vec<[f32; 4]> {
    let n = w * h;
    let Scratch { a, vis, fill, tmp, lut, lut_key } = scratch;
    a.clear();
    a.resize(n, 0.0);
    vis.clear();
    vis.resize(n, 0.0);
    fill.clear();
    fill.resize(n, 0.0);
    let frame = Frame {
        w,
        h,
        xc: 0.5 + rng.random_range(-0.02..0.02),
        yc: 0.5 + rng.random_range(-0.015..0.03),
        // The film is a little wider than the chest: the shoulders and the humeral heads show at the
        // upper corners.
        sc: if truth.female { rng.random_range(0.8..0.9) } else { rng.random_range(0.85..0.95) },
        y0: (h as f32 - w as f32) * 0.5,
    };
    let boxes = match view {
        View::Lateral => {
            lateral(rng, truth, &frame, visibility, a, vis, fill);
            Vec::new()
        }
        _ => frontal(rng, truth, view, &frame, visibility, a, vis, fill),
    };
    // Technique differs from film to film (kVp and mAs chosen by hand): the whole film is denser
    // or lighter, with more or less contrast; the patient's build (`Truth::habitus`) adds to it
    // in the soft tissue. A finding cannot be read off the mean brightness of a region when the
    // mean moves this much without one. (The marker, drawn next, is lead: never scaled.)
    let technique = site.technique[0] + (site.technique[1] - site.technique[0]) * rng.random::<f32>();
    a.iter_mut().for_each(|x| *x *= technique);
    if site.marker {
        marker(a, &frame, view, rng.random_range(0.03..0.08));
    }
    film(rng, a, w, h, site);
    // One pass is the focal spot and screen's own point spread, which every film has; the site's
    // passes make some detectors softer still.
    for _ in 0..site.blur_passes + 1 {
        blur121(a, w, h, tmp);
    }
    let key = [site.exposure.to_bits(), site.gamma.to_bits(), site.offset.to_bits()];
    if lut.is_empty() || *lut_key != key {
        *lut = tone_curve(site);
        *lut_key = key;
    }
    expose(rng, a, site, lut, out);
    boxes
}

#[allow(clippy::too_many_arguments)]
fn frontal(
    rng: &mut impl Rng,
    t: &Truth,
    view: View,
    f: &Frame,
    visibility: &Visibility,
    a: &mut [f32],
    vis: &mut [f32],
    fill: &mut [f32],
) -> Vec<[f32; 4]> {
    let mut fr = ChaCha8Rng::seed_from_u64(rng.random());
    let sc = build_scene(rng, &mut fr, t, view, visibility);
    let (w, h) = (f.w, f.h);
    let e = 1.2 / f.len_px(1.0);
    let tex_lo = ValueNoise::new(rng, 10);
    let tex_hi = ValueNoise::new(rng, 36);
    // The aortic knob: the arch seen end-on, bulging left of the upper mediastinum.
    let knob_y = 0.27;
    let knob_r = 0.028 + (sc.med_hw - 0.06).max(0.0) * 0.5;
    let knob_x = sc.med_hw + 0.012;
    // The heart sits on the left hemidiaphragm; below it the abdomen hides it anyway.
    let heart_bot = sc.lungs[1].dome + 0.03;
    let heart_top = heart_bot - sc.heart_h;
    let carina = 0.33;
    let bubble = (0.5 + 0.17, sc.lungs[1].dome + 0.075);
    let ie = 1.0 / e;
    // Mediastinal and cardiac borders are curved surfaces seen tangentially: a softer edge than
    // the pixel-sharp ramp used for the skin line.
    let ie_sil = 1.0 / (2.2 * e);
    let breast_v = sc.lungs[1].dome - 0.05;
    // The upper arm: its axis starts over the humeral head (lateral offset from the midline,
    // height) and then hugs the chest wall, out of the film; its soft-tissue radius.
    let arm_p = (sc.shoulder.0 + 0.015, sc.shoulder.1 - 0.05);
    let arm_r = 0.08;
    let inv_arm_r2 = 1.0 / (arm_r * arm_r);
    for py in 0..h {
        let (_, cy) = f.to_canon(0.5, py as f32 + 0.5);
        // Everything that depends only on the row is computed once per row.
        // Neck, then the trapezius slope out to the shoulders, then the chest wall tapering
        // slightly towards the waist.
        // The arms and the deltoids (drawn apart) fill out the shoulders beyond the trapezius.
        let hwb = if cy < -0.08 {
            0.1
        } else if cy < 0.08 {
            0.1 + 0.33 * smooth((cy + 0.08) / 0.16)
        } else if cy < 0.26 {
            0.43 + 0.05 * smooth((cy - 0.08) / 0.18)
        } else {
            0.48 - 0.03 * (cy - 0.26)
        };
        let inv_hwb = 1.0 / hwb;
        // Above the shoulder the arm is the rounded deltoid cap; below it the axis leaves the
        // humeral head to run along the chest wall, its inner edge overlapping it (no gap of air).
        let arm_ey = (cy - arm_p.1).min(0.0);
        let arm_x = arm_p.0 + (hwb + 0.045 - arm_p.0) * smooth((cy - arm_p.1) / 0.2);
        let lat_v = [sc.lungs[0].lateral(cy), sc.lungs[1].lateral(cy)];
        // Cardiomediastinal silhouette, row by row, as its right and left borders measured from
        // the midline. Right: the SVC above, then the convex right atrium. Left: the aortic knob,
        // the pulmonary trunk below it, a shallow waist at the left atrial appendage, then the
        // long convex left ventricle down to the apex on the diaphragm.
        // The mediastinum widens downwards as the great vessels and hila join it.
        let med_w = sc.med_hw * (0.6 + 0.3 * smooth((cy - 0.06) / 0.22) + 0.15 * smooth((cy - 0.3) / 0.12));
        let hs = (cy - heart_top) / sc.heart_h;
        // Each chamber border swells out from the mediastinum to its widest point in the lower
        // third, then turns in a little towards the diaphragm (the cardiophrenic angles).
        let swell = |s0: f32, s1: f32, turn: f32, sharp: f32| {
            if hs < s0 {
                0.0
            } else if hs < s1 {
                (0.5 * PI * (hs - s0) / (s1 - s0)).sin().powf(sharp)
            } else {
                1.0 - turn * ((hs - s1) / (1.0 - s1)).powi(2)
            }
        };
        // The right atrium continues the SVC's line and bows out from it in one gentle arc (a
        // border that rose from the midline would read as a lobe of its own).
        let ra = med_w + (sc.heart_rw - med_w).max(0.0) * swell(0.25, 0.72, 0.3, 1.0);
        // The left ventricle leaves the mediastinum below the pulmonary trunk and slopes down and
        // out to its widest point (a rounded shoulder at the top reads as a second bulge).
        let lv = med_w + (sc.heart_lw - med_w).max(0.0) * swell(0.1, 0.74, 0.3, 1.0);
        let kq = (cy - knob_y) / knob_r;
        let knob = if kq.abs() < 1.0 { knob_x + knob_r * (1.0 - kq * kq).sqrt() * 0.55 } else { 0.0 };
        let pq = (cy - (knob_y + 0.07)) / 0.035;
        let trunk = if pq.abs() < 1.0 { med_w + 0.012 * (1.0 - pq * pq) } else { 0.0 };
        let top_off = ramp((cy + 0.02) * ie);
        let rb = med_w.max(ra) * top_off;
        let lb = (med_w + 0.006).max(knob).max(trunk).max(lv) * top_off;
        // Heart muscle and blood are denser in projection than the mediastinal fat above.
        let sil_dens = 0.1 + 0.07 * smooth(hs * 3.0);
        let sil_mid = 0.5 * (lb - rb);
        let sil_inv_half = 1.0 / (0.5 * (lb + rb)).max(1e-3);
        // Thoracic vertebrae (about 17 per unit height: twelve from the neck to the domes): the
        // bodies widen downwards; each level has a disc space, bright end plates and pedicles.
        let ph = (cy * 17.0).fract();
        let spine_hw = 0.026 + 0.012 * cy.clamp(0.0, 1.0);
        let spine_vert = if ph < 0.14 {
            0.45
        } else if !(0.22..=0.94).contains(&ph) {
            1.25
        } else {
            1.0
        };
        let trachea_row = if cy < carina { smooth((cy + 0.1) / 0.15) } else { 0.0 };
        let (cx0, _) = f.to_canon(0.5, 0.5);
        let dcx = 1.0 / (f.sc * w as f32);
        for px in 0..w {
            let cx = cx0 + px as f32 * dcx;
            let dx = cx - 0.5;
            let adx = dx.abs();
            // Body outline: neck, shoulders, chest wall; thicker in the middle.
            let body = ramp((hwb - adx) * ie);
            let i = py * w + px;
            // The arms hang beside the chest: the deltoid caps the shoulder and the upper arm runs
            // down and out of the film, overlapping the chest wall at the axilla.
            let arm = if adx > arm_x - arm_r {
                let (ex, ey) = (adx - arm_x, arm_ey);
                let d2 = ex * ex + ey * ey;
                let q = d2 * inv_arm_r2;
                if q < 1.0 {
                    (0.35 + 0.65 * (1.0 - q).sqrt()) * ramp((arm_r - d2.sqrt()) * ie)
                } else {
                    0.0
                }
            } else {
                0.0
            };
            if body <= 0.0 && arm <= 0.0 {
                a[i] = 0.0;
                continue;
            }
            // The trunk is an elliptic cylinder: its path length falls towards the skin, so the
            // soft tissue fades out at the edge instead of stopping in a step.
            let rr = (1.0 - (adx * inv_hwb) * (adx * inv_hwb)).max(0.0);
            let trunk = t.habitus * body * (0.3 + 0.7 * rr.sqrt());
            let arm = 0.6 * arm;
            let mut att = trunk.max(arm) + 0.3 * trunk.min(arm);
            // The silhouette hides most of the lung behind it; some retrocardiac lung remains.
            let sil = if dx > 0.0 { ramp((lb - dx) * ie_sil) } else { ramp((rb + dx) * ie_sil) };
            let (side, si) = if dx < 0.0 { (Side::Right, 0) } else { (Side::Left, 1) };
            let lung = &sc.lungs[si];
            let (u, v) = (adx, cy);
            // Below the hemidiaphragm: liver on the right, spleen and stomach on the left, as
            // dense as the heart, so the heart's lower border disappears into them.
            // The dome is the lung's highest floor point, so rows above it skip the evaluation.
            // Beyond the costophrenic angle there is no air-tissue interface: the step softens
            // into the chest wall instead of running on as a line to the skin.
            let abd = if v > lung.dome {
                smooth((v - lung.bottom(u.min(lung.lmax))) / (0.025 + 3.0 * (u - lung.lmax).max(0.0)))
            } else {
                0.0
            };
            let sil = sil * (1.0 - abd);
            att += 0.11 * abd;
            let occl = 0.85 * sil;
            if sil > 0.0 {
                let q = (dx - sil_mid) * sil_inv_half;
                att += sil_dens * sil * (0.55 + 0.45 * (1.0 - q * q).max(0.0).sqrt());
            }
            // Spine: rounded vertebral bodies, seen faintly through the heart.
            if adx < spine_hw + 0.012 {
                let q = adx / spine_hw;
                let sp = ramp((spine_hw - adx) * ie) * (1.0 - q * q).max(0.0).sqrt();
                att += 0.13 * sp * spine_vert;
                // Pedicles: paired ovals at each level; spinous process: a midline teardrop.
                let pd = ((adx - 0.7 * spine_hw) / 0.007).powi(2) + ((ph - 0.5) / 0.17).powi(2);
                if pd < 1.0 {
                    att += 0.07 * (1.0 - pd);
                }
                let sq = (adx / 0.006).powi(2) + ((ph - 0.8) / 0.13).powi(2);
                if sq < 1.0 {
                    att += 0.05 * (1.0 - sq);
                }
            }
            // Trachea: an air column down to the carina.
            if trachea_row > 0.0 && (dx - 0.004).abs() < 0.03 {
                att -= 0.2 * ramp((0.017 - (dx - 0.004).abs()) * ie) * trachea_row;
            }
            // Gastric bubble under the left hemidiaphragm.
            let bq = ((cx - bubble.0) / 0.055).powi(2) + ((cy - bubble.1) / 0.028).powi(2);
            if bq < 1.0 {
                att -= 0.45 * smooth((1.0 - bq) * 3.0);
            }
            let m = lung.mask(u, v, e, lat_v[si]);
            if m > 0.0 {
                // Air path length: least at the apex, least at the lateral edge where the ribcage
                // curves away, so lungs darken towards the base and the middle of each field.
                let thick =
                    (0.72 + 0.28 * smooth((v - lung.apex) / 0.22)) * (0.78 + 0.22 * smooth((lat_v[si] - u) / 0.06));
                let tx = tex_lo.at(cx, cy);
                let mut keep = 1.0f32; // fraction of the air left after opacities
                                       // Effusion: dependent fluid with a meniscus, higher at the lateral wall.
                let ef = sc.effusion[si];
                if ef > 0.0 {
                    let hgt = 0.01 + 0.24 * ef;
                    let cp = lung.bottom(lung.lmax);
                    let level = cp - hgt + 0.65 * hgt * (1.0 - u / lung.lmax).max(0.0);
                    keep *= 1.0 - 0.92 * ((v - level) / 0.025).clamp(0.0, 1.0);
                }
                if sc.edema > 0.0 {
                    let hu = (u - 0.1) / 0.13;
                    let hv = (v - 0.42) / 0.13;
                    let haze = (-(hu * hu + hv * hv) * 0.5).exp();
                    keep *= 1.0 - sc.edema * (0.55 * haze + 0.12) * (0.7 + 0.6 * tx);
                }
                let th = tex_hi.at(cx, cy);
                for b in &sc.blobs {
                    if b.side == side {
                        keep *= 1.0 - b.at(u, v, 0.5 * th + 0.5 * tx);
                    }
                }
                let mut air = m * thick * (1.0 - occl) * keep;
                let mut mark = air;
                let pt = sc.ptx[si];
                if pt > 0.0 {
                    // Pneumothorax: a rim of free air at the apex and lateral wall, no markings
                    // beyond a thin pleural line.
                    let d0 = 0.012 + 0.1 * pt;
                    let ext = 0.2 + 0.35 * pt;
                    let dd = d0 * (1.0 - ((v - lung.apex) / ext).clamp(0.0, 1.0).powi(2));
                    let line_u = lat_v[si] - dd;
                    let free = ramp((u - line_u) / e) * ramp(dd / e);
                    air = air * (1.0 - free) + m * free * 1.1;
                    mark *= 1.0 - free;
                    let lp = ((u - line_u) / (0.8 * e)).abs();
                    if dd > e && lp < 1.0 && v > lung.top(u) {
                        att += 0.12 * (1.0 - lp);
                    }
                }
                att -= 0.68 * air;
                // Parenchymal mottle: lungs are never a flat grey.
                att += 0.07 * air * (th - 0.5);
                vis[i] = mark;
                fill[i] = m * (1.0 - occl) * (1.0 - keep);
            }
            if t.female {
                // Breast shadows: soft tissue over the lower zones and beyond the lungs, fading
                // upwards and ending below in a curved, fairly sharp inferior margin.
                let bq = ((u - 0.29) / 0.19).powi(2) + ((v - breast_v) / 0.15).powi(2);
                if bq < 1.0 {
                    att += 0.15 * smooth((1.0 - bq) * 5.0) * smooth((v - breast_v + 0.13) / 0.14);
                }
            }
            // Hila: pulmonary arteries fanning out from the mediastinum.
            let hdx = adx - 0.095;
            let hdy = cy - 0.41;
            let hq2 = (hdx * hdx + hdy * hdy) / (0.04 * 0.04);
            if hq2 < 8.0 {
                att += 0.14 * (-hq2 * 0.5).exp();
            }
            a[i] = att;
        }
    }

    // Vessels: a branching tree from each hilum, visible only where there is air.
    let vess_w = 1.0 + 0.5 * sc.edema;
    for (si, sgn) in [(0usize, -1.0f32), (1, 1.0)] {
        let lung = sc.lungs[si];
        for k in 0..7 {
            let base = -1.25 + 2.5 * (k as f32 + 0.5) / 7.0 + rng.random_range(-0.15..0.15);
            let start = (0.5 + sgn * rng.random_range(0.08..0.11), 0.41 + rng.random_range(-0.03..0.03));
            branch(a, f, vis, rng, start, base, sgn, 0.08 * (lung.lmax / 0.4), 0.0045 * vess_w, 0.11, 4);
        }
        // Kerley B lines: short horizontal septal lines at the lateral bases.
        if sc.edema > 0.3 {
            for _ in 0..(4.0 + 8.0 * sc.edema) as usize {
                let v = lung.dome - fr.random_range(0.0..0.14);
                let ul = lung.lateral(v);
                let u0 = ul - fr.random_range(0.0..0.01);
                let u1 = u0 - fr.random_range(0.015..0.03);
                segment(a, f, (0.5 + sgn * u0, v), (0.5 + sgn * u1, v), 0.0015, 0.3 * sc.edema, Some(vis));
            }
        }
    }
    // Air bronchograms: dark branching air in dense consolidation.
    if t.present(CONSOLIDATION) || t.present(PNEUMONIA) {
        for b in sc.blobs.iter().filter(|b| b.dens > 0.55 && b.soft > 0.4) {
            let sgn = if b.side == Side::Right { -1.0 } else { 1.0 };
            for _ in 0..3 {
                let p0 = (0.5 + sgn * (b.u - 0.5 * b.ru), b.v + fr.random_range(-0.3..0.3) * b.rv);
                let ang: f32 = fr.random_range(-0.5..0.5);
                let l = b.ru * fr.random_range(0.6..1.1);
                let p1 = (p0.0 + sgn * l * ang.cos(), p0.1 + l * ang.sin());
                segment(a, f, p0, p1, 0.003, -0.5, Some(fill));
            }
        }
    }

    ribs(a, f, t, &sc, view, rng, &mut fr);
    shoulders(a, f, &sc, view);
    devices(a, f, t, &sc, &mut fr);
    // Bounding boxes of the pneumonic opacities, in pixels (x, y, width, height).
    sc.blobs[..sc.n_pneumonic]
        .iter()
        .map(|b| {
            let sgn = if b.side == Side::Right { -1.0 } else { 1.0 };
            let (px, py) = f.to_px(0.5 + sgn * b.u, b.v);
            let r = f.len_px(b.ru.max(b.rv));
            let x0 = (px - r).max(0.0);
            let y0 = (py - r).max(0.0);
            [x0, y0, (px + r).min(f.w as f32) - x0, (py + r).min(f.h as f32) - y0]
        })
        .collect()
}

/// Clavicles, scapulae and the proximal humeri. The humeral head sits in the glenoid of the
/// scapula, the clavicle runs from the sternal notch out to the acromion above it, the scapula's
/// body is a thin plate whose thick lateral border runs down from the glenoid, and the humeral
/// shaft leaves the film down and out. On PA films the shoulders are rolled forward, which draws
/// the scapulae off the lungs; on supine AP films they overlap the lateral lung.
fn shoulders(a: &mut [f32], f: &Frame, sc: &Scene, view: View) {
    let ap = view == View::Ap;
    let (hu, hv) = sc.shoulder;
    // Clavicles: S-shaped bones from the sternal notch up and out to the acromion.
    let clav_y = hv + if ap { 0.0 } else { 0.035 };
    let clav_rise = if ap { 0.03 } else { 0.07 };
    let clav_end = hu - 0.06;
    let m = if ap { -0.01 } else { 0.025 };
    for sgn in [-1.0f32, 1.0] {
        let p = |u: f32, v: f32| (0.5 + sgn * u, v);
        let (x0, x1) = if sgn < 0.0 { (0.5 - clav_end, 0.5 - 0.035) } else { (0.5 + 0.035, 0.5 + clav_end) };
        let span = clav_end - 0.035;
        band(
            a,
            f,
            x0,
            x1,
            |cx| {
                let u = (cx - 0.5).abs();
                let s = (u - 0.035) / span;
                // Thick medial end, thinner shaft, a flattened lateral end under the acromion.
                let half = 0.012 + 0.005 * (1.0 - s) * (1.0 - s) + 0.003 * smooth((s - 0.8) / 0.2);
                Some((clav_y - clav_rise * s + 0.012 * (2.0 * PI * s).sin(), half))
            },
            |d| 0.17 + 0.15 * d * d,
        );
        let acr = (clav_end + 0.008, clav_y - clav_rise - 0.004);
        // Scapular body: a thin plate, faint; its lateral border is a thick ridge of bone.
        let glen = (hu - 0.04, hv + 0.002);
        let sup = (0.285 + m, hv - 0.07);
        let inf = (0.345 + m, hv + 0.25);
        convex(
            a,
            f,
            &[
                p(glen.0 - 0.006, glen.1 - 0.03),
                p(sup.0, sup.1),
                p(0.295 + m, hv + 0.12),
                p(inf.0, inf.1),
                p(glen.0 - 0.01, glen.1 + 0.035),
            ],
            0.08,
            2.0,
        );
        bone(a, f, p(glen.0 - 0.008, glen.1 + 0.03), p(inf.0, inf.1), 0.008, 0.005, 0.5, 0.4, 0.22);
        segment(a, f, p(sup.0, sup.1), p(inf.0 - 0.005, inf.1), 0.003, 0.04, None);
        // Spine of the scapula up to the acromion, which roofs the humeral head.
        bone(a, f, p(0.3 + m, hv - 0.03), p(acr.0 + 0.02, acr.1 + 0.004), 0.006, 0.009, 0.4, 0.5, 0.12);
        bone(a, f, p(acr.0, acr.1), p(hu + 0.02, acr.1 + 0.01), 0.011, 0.01, 0.35, 0.5, 0.16);
        // Coracoid process below the lateral clavicle, seen nearly end-on.
        bone(
            a,
            f,
            p(clav_end - 0.04, clav_y - clav_rise + 0.03),
            p(clav_end - 0.025, clav_y - clav_rise + 0.036),
            0.009,
            0.007,
            0.4,
            0.5,
            0.16,
        );
        // Glenoid: the rim of the socket projects as an oval ring over the head's medial part.
        ellipse(a, f, p(glen.0, glen.1), (0.011, 0.03), 0.0, 0.16, 1.2);
        ellipse(a, f, p(glen.0 + 0.001, glen.1), (0.006, 0.024), 0.0, -0.11, 1.2);
        // Humerus: the head, the greater tuberosity lateral to it, the neck and the shaft.
        bone(a, f, p(hu, hv), p(hu, hv), 0.05, 0.05, 0.15, 0.35, 0.75);
        bone(a, f, p(hu + 0.035, hv + 0.005), p(hu + 0.03, hv + 0.03), 0.018, 0.02, 0.3, 0.6, 0.12);
        bone(a, f, p(hu + 0.016, hv + 0.05), p(hu + 0.16, hv + 0.8), 0.027, 0.022, 0.3, 0.25, 0.5);
    }
}

#[allow(clippy::too_many_arguments)]
fn branch(
    a: &mut [f32],
    f: &Frame,
    vis: &[f32],
    rng: &mut impl Rng,
    p: (f32, f32),
    ang: f32,
    sgn: f32,
    len: f32,
    hw: f32,
    amp: f32,
    depth: u32,
) {
    let l = len * rng.random_range(0.7..1.2);
    let q = (p.0 + sgn * l * ang.cos(), p.1 + l * ang.sin());
    segment(a, f, p, q, hw, amp, Some(vis));
    if depth > 1 {
        for d in [-1.0f32, 1.0] {
            let na = ang + d * rng.random_range(0.2..0.5);
            branch(a, f, vis, rng, q, na, sgn, len * 0.8, hw * 0.72, amp * 0.85, depth - 1);
        }
    }
}

fn ribs(a: &mut [f32], f: &Frame, t: &Truth, sc: &Scene, view: View, rng: &mut impl Rng, fr: &mut impl Rng) {
    let spacing = rng.random_range(0.053..0.06);
    let start = rng.random_range(0.1..0.12);
    let fracture = if t.present(FRACTURE) {
        let k = match t.zone[FRACTURE] {
            Zone::Upper => fr.random_range(2..4),
            Zone::Middle => fr.random_range(4..6),
            Zone::Lower => fr.random_range(6..8),
        };
        Some((side_index(t.side[FRACTURE]), k, fr.random_range(0.27..0.36), sc.fracture))
    } else {
        None
    };
    let amp = if view == View::Ap { 0.11 } else { 0.135 };
    for (si, sgn) in [(0usize, -1.0f32), (1, 1.0)] {
        let lmax = sc.lungs[si].lmax;
        for k in 0..11 {
            let y0 = start + k as f32 * spacing;
            let frac = fracture.filter(|fr| fr.0 == si && fr.1 == k);
            let (x0, x1) = (0.5 + sgn * 0.03, 0.5 + sgn * (lmax + 0.05));
            // Posterior ribs leave the transverse process rising a little, then sweep down and out
            // along the back of the chest; the upper ribs are shorter and curl more tightly.
            let curl = 1.45 - 0.04 * k as f32;
            // Near the spine they are nearly horizontal.
            let rib_y = |u: f32| y0 - 0.014 * (PI * (u / 0.14).min(1.0)).sin() + curl * (u - 0.06).max(0.0).powi(2);
            band(
                a,
                f,
                x0,
                x1,
                |cx| {
                    let u = (cx - 0.5).abs();
                    let mut y = rib_y(u);
                    // Thickness is across the rib: a sloping rib covers more of each column.
                    let slope = (rib_y(u + 0.005) - y) / 0.005;
                    let half = (0.0095 + 0.004 * u / 0.4) * (1.0 + slope * slope).sqrt();
                    if let Some((_, _, uf, s)) = frac {
                        // A break: a gap in the cortex and a step in the lateral fragment.
                        if (u - uf).abs() < 0.001 + 0.007 * s {
                            return None;
                        }
                        if u > uf {
                            y += 0.016 * s;
                        }
                    }
                    Some((y, half))
                },
                // Cortex seen tangentially at both margins is brighter than the medulla.
                |d| amp * (0.45 + 0.55 * d.powi(4)),
            );
        }
        // Anterior ribs: thin bone far from the detector (magnified, blurred), so much fainter
        // than the posterior ones; they run from the lateral wall down and in towards the
        // sternum and fade out where the costal cartilage, invisible on film, takes over.
        for k in 0..6 {
            let y1 = start + 0.08 + k as f32 * 0.07;
            let (x0, x1) = (0.5 + sgn * 0.16, 0.5 + sgn * lmax);
            band(
                a,
                f,
                x0,
                x1,
                |cx| {
                    let u = (cx - 0.5).abs();
                    let s = ((lmax - u) / (lmax - 0.12)).clamp(0.0, 1.0);
                    Some((y1 + 0.11 * s * s.sqrt(), 0.012 * (1.0 + 0.25 * s)))
                },
                |d| 0.032 * (1.0 - d * d),
            );
        }
    }
}

fn devices(a: &mut [f32], f: &Frame, t: &Truth, sc: &Scene, rng: &mut impl Rng) {
    let d = &t.devices;
    let dome_l = sc.lungs[1].dome;
    if d.ett {
        // Endotracheal tube: faint walls with a radio-opaque stripe, tip above the carina.
        let tip = rng.random_range(0.24..0.3);
        segment(a, f, (0.5 + 0.004, -0.4), (0.5 + 0.004, tip), 0.009, 0.12, None);
        segment(a, f, (0.5 + 0.009, -0.4), (0.5 + 0.009, tip), 0.0018, 1.0, None);
    }
    if d.ng_tube {
        let pts = [
            (0.5 - 0.012, -0.4),
            (0.5 - 0.01, 0.3),
            (0.5 + 0.02, dome_l),
            (0.5 + 0.13, dome_l + 0.07),
            (0.5 + 0.17, dome_l + 0.1),
        ];
        polyline(a, f, &pts, 0.0022, 0.9);
    }
    if d.central_line {
        let right = rng.random::<bool>();
        let s = if right { -1.0 } else { 1.0 };
        let pts = [(0.5 + s * 0.16, -0.06), (0.5 + s * 0.09, 0.15), (0.5 + s * 0.05, 0.22), (0.5 - 0.03, 0.34)];
        polyline(a, f, &pts, 0.0022, 0.8);
    }
    if d.pacemaker {
        ellipse(a, f, (0.5 + 0.25, 0.17), (0.038, 0.025), 0.1, 2.2, 1.2);
        let pts = [
            (0.5 + 0.23, 0.17),
            (0.5 + 0.12, 0.14),
            (0.5 + 0.02, 0.25),
            (0.5 - 0.01, 0.45),
            (0.5 + 0.12, dome_l - 0.05),
        ];
        polyline(a, f, &pts, 0.003, 1.0);
    }
    if d.sternal_wires {
        for k in 0..5 {
            let y = 0.24 + k as f32 * 0.055;
            ellipse(a, f, (0.5 + 0.002, y), (0.012, 0.005), 0.0, 0.9, 0.8);
            ellipse(a, f, (0.5 + 0.002, y), (0.007, 0.0025), 0.0, -0.9, 0.8);
        }
    }
}

/// The lateral projection, anterior to the image's left: the sternum in front, the thoracic spine
/// behind, the heart anterior and low on the diaphragm with the clear retrosternal space above it,
/// the aorta arching back over the hila to descend in front of the spine, the trachea down to the
/// carina, both hemidiaphragms (the right higher, the left lost in front where the heart sits on
/// it) falling to the deep posterior costophrenic sulci, posterior ribs of both sides, scapulae, and
/// the arms raised over the upper chest.
#[allow(clippy::too_many_arguments)]
fn lateral(
    rng: &mut impl Rng,
    t: &Truth,
    f: &Frame,
    vis_scale: &Visibility,
    a: &mut [f32],
    vis: &mut [f32],
    fill: &mut [f32],
) {
    let (w, h) = (f.w, f.h);
    let e = 1.2 / f.len_px(1.0);
    let ie = 1.0 / e;
    let sev = |i: usize| vis_scale.drawn(i, t.severity[i]);
    let dome = rng.random_range(0.6..0.66);
    // Where the domes peak (front to back) and how far the posterior sulci fall below them.
    let dome_x = rng.random_range(0.36..0.42);
    let sulcus = rng.random_range(0.14..0.18);
    let big = if t.present(CARDIOMEGALY) { sev(CARDIOMEGALY) } else { 0.0 };
    let sternum_x = rng.random_range(0.17..0.2);
    let spine_x = rng.random_range(0.7..0.73);
    let mut fr = ChaCha8Rng::seed_from_u64(rng.random());
    let tex = ValueNoise::new(rng, 24);
    let tex_hi = ValueNoise::new(rng, 40);
    let eff = if t.present(EFFUSION) { sev(EFFUSION) } else { 0.0 };
    let edema = if t.present(EDEMA) { sev(EDEMA) } else { 0.0 };
    let mut blobs = Vec::new();
    for i in [CONSOLIDATION, PNEUMONIA, OPACITY, LESION] {
        if t.present(i) {
            let v = match t.zone[i] {
                Zone::Upper => 0.25,
                Zone::Middle => 0.42,
                Zone::Lower => dome - 0.02,
            };
            let r = if i == LESION { 0.02 } else { 0.06 + 0.04 * sev(i) };
            let ang: f32 = fr.random_range(-0.6..0.6);
            blobs.push(Blob {
                side: Side::Both,
                u: fr.random_range(0.4..0.7),
                v,
                ru: r,
                rv: r * 0.8,
                cos: ang.cos(),
                sin: ang.sin(),
                dens: 0.6 * sev(i).min(1.0),
                soft: if i == LESION { 0.12 } else { 0.5 },
            });
        }
    }
    if t.present(ATELECTASIS) {
        // Plate-like atelectasis: a thin oblique band low in the lung.
        blobs.push(Blob {
            side: Side::Both,
            u: fr.random_range(0.45..0.6),
            v: dome - 0.04,
            ru: 0.1,
            rv: 0.01 + 0.006 * sev(ATELECTASIS),
            cos: f32::cos(0.25),
            sin: f32::sin(0.25),
            dens: 0.7 * sev(ATELECTASIS).min(1.0),
            soft: 0.35,
        });
    }
    // Solid structures inside the chest that displace lung: drawn into `fill` first, the pixel pass
    // then takes the air they leave.
    // It sits on the diaphragm: its lower part merges with the liver below the dome.
    let heart_c = (0.31 + 0.04 * big, dome - 0.025);
    let heart_r = (0.2 + 0.05 * big, 0.125 + 0.03 * big);
    // The heart fills most of the chest's width there; lung lateral to it still shows a little.
    ellipse(fill, f, heart_c, heart_r, -0.55, 0.8, 5.0);
    // Left atrium above and behind the ventricles, the IVC entering below it.
    ellipse(fill, f, (heart_c.0 + 0.1 + 0.03 * big, heart_c.1 - 0.06), (0.07, 0.055), 0.0, 0.45, 5.0);
    ellipse(fill, f, (0.5 + 0.03 * big, dome + 0.02), (0.035, 0.06), 0.0, 0.5, 4.0);
    // Aorta: ascending from the heart, arching back, descending in front of the spine.
    let ao = 0.032 + if t.present(ECM) { 0.002 + 0.02 * sev(ECM) } else { 0.0 };
    let arch = [
        (0.38, heart_c.1 - 0.1),
        (0.4, 0.27),
        (0.47, 0.2),
        (0.57, 0.195),
        (0.64, 0.24),
        (spine_x - 0.02, 0.34),
        (spine_x - 0.015, dome + 0.1),
    ];
    tube(fill, f, &arch, ao, 0.4);
    // Pulmonary trunk and the hila: vessels seen end-on, denser than the lung around them.
    segment(fill, f, (0.4, heart_c.1 - 0.12), (0.5, 0.36), 0.026, 0.45, None);
    ellipse(fill, f, (0.53, 0.41), (0.05, 0.045), 0.0, 0.35, 5.0);
    let carina = (0.57, 0.37);
    for py in 0..h {
        let (_, cy) = f.to_canon(0.5, py as f32 + 0.5);
        // Skin: the neck at the top, the anterior chest wall just in front of the sternum, the
        // abdomen a little further forward; the back gently convex.
        let front = if cy < 0.12 {
            0.36 - (0.36 - sternum_x + 0.035) * smooth((cy + 0.06) / 0.18)
        } else {
            sternum_x - 0.035 - 0.05 * (cy - 0.12) - 0.04 * smooth((cy - 0.55) / 0.3)
        };
        let back = if cy < 0.05 { 0.8 + 0.12 * smooth((cy + 0.15) / 0.2) } else { 0.92 + 0.015 * (PI * cy).sin() };
        let mid = 0.5 * (front + back);
        let inv_half = 2.0 / (back - front).max(0.1);
        // Lungs: apex behind the clavicles, the retrosternal space in front, the posterior ribs behind.
        // The anterior border follows the sternum, which leans forward as it descends; the
        // posterior one the curve of the back.
        let ant = sternum_x
            + 0.015
            + 0.06 * (0.35 - cy)
            + 0.04 * smooth((cy - 0.55) / 0.2)
            + 0.1 * smooth((0.16 - cy) / 0.08);
        let post = 0.84 + 0.02 * (PI * cy).sin() - 0.03 * smooth((0.2 - cy) / 0.12);
        let sx = spine_x + 0.02 * (PI * cy).sin();
        let ph = (cy * 17.0).fract();
        let vert = if ph < 0.12 {
            0.6
        } else if !(0.18..=0.95).contains(&ph) {
            1.25
        } else {
            1.0
        };
        let trachea_x = 0.49 + (carina.0 - 0.49) * (cy / carina.1).clamp(0.0, 1.0);
        for px in 0..w {
            let (cx, _) = f.to_canon(px as f32 + 0.5, py as f32 + 0.5);
            let i = py * w + px;
            let body = ramp((cx - front) * ie) * ramp((back - cx) * ie);
            if body <= 0.0 {
                a[i] = 0.0;
                continue;
            }
            // Path length across the chest: longest in the middle, shorter front and back.
            let q = (cx - mid) * inv_half;
            let mut att = 1.35 * body * (0.45 + 0.55 * (1.0 - q * q).max(0.0).sqrt());
            let top = 0.05 + 1.6 * (cx - 0.62) * (cx - 0.62);
            // Two hemidiaphragms: each lung's floor is its own dome, highest in front of the
            // middle and falling steeply to the posterior sulcus; the right is a little higher.
            let dd = cx - dome_x;
            let fall = if dd > 0.0 { sulcus * (dd / 0.45).powi(2) } else { 0.05 * (dd / 0.25).powi(2) };
            let right = dome + fall;
            let left = dome + 0.03 + fall * 1.05;
            let base = 0.5 * ramp((right - cy) * ie) + 0.5 * ramp((left - cy) * ie);
            // The apices fade out under the soft tissue of the shoulders and the raised arms.
            let m = smooth((cy - top) / 0.1) * ramp((cx - ant) * ie * 0.5) * ramp((post - cx) * ie * 0.5) * base;
            if m > 0.0 {
                let solid = fill[i].min(1.0);
                let tx = tex.at(cx, cy);
                let mut keep = 1.0f32;
                if eff > 0.0 {
                    // Fluid collects in the posterior sulci first, with a meniscus up the back.
                    let level = left - 0.02 - 0.2 * eff * (0.3 + 0.7 * smooth((cx - 0.3) / 0.55));
                    keep *= 1.0 - 0.9 * ((cy - level) / 0.03).clamp(0.0, 1.0);
                }
                if edema > 0.0 {
                    let hq = ((cx - 0.53) / 0.16).powi(2) + ((cy - 0.42) / 0.16).powi(2);
                    keep *= 1.0 - edema * (0.5 * (-hq * 0.5).exp() + 0.1) * (0.7 + 0.6 * tx);
                }
                for b in &blobs {
                    keep *= 1.0 - b.at(cx, cy, tx);
                }
                // Less air near the apex and in front (the chest is narrower there).
                let thick = 0.75 + 0.25 * smooth((cy - top) / 0.2);
                let air = m * (1.0 - solid) * keep * thick;
                att -= 0.8 * air;
                att += 0.08 * air * (tex_hi.at(cx, cy) - 0.5);
                vis[i] = air;
            }
            // Thoracic spine: vertebral bodies with disc spaces and bright end plates, then the
            // pedicles and the neural arch behind them; the lower ones project through lung.
            if cx > sx - 0.01 && cx < sx + 0.19 && cy > -0.05 {
                // Each body's front is a little concave between its end plates.
                let b = ramp((cx - sx - 0.006 * (PI * ph).sin()) * ie) * ramp((sx + 0.095 - cx) * ie);
                att += 0.3 * b * vert;
                // Pedicles bridge the body to the neural arch, so no lung shows between them.
                let arch_q = ((cx - sx - 0.13) / 0.04).powi(2) + ((ph - 0.5) / 0.4).powi(2);
                if arch_q < 1.0 {
                    att += 0.14 * (1.0 - arch_q);
                }
                let sp = ((cx - sx - 0.17) / 0.02).powi(2) + ((ph - 0.75) / 0.25).powi(2);
                if sp < 1.0 {
                    att += 0.08 * (1.0 - sp);
                }
            }
            // Trachea: an air column down and back to the carina.
            if cy < carina.1 && cy > -0.2 {
                let d = (cx - trachea_x).abs();
                if d < 0.03 {
                    att -= 0.32 * ramp((0.017 - d) * ie) * smooth((carina.1 - cy) / 0.03);
                }
            }
            a[i] = att;
        }
    }
    // Gastric air under the left hemidiaphragm, colon below.
    ellipse(a, f, (0.42 + fr.random_range(-0.03..0.03), dome + 0.1), (0.06, 0.03), 0.0, -0.35, 3.0);
    // Sternum: the manubrium and the body, cortex around marrow.
    bone(a, f, (sternum_x + 0.03, 0.13), (sternum_x + 0.015, 0.23), 0.02, 0.018, 0.35, 0.35, 0.3);
    bone(a, f, (sternum_x + 0.01, 0.245), (sternum_x - 0.01, 0.56), 0.012, 0.013, 0.4, 0.3, 0.3);
    // Posterior ribs of both sides, one magnified more than the other, sweeping down and forward.
    for side in 0..2 {
        let off = side as f32 * 0.012;
        for k in 0..10 {
            let y0 = 0.13 + off + k as f32 * 0.057;
            band(
                a,
                f,
                0.5,
                0.9,
                |cx| {
                    let d = 0.88 - cx;
                    Some((y0 + 0.45 * d * d + 0.15 * d, 0.009 * (1.0 + 2.0 * d)))
                },
                |d| 0.07 * (0.5 + 0.5 * d * d),
            );
        }
    }
    // Scapulae: oblique blades over the upper posterior chest.
    for side in 0..2 {
        let o = side as f32 * 0.03;
        segment(a, f, (0.75 - o, 0.08), (0.63 - o, 0.42), 0.006, 0.1, None);
        segment(a, f, (0.78 - o, 0.1), (0.72 - o, 0.4), 0.004, 0.06, None);
    }
    // The raised arms: soft tissue and humeri projecting over the upper chest and out of the top.
    for side in 0..2 {
        let o = side as f32 * 0.07;
        segment(a, f, (0.45 + o, 0.22), (0.25 + o, -0.5), 0.095, 0.3, None);
        bone(a, f, (0.47 + o, 0.2), (0.3 + o, -0.5), 0.022, 0.02, 0.35, 0.3, 0.45);
        bone(a, f, (0.48 + o, 0.21), (0.48 + o, 0.21), 0.042, 0.042, 0.15, 0.4, 0.4);
    }
    // Vessels from the hila, visible only where there is air.
    for k in 0..12 {
        let ang: f32 = -2.8 + 5.6 * (k as f32 + 0.5) / 12.0 + rng.random_range(-0.15..0.15);
        let p = (0.53 + rng.random_range(-0.02..0.02), 0.42 + rng.random_range(-0.02..0.02));
        branch(a, f, vis, rng, p, ang, 1.0, 0.06, 0.004 * (1.0 + 0.5 * edema), 0.1, 3);
    }
    let d = &t.devices;
    if d.pacemaker {
        // The generator in the anterior chest wall, edge-on; the lead down to the right ventricle.
        ellipse(a, f, (sternum_x - 0.01, 0.2), (0.04, 0.012), 0.15, 2.0, 1.0);
        polyline(
            a,
            f,
            &[(sternum_x + 0.02, 0.2), (0.4, 0.25), (0.45, 0.4), (heart_c.0 - 0.05, heart_c.1 + 0.05)],
            0.003,
            1.0,
        );
    }
    if d.ett {
        segment(a, f, (0.46, -0.3), (0.49 + 0.7 * (carina.0 - 0.49), carina.1 - 0.05), 0.002, 0.9, None);
    }
    if d.ng_tube {
        polyline(a, f, &[(0.55, -0.3), (0.6, 0.3), (0.62, dome), (0.45, dome + 0.1)], 0.0022, 0.9);
    }
    if d.central_line {
        polyline(a, f, &[(0.3, -0.1), (0.42, 0.18), (0.45, 0.33)], 0.0022, 0.8);
    }
    if d.sternal_wires {
        for k in 0..5 {
            let y = 0.25 + k as f32 * 0.06;
            ellipse(a, f, (sternum_x + 0.005 - 0.004 * k as f32, y), (0.02, 0.004), 0.0, 0.9, 0.8);
        }
    }
}

/// Exposure falloff and quantum mottle, added before the point spread so the mottle is blurred into
/// the correlated, blotchy texture of real films (the white grain comes later, in `expose`).
fn film(rng: &mut impl Rng, a: &mut [f32], w: usize, h: usize, site: &Site) {
    // Heel effect: the anode side (top) gets fewer photons, so it reads a little denser; and the
    // beam is weaker towards the corners (inverse square, obliquity): both multiply the density,
    // which leaves the unattenuated background black.
    let heel = rng.random_range(0.02..0.06);
    let inv = 1.0 / w.max(h) as f32;
    let cols: Vec<f32> = (0..w).map(|x| ((x as f32 - 0.5 * w as f32) * inv).powi(2)).collect();
    let mut s: u64 = rng.random::<u64>() | 1;
    let amp = site.noise * 2.2;
    for (y, row) in a.chunks_exact_mut(w).enumerate() {
        let yy = (y as f32 - 0.5 * h as f32) * inv;
        let rf = 1.0 + heel * (0.5 - y as f32 / h as f32) + 0.12 * yy * yy;
        // One xorshift64* draw gives two 24-bit uniforms, one per pixel of a pair.
        for (xs, cs) in row.chunks_mut(2).zip(cols.chunks(2)) {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let r = s.wrapping_mul(0x2545F4914F6CDD1D);
            let ns = [(r >> 40) as f32, ((r >> 16) & 0xFF_FFFF) as f32];
            for ((x, c), n) in xs.iter_mut().zip(cs).zip(ns) {
                let n = n * (1.0 / (1u64 << 24) as f32) - 0.5;
                // Fewer photons get through dense regions: mottle grows with attenuation.
                *x = *x * (rf + 0.12 * c) + amp * n * x.clamp(0.0, 2.0);
            }
        }
    }
}

/// A lead side marker ("L" on frontals) burnt into a corner, as technologists place them.
fn marker(a: &mut [f32], f: &Frame, view: View, inset: f32) {
    let w = f.w as f32;
    let s = (w * 0.05).max(4.0);
    let (x0, y0) = if view == View::Lateral { (w * inset, w * inset) } else { (w * (1.0 - inset) - s, w * inset) };
    let thick = (s * 0.25).max(1.0);
    let mut rect = |x: f32, y: f32, rw: f32, rh: f32| {
        for py in y as usize..((y + rh) as usize).min(f.h) {
            for px in x as usize..((x + rw) as usize).min(f.w) {
                a[py * f.w + px] = 3.0;
            }
        }
    };
    rect(x0, y0, thick, s);
    rect(x0, y0 + s - thick, s * 0.7, thick);
}

const LUT_N: usize = 4096;
const A_MIN: f32 = -0.5;
const A_MAX: f32 = 4.5;

/// The detector's response over attenuation: exposure, gamma and offset, in 8-bit units.
fn tone_curve(site: &Site) -> Vec<f32> {
    let k = 1.2 * site.exposure;
    (0..LUT_N)
        .map(|j| {
            let x = A_MIN + (A_MAX - A_MIN) * j as f32 / (LUT_N - 1) as f32;
            let v = (1.0 - (-k * x.max(0.0)).exp()).powf(site.gamma) + site.offset;
            v * 255.0
        })
        .collect()
}

/// The detector: tone curve (a lookup table keeps exp/powf out of the pixel loop) and grain.
fn expose(rng: &mut impl Rng, a: &[f32], site: &Site, lut: &[f32], out: &mut Vec<u8>) {
    let scale = (LUT_N - 1) as f32 / (A_MAX - A_MIN);
    let mut s: u64 = rng.random::<u64>() | 1;
    let amp = site.noise * 255.0 * 1.2;
    let px = |x: f32, n: f32| {
        let j = ((x - A_MIN) * scale).clamp(0.0, (LUT_N - 1) as f32) as usize;
        // Relative quantum noise is largest where few photons arrive: the bright, dense parts.
        let v = lut[j];
        (v + amp * (0.45 + v * (1.0 / 255.0)) * n).clamp(0.0, 255.0) as u8
    };
    out.clear();
    out.resize(a.len(), 0);
    // One xorshift64* draw gives four 16-bit uniforms: two summed per pixel make a cheap
    // bell-shaped grain, for two pixels.
    const U16: f32 = 1.0 / 65536.0;
    let mut next = || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545F4914F6CDD1D)
    };
    let mut pairs = a.chunks_exact(2);
    let mut outs = out.chunks_exact_mut(2);
    for (p, o) in (&mut pairs).zip(&mut outs) {
        let r = next();
        let u = |k: u32| ((r >> k) & 0xFFFF) as f32 * U16;
        o[0] = px(p[0], u(0) + u(16) - 1.0);
        o[1] = px(p[1], u(32) + u(48) - 1.0);
    }
    for (&x, o) in pairs.remainder().iter().zip(outs.into_remainder()) {
        let r = next();
        *o = px(x, ((r >> 48) as f32 + ((r >> 32) & 0xFFFF) as f32) * U16 - 1.0);
    }
}
