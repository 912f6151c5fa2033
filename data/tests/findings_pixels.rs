//! Every finding the generator draws changes the pixels where it should: the same study (same
//! anatomy, same detector noise) rendered with and without the finding differs, and the
//! difference lies in the finding's region. Cardiomegaly is measured as a radiologist would: the
//! cardiothoracic ratio read off the image crosses 0.5.

use data::synth::render::{render, Scratch};
use data::synth::site::{Site, MIMIC};
use data::synth::truth::{idx::*, Devices, Side, Truth, View, Zone};
use data::synth::{Visibility, DESIGN};
use data::NUM_LABELS;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const W: usize = 256;

fn healthy(female: bool, view: View) -> Truth {
    Truth {
        severity: [0.0; NUM_LABELS],
        side: [Side::Right; NUM_LABELS],
        zone: [Zone::Middle; NUM_LABELS],
        devices: Devices::default(),
        acuity: 1,
        female,
        age: 50,
        frontal: view,
        has_lateral: false,
        habitus: 1.05,
    }
}

fn draw(t: &Truth, site: &Site, seed: u64) -> Vec<u8> {
    draw_at(t, t.frontal, site, seed, &Visibility::default())
}

fn draw_at(t: &Truth, view: View, site: &Site, seed: u64, vis: &Visibility) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    render(&mut rng, t, view, site, W, W, vis, &mut Scratch::default(), &mut out);
    out
}

/// Sum of |a - b| over the pixels of the region (fractions of the image: x0, x1, y0, y1).
fn diff_in(a: &[u8], b: &[u8], r: [f32; 4]) -> (f64, usize) {
    let (x0, x1) = ((r[0] * W as f32) as usize, (r[1] * W as f32) as usize);
    let (y0, y1) = ((r[2] * W as f32) as usize, (r[3] * W as f32) as usize);
    let mut s = 0.0;
    for y in y0..y1 {
        for x in x0..x1 {
            s += (a[y * W + x] as f64 - b[y * W + x] as f64).abs();
        }
    }
    (s, (x1 - x0) * (y1 - y0))
}

/// The region of a finding on the patient's right (the image's left), as image fractions.
fn region(label: usize) -> [f32; 4] {
    match label {
        CARDIOMEGALY => [0.2, 0.9, 0.35, 0.85],
        ECM => [0.3, 0.7, 0.0, 0.6],
        EFFUSION | ATELECTASIS => [0.0, 0.5, 0.4, 0.9],
        CONSOLIDATION | PNEUMONIA | OPACITY => [0.0, 0.5, 0.35, 0.9],
        EDEMA | DEVICES => [0.05, 0.95, 0.0, 0.9],
        PNEUMOTHORAX => [0.0, 0.5, 0.0, 0.75],
        LESION | PLEURAL_OTHER => [0.0, 0.5, 0.15, 0.7],
        FRACTURE => [0.0, 0.5, 0.15, 0.75],
        _ => unreachable!(),
    }
}

/// The largest mean |a - b| over the 4 x 4 blocks of the image: a small finding (a nodule, a rib
/// break) changes few pixels, but those strongly.
fn peak(a: &[u8], b: &[u8]) -> f64 {
    let mut best = 0.0f64;
    for by in (0..W).step_by(4) {
        for bx in (0..W).step_by(4) {
            let (s, n) = diff_in(
                a,
                b,
                [bx as f32 / W as f32, (bx + 4) as f32 / W as f32, by as f32 / W as f32, (by + 4) as f32 / W as f32],
            );
            best = best.max(s / n as f64);
        }
    }
    best
}

fn mirror(r: [f32; 4]) -> [f32; 4] {
    [1.0 - r[1], 1.0 - r[0], r[2], r[3]]
}

/// The cardiothoracic ratio read off a noise-free film, as a radiologist reads it: the widest
/// transverse diameter of the heart over the widest internal diameter of the thorax. On each row
/// the thorax spans from the outermost lung pixel to the other; the heart is the bright run
/// through the middle with lung on both sides, on the rows above the right hemidiaphragm (below
/// it the liver joins the heart) where the thorax is near its widest (higher up, between the
/// narrowing apices, the run is the mediastinum and the clavicles).
fn measured_ctr(img: &[u8]) -> f64 {
    const LUNG: u8 = 125; // aerated lung is darker; heart, chest wall and abdomen brighter
    const AIR: u8 = 40; // but not as dark as the air around the patient
    let px = |x: usize, y: usize| img[y * W + x];
    let mut rows = Vec::new(); // (y, lung span l0..=l1, heart run width)
    for y in W / 8..W * 7 / 8 {
        let row = &img[y * W..(y + 1) * W];
        // Inside the body: from the first to the last pixel brighter than the air around it.
        let Some(b0) = row.iter().position(|&v| v > 100) else { continue };
        let b1 = row.iter().rposition(|&v| v > 100).unwrap();
        // The chest wall's soft-tissue edge fades to black over a few pixels, and between the
        // arm and the chest wall there may be a narrow strip of air: not lung. Lung is a wide
        // dark run walled in by bright tissue on both sides (chest wall, mediastinum), and not
        // black: the air outside the body, above the shoulders, is.
        let edge = W / 32;
        let mut runs = Vec::new();
        let mut x = b0 + edge;
        while x <= b1.saturating_sub(edge) {
            if (AIR..LUNG).contains(&row[x]) {
                let s = x;
                while x < b1.saturating_sub(edge) && (AIR..LUNG).contains(&row[x + 1]) {
                    x += 1;
                }
                let walled = s > 0 && row[s - 1] >= LUNG && x + 1 < W && row[x + 1] >= LUNG;
                if x - s + 1 >= W / 24 && walled {
                    runs.push((s, x));
                }
            }
            x += 1;
        }
        let (Some(&(l0, _)), Some(&(_, l1))) = (runs.first(), runs.last()) else { continue };
        let mid = (l0 + l1) / 2;
        let mut heart = 0;
        if row[mid] >= LUNG {
            let (mut a, mut b) = (mid, mid);
            while a > l0 && row[a - 1] >= LUNG {
                a -= 1;
            }
            while b < l1 && row[b + 1] >= LUNG {
                b += 1;
            }
            if a > l0 && b < l1 {
                heart = b - a + 1;
            }
        }
        rows.push((y, l0, l1, heart));
    }
    // The thorax is widest towards the bases: the upper third of the rows with lung-like runs
    // (the apices, and the soft tissue over the shoulders on either side of the neck) is not
    // measured.
    let (y_first, y_last) = (rows.first().map_or(0, |r| r.0), rows.last().map_or(0, |r| r.0));
    rows.retain(|r| r.0 >= y_first + (y_last - y_first) / 3);
    let thorax = rows.iter().map(|r| r.2 - r.1 + 1).max().unwrap_or(1);
    // The right hemidiaphragm: going down the right lung's mid-clavicular line from mid-height,
    // the first row that turns bright for good (a rib is a few rows; the liver is many).
    let (_, l0, l1, _) = *rows.iter().find(|r| r.2 - r.1 + 1 == thorax).unwrap();
    let xr = l0 + (l1 - l0) / 4;
    let dome = (W / 2..W - 8).find(|&y| (y..y + 8).all(|yy| px(xr, yy) >= LUNG)).unwrap_or(W);
    // A few rows above it: at the dome itself the blurred liver closes the cardiophrenic angle.
    let dome = dome - W / 40;
    let heart =
        rows.iter().filter(|r| r.0 < dome && (r.2 - r.1 + 1) * 10 >= thorax * 9).map(|r| r.3).max().unwrap_or(0);
    heart as f64 / thorax as f64
}

#[test]
fn cardiomegaly_crosses_the_cardiothoracic_ratio() {
    let seed: u64 = rand::rng().random();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // The reading's fixed grey levels assume a film of average technique on a patient of average
    // build (`healthy`): both vary from film to film otherwise.
    let clean = Site { noise: 0.0, marker: false, technique: [1.0, 1.0], ..MIMIC.clone() };
    let rounds: usize = std::env::var("FINDINGS_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    for _ in 0..rounds {
        // PA: an AP film magnifies the heart, and a normal one can read above 0.5 there.
        let t0 = healthy(false, View::Pa);
        let mut t1 = t0.clone();
        t1.severity[CARDIOMEGALY] = rng.random_range(0.3..1.0);
        let image_seed: u64 = rng.random();
        let normal = measured_ctr(&draw(&t0, &clean, image_seed));
        let large = measured_ctr(&draw(&t1, &clean, image_seed));
        println!("seed {seed}: severity {:.2}: CTR {normal:.3} -> {large:.3}", t1.severity[CARDIOMEGALY]);
        assert!(normal > 0.3 && normal < 0.5, "seed {seed}: a normal heart measures CTR {normal:.3}");
        assert!(large > 0.5 && large < 0.75, "seed {seed}: cardiomegaly measures CTR {large:.3}");
    }
}

#[test]
fn each_finding_changes_its_region() {
    let seed: u64 = rand::rng().random();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let lateralised =
        [EFFUSION, ATELECTASIS, CONSOLIDATION, PNEUMONIA, OPACITY, PNEUMOTHORAX, LESION, FRACTURE, PLEURAL_OTHER];
    let all = [
        CARDIOMEGALY,
        ECM,
        EFFUSION,
        CONSOLIDATION,
        PNEUMONIA,
        OPACITY,
        EDEMA,
        ATELECTASIS,
        PNEUMOTHORAX,
        LESION,
        FRACTURE,
        PLEURAL_OTHER,
        DEVICES,
    ];
    let rounds: usize = std::env::var("FINDINGS_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    for round in 0..rounds {
        let female = rng.random::<bool>();
        let view = if rng.random::<bool>() { View::Pa } else { View::Ap };
        let image_seed: u64 = rng.random();
        let without = draw(&healthy(female, view), &MIMIC, image_seed);
        for &label in &all {
            let mut t = healthy(female, view);
            t.severity[label] = rng.random_range(0.5..1.0);
            t.zone[label] = match label {
                CONSOLIDATION | PNEUMONIA | OPACITY | ATELECTASIS => Zone::Lower,
                PNEUMOTHORAX => Zone::Upper,
                _ => Zone::Middle,
            };
            if label == EDEMA {
                t.side[label] = Side::Both;
            }
            if label == DEVICES {
                t.devices =
                    Devices { ett: true, ng_tube: true, central_line: true, pacemaker: true, sternal_wires: true };
            }
            let with = draw_at(&t, t.frontal, &MIMIC, image_seed, &Visibility::full());
            let r = region(label);
            let (inside, n_in) = diff_in(&with, &without, r);
            let (total, n) = diff_in(&with, &without, [0.0, 1.0, 0.0, 1.0]);
            let (other, _) = diff_in(&with, &without, mirror(r));
            let ctx = format!(
                "seed {seed} round {round} label {} ({view:?}, female {female}): peak {:.1} region mean {:.2}, whole mean {:.3}, inside share {:.2}, mirror/inside {:.2}",
                data::LABELS[label],
                peak(&with, &without),
                inside / n_in as f64,
                total / n as f64,
                inside / total.max(1e-9),
                other / inside.max(1e-9)
            );
            println!("{ctx}");
            let big = [CARDIOMEGALY, ECM, EFFUSION, CONSOLIDATION, PNEUMONIA, EDEMA, ATELECTASIS, PNEUMOTHORAX];
            // A rib break is a gap of a pixel or two and a small step: few pixels, moderately; a
            // small nodule of moderate severity is a faint spot a few pixels across.
            let min_peak = match label {
                FRACTURE => 4.0,
                LESION => 15.0,
                _ => 25.0,
            };
            assert!(peak(&with, &without) >= min_peak, "{ctx}: too faint");
            if big.contains(&label) {
                assert!(inside / n_in as f64 >= 0.8, "{ctx}: too small a change over its region");
            }
            assert!(inside >= 0.85 * total, "{ctx}: the change is not where the finding is");
            if lateralised.contains(&label) {
                assert!(other <= 0.05 * inside, "{ctx}: the other side changed");
            }
            // At the default visibility the finding is as strong (DESIGN 1) or subtler, but still
            // there and still in its place.
            let subtle = draw(&t, &MIMIC, image_seed);
            let (s_inside, _) = diff_in(&subtle, &without, r);
            let (s_total, _) = diff_in(&subtle, &without, [0.0, 1.0, 0.0, 1.0]);
            let ctx = format!(
                "{ctx}; default visibility: peak {:.1}, whole mean {:.3}",
                peak(&subtle, &without),
                s_total / n as f64
            );
            println!("{ctx}");
            if DESIGN[label] == 1.0 {
                assert_eq!(subtle, with, "{ctx}: drawn differently at the default visibility");
            } else {
                assert!(s_total < total && peak(&subtle, &without) >= 0.25 * min_peak, "{ctx}: not subtler, or gone");
                assert!(s_inside >= 0.85 * s_total, "{ctx}: the subtle change is not where the finding is");
            }
        }
    }
}

/// The lateral view draws the findings a lateral shows (the heart and aorta's size, fluid in the
/// posterior sulci, edema, opacities, nodules, plate atelectasis, devices) inside the chest, and
/// leaves out those it does not show on our films (a pneumothorax's thin line, a rib break,
/// pleural thickening): those studies' laterals are pixel-identical to the healthy one.
#[test]
fn lateral_findings_change_the_chest() {
    let seed: u64 = rand::rng().random();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let lateral = |t: &Truth, image_seed: u64| draw_at(t, View::Lateral, &MIMIC, image_seed, &Visibility::full());
    let rounds: usize = std::env::var("FINDINGS_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    for round in 0..rounds {
        let female = rng.random::<bool>();
        let image_seed: u64 = rng.random();
        let without = lateral(&healthy(female, View::Pa), image_seed);
        for label in 1..NUM_LABELS {
            let mut t = healthy(female, View::Pa);
            t.severity[label] = rng.random_range(0.5..1.0);
            if label == DEVICES {
                t.devices =
                    Devices { ett: true, ng_tube: true, central_line: true, pacemaker: true, sternal_wires: true };
            }
            let with = lateral(&t, image_seed);
            let (inside, _) = diff_in(&with, &without, [0.1, 0.95, 0.05, 0.95]);
            let (total, _) = diff_in(&with, &without, [0.0, 1.0, 0.0, 1.0]);
            let ctx = format!(
                "seed {seed} round {round} lateral {}: peak {:.1}, whole mean {:.3}, inside share {:.2}",
                data::LABELS[label],
                peak(&with, &without),
                total / (W * W) as f64,
                inside / total.max(1e-9)
            );
            println!("{ctx}");
            if [PNEUMOTHORAX, FRACTURE, PLEURAL_OTHER].contains(&label) {
                assert!(with == without, "{ctx}: drawn on the lateral");
                continue;
            }
            if label == ECM {
                // A wider aorta: a small step in grey over a long border.
                assert!(total / (W * W) as f64 >= 0.2, "{ctx}: too small a change");
            } else {
                // Seen through both lungs an opacity is fainter than on the frontal; a nodule and
                // a plate of atelectasis are small and fainter still.
                let min_peak = if label == LESION || label == ATELECTASIS { 8.0 } else { 15.0 };
                assert!(peak(&with, &without) >= min_peak, "{ctx}: too faint");
            }
            assert!(inside >= 0.9 * total, "{ctx}: the change is outside the chest");
        }
    }
}
