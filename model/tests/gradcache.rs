//! Gradient caching is exact: the loss and the parameter gradient of a contrastive step run in
//! micro-batches of 1, 3 and 8 pairs (3 and 8 do not divide the local batch of 10) equal those of
//! the one-pass step; fine-tuning's accumulation over micro-batches likewise. (The same on two
//! ranks: worker/tests/gradcache_exact.rs.)

use kernels::Cpu;
use model::collectives::Single;
use model::gradcache::{micro_batches, vision_accumulate};
use model::head::{LabelHead, Targets};
use model::step::{self, GradientSum, InfoNceLoss, LocalBatch, Phase};
use model::{Clip, ClipConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: usize = 10;

fn seed() -> u64 {
    model::testkit::seed("MODEL_SEED")
}

fn config() -> ClipConfig {
    let mut c = ClipConfig::small(16, 8, 32, 2, 2);
    c.projection_dim = 16;
    c.text_config.vocab_size = 60;
    c.text_config.bos_token_id = 58;
    c.text_config.eos_token_id = 59;
    c.text_config.max_position_embeddings = 12;
    c
}

fn batch(rng: &mut ChaCha8Rng, c: &ClipConfig, b: usize) -> (Vec<f32>, Vec<i32>) {
    model::testkit::random_batch(rng, c, b)
}

/// `got` within `atol + rtol |want|` of `want` everywhere, with `atol` relative to the largest
/// reference value (gradients of token rows no text uses are exactly zero).
fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
    assert!(scale > 0.0, "{what}: reference is all zeros");
    let atol = 1e-6 * scale;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (*g as f64, *w as f64);
        assert!(!g.is_nan() && (g - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: {g} vs {w}");
    }
}

/// The loss and gradient of one contrastive step on the batch, the model holding activations for
/// `micro` pairs (`B`: one pass).
fn cls_step(seed: u64, micro: usize, pixels: &[f32], ids: &[i32]) -> (f32, Vec<f32>) {
    let clip = Clip::random(Cpu, config(), micro, seed).unwrap();
    let mut loss = InfoNceLoss::for_batch(&clip, B, 1).unwrap();
    let lb = LocalBatch { pixels, ids, b: B };
    let l = step::forward_backward(&clip, &mut loss, &mut Single, &lb).unwrap();
    (l, clip.grads_to_host().unwrap())
}

#[test]
fn micro_batches_cover_the_batch_in_order() {
    assert_eq!(micro_batches(10, 3), vec![0..3, 3..6, 6..9, 9..10]);
    assert_eq!(micro_batches(10, 8), vec![0..8, 8..10]);
    assert_eq!(micro_batches(10, 1).len(), 10);
    assert_eq!(micro_batches(10, 10), vec![0..10]);
    assert_eq!(micro_batches(4, 16), vec![0..4]);
}

#[test]
fn contrastive_gradient_in_micro_batches_equals_one_pass() {
    let s = seed();
    let mut rng = ChaCha8Rng::seed_from_u64(s);
    let (pixels, ids) = batch(&mut rng, &config(), B);
    let (ref_loss, ref_grads) = cls_step(s, B, &pixels, &ids);
    assert!(ref_loss.is_finite() && ref_loss > 0.0);
    for micro in [1, 3, 8] {
        let (l, g) = cls_step(s, micro, &pixels, &ids);
        assert_close(&format!("seed {s}: loss in micro-batches of {micro}"), &[l], &[ref_loss], 1e-5);
        assert_close(&format!("seed {s}: gradient in micro-batches of {micro}"), &g, &ref_grads, 1e-4);
    }
}

/// A second step on the same loss and model (buffers reused, gradients zeroed once per step)
/// gives the second one-pass step's gradient, and the observer sees the one-pass phases in order.
#[test]
fn consecutive_steps_reuse_the_buffers_and_report_every_phase() {
    let s = seed();
    let mut rng = ChaCha8Rng::seed_from_u64(s);
    let c = config();
    let one = Clip::random(Cpu, c.clone(), B, s).unwrap();
    let micro = Clip::random(Cpu, c.clone(), 3, s).unwrap();
    let mut l1 = InfoNceLoss::new(&one, 1).unwrap();
    let mut l3 = InfoNceLoss::for_batch(&micro, B, 1).unwrap();
    for _ in 0..2 {
        let (pixels, ids) = batch(&mut rng, &c, B);
        let lb = LocalBatch { pixels: &pixels, ids: &ids, b: B };
        let want = step::forward_backward(&one, &mut l1, &mut Single, &lb).unwrap();
        let mut phases = Vec::new();
        let got = step::forward_backward_observed(&micro, &mut l3, &mut Single, &lb, &mut |p| {
            phases.push(p);
            Ok(())
        })
        .unwrap();
        assert_close(&format!("seed {s}: loss"), &[got], &[want], 1e-5);
        assert_close(
            &format!("seed {s}: gradient"),
            &micro.grads_to_host().unwrap(),
            &one.grads_to_host().unwrap(),
            1e-4,
        );
        assert_eq!(phases, Phase::ALL[..5]);
    }
    // A batch above the loss's capacity is refused, not cut.
    let (pixels, ids) = batch(&mut rng, &c, B + 1);
    let lb = LocalBatch { pixels: &pixels, ids: &ids, b: B + 1 };
    let e = step::forward_backward(&micro, &mut l3, &mut Single, &lb).unwrap_err().to_string();
    assert!(e.contains("capacity"), "{e}");
}

/// Fine-tuning's step: the label head's loss on the image embeddings, accumulated over
/// micro-batches; the head's loss and gradients and the tower's gradient equal one pass's.
#[test]
fn finetune_accumulation_equals_one_pass() {
    let s = seed();
    let mut rng = ChaCha8Rng::seed_from_u64(s);
    let c = config();
    let labels = 5;
    let (pixels, _) = batch(&mut rng, &c, B);
    let targets: Vec<f32> = (0..B * labels).map(|_| rng.random_range(0..2) as f32).collect();
    let mask: Vec<f32> = (0..B * labels).map(|_| if rng.random_range(0..4) == 0 { 0.0 } else { 1.0 }).collect();
    let pos_weight: Vec<f32> = (0..labels).map(|_| rng.random_range(0.5..3.0)).collect();
    let mut head = LabelHead::random(labels, c.projection_dim, s);
    head.weight.iter_mut().for_each(|w| *w = rng.random_range(-1.0..1.0));
    let count = mask.iter().sum::<f32>() as f64;
    let run = |micro: usize| {
        let mut clip = Clip::random(Cpu, c.clone(), micro, s).unwrap();
        clip.train_only(&["vision_model.*", "visual_projection.*"]).unwrap();
        let mut sum = GradientSum::new(&clip).unwrap();
        let (mut loss_sum, mut d_head) = (0.0f64, vec![0.0f32; labels * c.projection_dim + labels]);
        vision_accumulate(&clip, &mut sum, &mut Single, &pixels, B, &mut |r, e| {
            let rows = r.start * labels..r.end * labels;
            let t = Targets { targets: &targets[rows.clone()], mask: &mask[rows], pos_weight: &pos_weight };
            let g = head.loss_backward(e, &t, count)?;
            loss_sum += g.loss_sum;
            for (a, x) in d_head.iter_mut().zip(g.d_weight.iter().chain(&g.d_bias)) {
                *a += x;
            }
            Ok(g.d_embeds)
        })
        .unwrap();
        (loss_sum as f32, d_head, clip.grads_to_host().unwrap())
    };
    let (ref_loss, ref_head, ref_grads) = run(B);
    assert!(ref_loss > 0.0 && ref_grads.iter().any(|&g| g != 0.0));
    for micro in [1, 3, 8] {
        let (l, h, g) = run(micro);
        assert_close(&format!("seed {s}: FT loss, micro-batches of {micro}"), &[l], &[ref_loss], 1e-5);
        assert_close(&format!("seed {s}: FT head gradient, micro-batches of {micro}"), &h, &ref_head, 1e-4);
        assert_close(&format!("seed {s}: FT tower gradient, micro-batches of {micro}"), &g, &ref_grads, 1e-4);
    }
}
