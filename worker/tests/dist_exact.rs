//! The distributed CLS step is exact: the gradients of one step on 1, 2 and 4 CPU ranks (threads
//! joined by the TCP ring) equal the single-process gradient of the same global batch, and 20
//! AdamW steps give the same loss curve.

use std::time::Duration;

use kernels::{Backend, Cpu};
use model::collectives::Single;
use model::optim::{AdamW, AdamWConfig};
use model::step::{forward_backward, train_step, InfoNceLoss, LocalBatch};
use model::{Clip, ClipConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use worker::comm::ring::loopback_world;
use worker::comm::{HostCollectives, OverHost};

const GLOBAL: usize = 8;
const SEED: u64 = 3;

fn config() -> ClipConfig {
    ClipConfig::small(32, 8, 64, 2, 2)
}

/// The global batch of step `step`: pixels and token ids for `GLOBAL` pairs.
fn batch(step: u64, image: usize, ctx: usize) -> (Vec<f32>, Vec<i32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + step);
    let pixels = (0..GLOBAL * 3 * image * image).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let ids = (0..GLOBAL * ctx)
        .map(|i| match i % ctx {
            0 => 49406,
            // Texts of varying length: end of text, then padding.
            k if k == 5 + (i / ctx) % 20 => 49407,
            k if k > 5 + (i / ctx) % 20 => 0,
            _ => rng.random_range(1..49406),
        })
        .collect();
    (pixels, ids)
}

fn single_process(steps: u64) -> (Vec<f32>, Vec<f32>) {
    let clip = Clip::random(Cpu, config(), GLOBAL, SEED).expect("model");
    let mut loss = InfoNceLoss::new(&clip, 1).expect("loss");
    let mut opt = AdamW::new(&clip, AdamWConfig::default()).expect("adamw");
    let (s, ctx) = (clip.image_size(), clip.context_len());
    let mut losses = Vec::new();
    let mut first_grads = Vec::new();
    for step in 0..steps {
        let (px, ids) = batch(step, s, ctx);
        let lb = LocalBatch { pixels: &px, ids: &ids, b: GLOBAL };
        losses.push(forward_backward(&clip, &mut loss, &mut Single, &lb).expect("step"));
        if step == 0 {
            first_grads = clip.grads_to_host().expect("grads");
        }
        opt.step(&clip, 1e-3).expect("step");
    }
    (losses, first_grads)
}

/// Rank 0's losses and first-step gradients on a world of `world` threads.
fn distributed(world: usize, steps: u64) -> (Vec<f32>, Vec<f32>) {
    distributed_buckets(world, steps, None)
}

/// [`distributed`] with gradient buckets of at least `bucket` values (the default if `None`).
fn distributed_buckets(world: usize, steps: u64, bucket: Option<usize>) -> (Vec<f32>, Vec<f32>) {
    let rings = loopback_world(world, Duration::from_secs(30)).expect("ring");
    let handles: Vec<_> = rings
        .into_iter()
        .map(|ring| {
            std::thread::spawn(move || {
                let b = GLOBAL / world;
                let r = ring.rank();
                let mut comm = OverHost::new(ring);
                let clip = Clip::random(Cpu, config(), b, SEED).expect("model");
                let mut loss = InfoNceLoss::new(&clip, world).expect("loss");
                if let Some(v) = bucket {
                    loss = loss.with_bucket_values(&clip, v);
                }
                let mut opt = AdamW::new(&clip, AdamWConfig::default()).expect("adamw");
                let (s, ctx) = (clip.image_size(), clip.context_len());
                let (np, nt) = (3 * s * s, ctx);
                let mut losses = Vec::new();
                let mut first = Vec::new();
                for step in 0..steps {
                    let (px, ids) = batch(step, s, ctx);
                    let lb = LocalBatch {
                        pixels: &px[r * b * np..(r + 1) * b * np],
                        ids: &ids[r * b * nt..(r + 1) * b * nt],
                        b,
                    };
                    if step == 0 {
                        let l = forward_backward(&clip, &mut loss, &mut comm, &lb).expect("fb");
                        first = clip.grads_to_host().expect("grads");
                        opt.step(&clip, 1e-3).expect("step");
                        losses.push(l);
                    } else {
                        losses.push(train_step(&clip, &mut opt, &mut loss, &mut comm, &lb, 1e-3).expect("step").loss);
                    }
                }
                (losses, first)
            })
        })
        .collect();
    let mut out: Vec<_> = handles.into_iter().map(|h| h.join().expect("rank")).collect();
    // Every rank reports the same global loss.
    for o in &out[1..] {
        assert_eq!(o.0, out[0].0);
    }
    out.swap_remove(0)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f64) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
    assert!(scale > 0.0, "{what}: reference is all zeros");
    // atol relative to the largest reference value: gradients of unused token rows are zero.
    let atol = 1e-6 * scale;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (*g as f64, *w as f64);
        assert!(!g.is_nan() && (g - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn gradients_equal_single_process_on_1_2_4_ranks() {
    let (ref_loss, ref_grads) = single_process(1);
    for world in [1, 2, 4] {
        let (loss, grads) = distributed(world, 1);
        assert_close(&format!("loss on {world} ranks"), &loss, &ref_loss, 1e-5);
        assert_close(&format!("gradient on {world} ranks"), &grads, &ref_grads, 1e-4);
    }
}

#[test]
fn twenty_steps_same_loss_curve() {
    let (ref_loss, _) = single_process(20);
    for world in [2, 4] {
        let (loss, _) = distributed(world, 20);
        assert_close(&format!("loss curve on {world} ranks"), &loss, &ref_loss, 1e-4);
    }
    // The curve moves: the steps train.
    assert!(ref_loss[19] < ref_loss[0], "{ref_loss:?}");
}

/// The gradient summed bucket by bucket while the backward runs (one bucket per finished range,
/// or a few mid-sized ones) is still the single-process gradient.
#[test]
fn bucketed_gradient_sums_equal_single_process() {
    let (ref_loss, ref_grads) = single_process(1);
    for (world, bucket) in [(2, 0), (4, 0), (2, 20_000), (4, 20_000)] {
        let (loss, grads) = distributed_buckets(world, 1, Some(bucket));
        assert_close(&format!("loss on {world} ranks, buckets of {bucket}"), &loss, &ref_loss, 1e-5);
        assert_close(&format!("gradient on {world} ranks, buckets of {bucket}"), &grads, &ref_grads, 1e-4);
    }
}

/// The symmetric InfoNCE loss of `n` pairs materialised in f64 (both directions' `n x n`
/// logits, the definition the two-block op computed): the loss and its gradients with respect
/// to the image and text features.
fn materialised(img: &[f32], txt: &[f32], n: usize, d: usize, ls: f64) -> (f64, Vec<f64>, Vec<f64>) {
    let (mut di, mut dt) = (vec![0.0f64; n * d], vec![0.0f64; n * d]);
    let a = direction(img, txt, n, d, ls, &mut di, &mut dt);
    let b = direction(txt, img, n, d, ls, &mut dt, &mut di);
    ((a + b) / (2 * n) as f64, di, dt)
}

/// One direction of [`materialised`]: the sum of `lse_i - logit_ii`; adds the gradients.
fn direction(x: &[f32], y: &[f32], n: usize, d: usize, ls: f64, dx: &mut [f64], dy: &mut [f64]) -> f64 {
    let s = ls.exp();
    let mut loss = 0.0;
    for i in 0..n {
        let z: Vec<f64> =
            (0..n).map(|j| s * (0..d).map(|k| x[i * d + k] as f64 * y[j * d + k] as f64).sum::<f64>()).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        loss += lse - z[i];
        for j in 0..n {
            let g = ((z[j] - lse).exp() - f64::from(u8::from(i == j))) / (2 * n) as f64;
            for k in 0..d {
                dx[i * d + k] += g * s * y[j * d + k] as f64;
                dy[j * d + k] += g * s * x[i * d + k] as f64;
            }
        }
    }
    loss
}

/// Each rank's one similarity block (its images against all texts, the column statistics
/// combined over the ring) gives the materialised two-direction loss of the global batch and
/// every feature's gradient, on 1, 2 and 4 ranks, at a global batch of 64 (a partial column
/// tile, and row tiles of 64, 32 and 16 images).
#[test]
fn one_block_loss_equals_materialised_on_1_2_4_ranks() {
    const N: usize = 64;
    for world in [1usize, 2, 4] {
        let rings = loopback_world(world, Duration::from_secs(30)).expect("ring");
        let handles: Vec<_> = rings
            .into_iter()
            .map(|ring| {
                std::thread::spawn(move || {
                    let b = N / world;
                    let r = ring.rank();
                    let mut comm = OverHost::new(ring);
                    let clip = Clip::random(Cpu, config(), b, SEED).expect("model");
                    let mut loss = InfoNceLoss::new(&clip, world).expect("loss");
                    let (s, ctx) = (clip.image_size(), clip.context_len());
                    // Fresh inputs for each run: a different batch of the same shape.
                    let mut rng = ChaCha8Rng::seed_from_u64(rand::random());
                    let px: Vec<f32> = (0..b * 3 * s * s).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                    let ids: Vec<i32> = (0..b * ctx)
                        .map(|i| match i % ctx {
                            0 => 49406,
                            k if k == 6 + (r + i / ctx) % 9 => 49407,
                            k if k > 6 + (r + i / ctx) % 9 => 0,
                            _ => rng.random_range(1..49406),
                        })
                        .collect();
                    let lb = LocalBatch { pixels: &px, ids: &ids, b };
                    let l = forward_backward(&clip, &mut loss, &mut comm, &lb).expect("fb");
                    let be = &clip.backend;
                    let d = clip.config.projection_dim;
                    let get = |t: &kernels::Tensor<Cpu>| {
                        let mut v = vec![0.0f32; b * d];
                        be.download_f32(t, &mut v).expect("download");
                        v
                    };
                    let mut ls = [0.0f32];
                    be.download_f32(&clip.logit_scale().value, &mut ls).expect("scale");
                    let out = [
                        get(&clip.image_embeds(b)),
                        get(&clip.text_embeds(b)),
                        get(&clip.image_embeds_grad(b)),
                        get(&clip.text_embeds_grad(b)),
                    ];
                    (l, ls[0], out)
                })
            })
            .collect();
        let ranks: Vec<_> = handles.into_iter().map(|h| h.join().expect("rank")).collect();
        let cat = |k: usize| ranks.iter().flat_map(|r| r.2[k].clone()).collect::<Vec<f32>>();
        let (img, txt, d_img, d_txt) = (cat(0), cat(1), cat(2), cat(3));
        let d = img.len() / N;
        let (want, want_img, want_txt) = materialised(&img, &txt, N, d, ranks[0].1 as f64);
        let w32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        for (r, rank) in ranks.iter().enumerate() {
            assert_close(&format!("loss of rank {r} on {world} ranks"), &[rank.0], &[want as f32], 1e-5);
        }
        assert_close(&format!("image feature gradient on {world} ranks"), &d_img, &w32(&want_img), 1e-4);
        assert_close(&format!("text feature gradient on {world} ranks"), &d_txt, &w32(&want_txt), 1e-4);
    }
}
