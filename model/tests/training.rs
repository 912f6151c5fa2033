//! Model-level checks that the transformers fixtures cannot make: adapters (by directional
//! finite differences), freezing, checkpoint round trips and their error messages.

use std::path::Path;

use kernels::{Backend, Cpu};
use model::checkpoint::{write_f32_safetensors, WEIGHTS};
use model::collectives::Single;
use model::freeze::ADAPTERS_AND_NORMS;
use model::optim::{AdamW, AdamWConfig};
use model::step::{self, InfoNceLoss, LocalBatch};
use model::train_state::{self, RunPosition};
use model::{Clip, ClipConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn seed() -> u64 {
    model::testkit::seed("MODEL_SEED")
}

fn tiny(adapter: Option<usize>) -> ClipConfig {
    let mut c = ClipConfig::small(16, 8, 16, 2, 2);
    c.projection_dim = 8;
    c.text_config.vocab_size = 50;
    c.text_config.bos_token_id = 48;
    c.text_config.eos_token_id = 49;
    c.text_config.max_position_embeddings = 9;
    c.vision_config.hidden_act = "gelu".into();
    c.adapter_dim = adapter;
    c
}

struct Batch {
    b: usize,
    pixels: Vec<f32>,
    ids: Vec<i32>,
}

fn batch(rng: &mut ChaCha8Rng, c: &ClipConfig, b: usize) -> Batch {
    let (pixels, ids) = model::testkit::random_batch(rng, c, b);
    Batch { b, pixels, ids }
}

/// The loss of `x`, and with `backward` the whole step's gradient (the step every caller runs,
/// in a world of one).
fn loss_and_grads(clip: &Clip<Cpu>, x: &Batch, backward: bool) -> f32 {
    let mut loss = InfoNceLoss::new(clip, 1).unwrap();
    if backward {
        let lb = LocalBatch { pixels: &x.pixels, ids: &x.ids, b: x.b };
        return step::forward_backward(clip, &mut loss, &mut Single, &lb).unwrap();
    }
    clip.zero_grads();
    clip.upload_pixels(&x.pixels, x.b).unwrap();
    clip.forward_vision(x.b).unwrap();
    clip.forward_text(&x.ids, x.b).unwrap();
    loss.forward_backward(clip, &mut Single, x.b).unwrap()
}

/// Directional finite differences of the whole model's loss along random directions in the
/// parameters selected by `select`, against the analytic gradient.
fn check_directional(clip: &Clip<Cpu>, select: impl Fn(&str) -> bool, rng: &mut ChaCha8Rng, what: &str) {
    let x = batch(rng, &clip.config, 3);
    let theta = clip.params_to_host().unwrap();
    loss_and_grads(clip, &x, true);
    let g = clip.grads_to_host().unwrap();
    for trial in 0..3 {
        let mut v = vec![0.0f64; theta.len()];
        for s in clip.layout.specs.iter().filter(|s| select(&s.name)) {
            for x in &mut v[s.offset..s.offset + s.len] {
                *x = rng.random_range(-1.0..1.0);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{what}: no parameter selected");
        v.iter_mut().for_each(|x| *x /= norm);
        let analytic: f64 = g.iter().zip(&v).map(|(&g, &v)| g as f64 * v).sum();
        // The loss is an f32 sum: rounding puts ~2e-6 of noise on each evaluation, which a
        // central difference divides by the step, while its truncation error grows with the
        // step squared. Measured over 60 seeds, no step of a central difference kept both under
        // the tolerance along all parameters (max error 8e-4 at 2e-3, 1.5e-3 at 1e-2). The
        // fourth-order difference (Richardson on steps h and 2h) at h = 1.6e-2 cancels the h^2
        // term and divides the noise by a larger step: max error 1.3e-4 over the same seeds.
        let h = 1.6e-2;
        let at = |step: f64| {
            let p: Vec<f32> = theta.iter().zip(&v).map(|(&t, &v)| (t as f64 + step * v) as f32).collect();
            clip.params_from_host(&p).unwrap();
            loss_and_grads(clip, &x, false) as f64
        };
        let central = |step: f64| (at(step) - at(-step)) / (2.0 * step);
        let fd = (4.0 * central(h) - central(2.0 * h)) / 3.0;
        clip.params_from_host(&theta).unwrap();
        let tol = 2e-4 + 2e-2 * analytic.abs();
        assert!(
            (fd - analytic).abs() <= tol && fd.is_finite(),
            "{what} direction {trial}: finite differences {fd:e} vs analytic {analytic:e}"
        );
    }
}

fn with_random_adapters(clip: &Clip<Cpu>, rng: &mut ChaCha8Rng) {
    // A fresh adapter's up projection is zero (the identity); make it non-trivial so that
    // gradients flow through every adapter weight.
    let mut p = clip.params_to_host().unwrap();
    for s in clip.layout.specs.iter().filter(|s| s.name.contains(".adapter.")) {
        for x in &mut p[s.offset..s.offset + s.len] {
            *x = rng.random_range(-0.3..0.3);
        }
    }
    clip.params_from_host(&p).unwrap();
}

#[test]
fn adapter_gradients_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let clip = Clip::random(Cpu, tiny(Some(4)), 3, rng.random()).unwrap();
    with_random_adapters(&clip, &mut rng);
    check_directional(&clip, |n| n.contains(".adapter."), &mut rng, "adapters");
    check_directional(&clip, |_| true, &mut rng, "all parameters");
}

#[test]
fn fresh_adapters_are_the_identity() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let s: u64 = rng.random();
    let plain = Clip::random(Cpu, tiny(None), 2, s).unwrap();
    let adapted = Clip::random(Cpu, tiny(Some(4)), 2, s).unwrap();
    // Copy the shared parameters so that only the (fresh) adapters differ.
    let src = plain.params_to_host().unwrap();
    let mut dst = adapted.params_to_host().unwrap();
    for spec in &plain.layout.specs {
        let d = adapted.layout.spec(&spec.name);
        dst[d.offset..d.offset + d.len].copy_from_slice(&src[spec.offset..spec.offset + spec.len]);
    }
    adapted.params_from_host(&dst).unwrap();
    let x = batch(&mut rng, &plain.config, 2);
    let l1 = loss_and_grads(&plain, &x, false);
    let l2 = loss_and_grads(&adapted, &x, false);
    assert!((l1 - l2).abs() <= 1e-6 * l1.abs(), "{l1} vs {l2}");
}

#[test]
fn freezing_leaves_frozen_parameters_untouched() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let mut clip = Clip::random(Cpu, tiny(Some(4)), 3, rng.random()).unwrap();
    with_random_adapters(&clip, &mut rng);
    let n = clip.train_only(ADAPTERS_AND_NORMS).unwrap();
    assert!(n > 0);
    assert!(clip.train_only(&["*no_such_tensor*"]).is_err());
    clip.train_only(ADAPTERS_AND_NORMS).unwrap();
    let mut opt = AdamW::new(&clip, AdamWConfig::default()).unwrap();
    let x = batch(&mut rng, &clip.config, 3);
    let before = clip.params_to_host().unwrap();
    loss_and_grads(&clip, &x, true);
    let grads = clip.grads_to_host().unwrap();
    opt.step(&clip, 1e-2).unwrap();
    let after = clip.params_to_host().unwrap();
    for (spec, &train) in clip.layout.specs.iter().zip(clip.trainable()) {
        let r = spec.offset..spec.offset + spec.len;
        let moved = before[r.clone()] != after[r.clone()];
        if train {
            assert!(moved, "{} trains but did not move", spec.name);
        } else {
            assert!(!moved, "{} is frozen but moved", spec.name);
            // Frozen weights get no gradient at all (their products are skipped), except
            // the packed q/k/v whose views are shared.
            if !spec.name.contains("_proj.") {
                assert!(grads[r].iter().all(|&g| g == 0.0), "{} is frozen but has a gradient", spec.name);
            }
        }
    }
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cxrclip-model-{tag}-{}-{}", std::process::id(), seed()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn checkpoint_round_trip_and_train_state() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let clip = Clip::random(Cpu, tiny(Some(4)), 2, rng.random()).unwrap();
    let dir = tmpdir("rt");
    clip.save_pretrained(&dir, &[("note.txt", b"hello")]).unwrap();
    let (back, report) = Clip::from_pretrained(Cpu, &dir, 2).unwrap();
    assert!(report.unused.is_empty() && report.initialised.is_empty());
    // The written config gains `model_type` and `architectures` for transformers.
    assert_eq!(back.config.text_config, clip.config.text_config);
    assert_eq!(back.config.vision_config, clip.config.vision_config);
    assert_eq!(
        (back.config.projection_dim, back.config.adapter_dim),
        (clip.config.projection_dim, clip.config.adapter_dim)
    );
    assert_eq!(back.config.extra["model_type"], "clip");
    assert_eq!(back.params_to_host().unwrap(), clip.params_to_host().unwrap());
    assert_eq!(std::fs::read(dir.join("note.txt")).unwrap(), b"hello");
    // Overwriting an existing checkpoint works and leaves no temporary folders behind.
    clip.save_pretrained(&dir, &[]).unwrap();
    let parent = dir.parent().unwrap();
    let stem = dir.file_name().unwrap().to_string_lossy().into_owned();
    let leftovers = std::fs::read_dir(parent)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(&format!(".{stem}.")))
        .count();
    assert_eq!(leftovers, 0);

    // Optimiser moments, step and position survive a save/load.
    let mut opt = AdamW::new(&clip, AdamWConfig::default()).unwrap();
    let x = batch(&mut rng, &clip.config, 2);
    loss_and_grads(&clip, &x, true);
    opt.step(&clip, 1e-3).unwrap();
    let pos = RunPosition { step: 1, rng: vec![1, 2, 3], data_epoch: 4, data_batch: 5 };
    let path = dir.join("train_state.safetensors");
    train_state::save(&path, &clip, &opt, &pos).unwrap();
    let mut opt2 = AdamW::new(&clip, AdamWConfig::default()).unwrap();
    assert_eq!(train_state::load(&path, &clip, &mut opt2).unwrap(), pos);
    let host = |t: &kernels::Tensor<Cpu>| {
        let mut v = vec![0.0; t.len()];
        Cpu.download_f32(t, &mut v).unwrap();
        v
    };
    assert_eq!(host(&opt2.m), host(&opt.m));
    assert_eq!(host(&opt2.v), host(&opt.v));
    assert_eq!(opt2.step, 1);

    // Frozen parameters' moments are not written (they are zero), and load back as zeros;
    // a trainable parameter whose moments are missing is refused.
    let mut frozen = Clip::random(Cpu, tiny(Some(4)), 2, rng.random()).unwrap();
    frozen.train_only(ADAPTERS_AND_NORMS).unwrap();
    let mut opt = AdamW::new(&frozen, AdamWConfig::default()).unwrap();
    loss_and_grads(&frozen, &x, true);
    opt.step(&frozen, 1e-3).unwrap();
    train_state::save(&path, &frozen, &opt, &pos).unwrap();
    let names = safetensors::SafeTensors::deserialize(&std::fs::read(&path).unwrap())
        .unwrap()
        .names()
        .into_iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    let trained = frozen.trainable().iter().filter(|&&t| t).count();
    assert_eq!(names.iter().filter(|n| n.starts_with("m.")).count(), trained);
    assert!(trained < frozen.layout.specs.len());
    let mut opt2 = AdamW::new(&frozen, AdamWConfig::default()).unwrap();
    train_state::load(&path, &frozen, &mut opt2).unwrap();
    assert_eq!(host(&opt2.m), host(&opt.m));
    assert_eq!(host(&opt2.v), host(&opt.v));
    assert!(host(&opt.m).iter().any(|&x| x != 0.0));
    let all = Clip::random(Cpu, tiny(Some(4)), 2, rng.random()).unwrap();
    let mut opt3 = AdamW::new(&all, AdamWConfig::default()).unwrap();
    let e = train_state::load(&path, &all, &mut opt3).unwrap_err().to_string();
    assert!(e.contains("a trainable parameter's moments"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Clip::from_pretrained(Cpu, dir, 1) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_checkpoints_are_clear_errors() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let clip = Clip::random(Cpu, tiny(None), 1, rng.random()).unwrap();
    let dir = tmpdir("bad");
    clip.save_pretrained(&dir, &[]).unwrap();
    let weights = dir.join(WEIGHTS);
    let values = clip.params_to_host().unwrap();
    let all: Vec<(String, Vec<usize>, &[f32])> = clip
        .layout
        .specs
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone(), &values[s.offset..s.offset + s.len]))
        .collect();

    // A missing tensor is named, with the file.
    let missing = "text_model.encoder.layers.1.mlp.fc2.bias";
    let fewer: Vec<_> = all.iter().filter(|t| t.0 != missing).cloned().collect();
    write_f32_safetensors(&weights, &fewer).unwrap();
    let e = load_err(&dir);
    assert!(e.contains(missing) && e.contains("model.safetensors"), "{e}");

    // A wrong shape is named with both shapes.
    let mut wrong = all.clone();
    let w = wrong.iter_mut().find(|t| t.0 == "visual_projection.weight").unwrap();
    w.1 = vec![w.1[1], w.1[0]];
    write_f32_safetensors(&weights, &wrong).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("visual_projection.weight") && e.contains("shape"), "{e}");

    // A truncated file says so.
    write_f32_safetensors(&weights, &all).unwrap();
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("truncated") && e.contains("model.safetensors"), "{e}");

    // A missing config is named.
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every gradient range is reported exactly once, after the last op that writes it: a range's
/// values when reported equal its values at the end of the step (with and without adapters,
/// and with part of the model frozen).
#[test]
fn backward_reports_each_gradient_range_once_when_final() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    for (adapter, frozen) in [(None, false), (Some(4), false), (Some(4), true)] {
        let mut clip = Clip::random(Cpu, tiny(adapter), 3, rng.random()).unwrap();
        with_random_adapters(&clip, &mut rng);
        if frozen {
            clip.train_only(ADAPTERS_AND_NORMS).unwrap();
        }
        let mut loss = InfoNceLoss::new(&clip, 1).unwrap();
        let x = batch(&mut rng, &clip.config, 3);
        clip.zero_grads();
        clip.upload_pixels(&x.pixels, x.b).unwrap();
        clip.forward_vision(x.b).unwrap();
        clip.forward_text(&x.ids, x.b).unwrap();
        loss.forward_backward(&clip, &mut Single, x.b).unwrap();
        let mut seen: Vec<(std::ops::Range<usize>, Vec<f32>)> = Vec::new();
        let order = clip.grad_order().clone();
        let snap = |clip: &Clip<Cpu>, r: std::ops::Range<usize>| {
            let mut v = vec![0.0; r.len()];
            clip.backend.download_f32(&clip.grads.slice(r.start, r.len()), &mut v).unwrap();
            (r, v)
        };
        // Each range is copied when it is reported, before the rest of the backward runs.
        seen.push(snap(&clip, order.logit_scale.clone()));
        clip.backward_vision_with(x.b, &mut |r| seen.push(snap(&clip, r)));
        let vision_done = seen.len();
        clip.backward_text_with(x.b, &mut |r| seen.push(snap(&clip, r)));
        assert!(vision_done > 2 && seen.len() > vision_done);
        let end = clip.grads_to_host().unwrap();
        let mut covered = vec![0u8; clip.layout.total];
        for (r, v) in &seen {
            for i in r.clone() {
                covered[i] += 1;
            }
            assert_eq!(&end[r.clone()], &v[..], "range {r:?} changed after it was reported");
        }
        assert!(covered.iter().all(|&c| c == 1), "ranges do not cover the gradient exactly once");
        // The step really wrote gradients (a test on zeros would prove nothing).
        assert!(end.iter().filter(|g| g.abs() > 0.0).count() > clip.layout.total / 20);
    }
}
