//! Gradient caching is exact on a distributed world: on 1 and 2 CPU ranks (threads joined by the
//! TCP ring), a step whose local batch of 10 runs in micro-batches of 1, 3 or 8 pairs gives the
//! single-process, one-pass loss and parameter gradient of the global batch, for contrastive
//! training and for fine-tuning's label head. Fresh random inputs each run (`GRADCACHE_SEED` to
//! replay one).

use std::sync::Arc;
use std::time::Duration;

use kernels::Cpu;
use model::collectives::{Collectives, Single};
use model::gradcache::vision_accumulate;
use model::head::{LabelHead, Targets};
use model::step::{forward_backward, GradientSum, InfoNceLoss, LocalBatch};
use model::{Clip, ClipConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use worker::comm::ring::loopback_world;
use worker::comm::{HostCollectives, OverHost};

const LOCAL: usize = 10;
const LABELS: usize = 4;

fn seed() -> u64 {
    model::testkit::seed("GRADCACHE_SEED")
}

fn config() -> ClipConfig {
    ClipConfig::small(16, 8, 32, 2, 2)
}

/// A global batch of `n` pairs with labels: pixels, token ids, targets, mask.
struct Global {
    pixels: Vec<f32>,
    ids: Vec<i32>,
    targets: Vec<f32>,
    mask: Vec<f32>,
    pos_weight: Vec<f32>,
    head: LabelHead,
}

fn global(seed: u64, n: usize) -> Global {
    let c = config();
    let (s, ctx) = (c.vision_config.image_size, c.text_config.max_position_embeddings);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pixels = (0..n * 3 * s * s).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let ids = (0..n * ctx)
        .map(|i| {
            let len = 4 + (i / ctx) * 7 % 30;
            match i % ctx {
                0 => 49406,
                k if k == len => 49407,
                k if k > len => 0,
                _ => rng.random_range(1..49406),
            }
        })
        .collect();
    let targets = (0..n * LABELS).map(|_| rng.random_range(0..2) as f32).collect();
    let mask = (0..n * LABELS).map(|_| if rng.random_range(0..4) == 0 { 0.0 } else { 1.0 }).collect();
    let pos_weight = (0..LABELS).map(|_| rng.random_range(0.5f32..3.0)).collect();
    let mut head = LabelHead::random(LABELS, c.projection_dim, seed);
    head.weight.iter_mut().for_each(|w| *w = rng.random_range(-1.0..1.0));
    Global { pixels, ids, targets, mask, pos_weight, head }
}

/// One rank's step on rows `rows` of the global batch, with a model of `capacity` pairs: the
/// loss and the model's gradient after the sum over the ranks; for fine-tuning the head's
/// gradient summed over the ranks follows the tower's.
fn rank_step(
    g: &Global,
    seed: u64,
    rows: std::ops::Range<usize>,
    capacity: usize,
    finetune: bool,
    comm: &mut dyn Collectives<Cpu>,
) -> (f32, Vec<f32>) {
    let c = config();
    let (s, ctx) = (c.vision_config.image_size, c.text_config.max_position_embeddings);
    let (px, b) = (3 * s * s, rows.len());
    let mut clip = Clip::random(Cpu, c.clone(), capacity, seed).expect("model");
    let pixels = &g.pixels[rows.start * px..rows.end * px];
    if !finetune {
        let mut loss = InfoNceLoss::for_batch(&clip, b, comm.world()).expect("loss");
        let lb = LocalBatch { pixels, ids: &g.ids[rows.start * ctx..rows.end * ctx], b };
        let l = forward_backward(&clip, &mut loss, comm, &lb).expect("step");
        return (l, clip.grads_to_host().expect("grads"));
    }
    // Fine-tuning as the worker's job runs it: the global count first, then the accumulation.
    clip.train_only(&["vision_model.*", "visual_projection.*"]).expect("freeze");
    let cells = rows.start * LABELS..rows.end * LABELS;
    let mut count = [g.mask[cells.clone()].iter().sum::<f32>()];
    comm.all_reduce_host(&mut count).expect("count");
    let mut sum = GradientSum::new(&clip).expect("buckets");
    let mut flat = vec![0.0f32; LABELS * c.projection_dim + LABELS + 1];
    let mut loss_sum = 0.0f64;
    vision_accumulate(&clip, &mut sum, comm, pixels, b, &mut |r, e| {
        let at = (rows.start + r.start) * LABELS..(rows.start + r.end) * LABELS;
        let t = Targets { targets: &g.targets[at.clone()], mask: &g.mask[at], pos_weight: &g.pos_weight };
        let hg = g.head.loss_backward(e, &t, count[0] as f64)?;
        for (a, x) in flat.iter_mut().zip(hg.d_weight.iter().chain(&hg.d_bias)) {
            *a += x;
        }
        loss_sum += hg.loss_sum;
        Ok(hg.d_embeds)
    })
    .expect("step");
    *flat.last_mut().unwrap() = loss_sum as f32;
    comm.all_reduce_host(&mut flat).expect("head sum");
    let loss = flat.pop().unwrap() / count[0];
    let mut grads = clip.grads_to_host().expect("grads");
    grads.extend(flat);
    (loss, grads)
}

/// Rank 0's loss and gradient on a world of `world` ranks, each with `LOCAL` pairs.
fn distributed(g: &Arc<Global>, seed: u64, world: usize, micro: usize, finetune: bool) -> (f32, Vec<f32>) {
    let rings = loopback_world(world, Duration::from_secs(30)).expect("ring");
    let handles: Vec<_> = rings
        .into_iter()
        .map(|ring| {
            let g = g.clone();
            std::thread::spawn(move || {
                let r = ring.rank();
                let mut comm = OverHost::new(ring);
                rank_step(&g, seed, r * LOCAL..(r + 1) * LOCAL, micro, finetune, &mut comm)
            })
        })
        .collect();
    let mut out: Vec<_> = handles.into_iter().map(|h| h.join().expect("rank")).collect();
    for o in &out[1..] {
        assert_eq!(o.0, out[0].0, "ranks report different losses");
    }
    out.swap_remove(0)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
    assert!(scale > 0.0, "{what}: reference is all zeros");
    // atol relative to the largest reference value: gradients of unused token rows are zero.
    let atol = 1e-6 * scale;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (*g as f64, *w as f64);
        assert!(!g.is_nan() && (g - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: {g} vs {w}");
    }
}

fn check(finetune: bool) {
    let s = seed();
    let what = if finetune { "FT" } else { "CLS" };
    for world in [1, 2] {
        let g = Arc::new(global(s, world * LOCAL));
        // The reference: one process, the whole global batch in one pass.
        let (ref_loss, ref_grads) = rank_step(&g, s, 0..world * LOCAL, world * LOCAL, finetune, &mut Single);
        assert!(ref_loss.is_finite() && ref_loss > 0.0);
        for micro in [1, 3, 8] {
            let (l, grads) = distributed(&g, s, world, micro, finetune);
            let tag = format!("seed {s}: {what} on {world} ranks, micro-batches of {micro}");
            assert_close(&format!("{tag}: loss"), &[l], &[ref_loss], 1e-5);
            assert_close(&format!("{tag}: gradient"), &grads, &ref_grads, 1e-4);
        }
    }
}

#[test]
fn contrastive_gradient_in_micro_batches_equals_one_pass_on_1_and_2_ranks() {
    check(false);
}

#[test]
fn finetune_gradient_in_micro_batches_equals_one_pass_on_1_and_2_ranks() {
    check(true);
}
