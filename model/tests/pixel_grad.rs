//! The frozen model's backward to the input pixels: d(similarity)/d(pixels) through the whole
//! vision tower against finite differences, and what the frozen mode refuses.

use kernels::{Backend, Cpu};
use model::{Clip, ClipConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny() -> ClipConfig {
    let mut c = ClipConfig::small(16, 4, 16, 2, 2);
    c.projection_dim = 8;
    c.text_config.vocab_size = 50;
    c.text_config.bos_token_id = 48;
    c.text_config.eos_token_id = 49;
    c.text_config.max_position_embeddings = 9;
    c
}

/// Similarity of each image's embedding with one text embedding, summed over the batch
/// (`b` images of `pixels`), and with `grad` its gradient with respect to the pixels.
fn similarity(clip: &Clip<Cpu>, pixels: &[f32], text: &[f32], b: usize, grad: bool) -> (f64, Vec<f32>) {
    let be = &clip.backend;
    let d = clip.config.projection_dim;
    clip.upload_pixels(pixels, b).unwrap();
    clip.forward_vision(b).unwrap();
    let mut emb = vec![0.0; b * d];
    be.download_f32(&clip.image_embeds(b), &mut emb).unwrap();
    let sim: f64 =
        emb.chunks_exact(d).map(|e| e.iter().zip(text).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>()).sum();
    if !grad {
        return (sim, vec![]);
    }
    // d(sum_i e_i . t)/d e_i = t for every image.
    let d_emb: Vec<f32> = (0..b).flat_map(|_| text.iter().copied()).collect();
    be.upload_f32(&clip.image_embeds_grad(b), &d_emb).unwrap();
    clip.backward_vision_to_pixels(b).unwrap();
    let g = clip.pixels_grad(b).unwrap();
    let mut host = vec![0.0; g.len()];
    be.download_f32(&g, &mut host).unwrap();
    (sim, host)
}

#[test]
fn pixel_gradient_matches_finite_differences() {
    let seed = model::testkit::seed("MODEL_SEED");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let config = tiny();
    let b = 2;
    let clip = Clip::random(Cpu, config.clone(), b, rng.random()).unwrap();
    let frozen = Clip::new_frozen(Cpu, config.clone(), b).unwrap();
    frozen.params_from_host(&clip.params_to_host().unwrap()).unwrap();
    // The text side: a real text embedding of the same model.
    let (pixels, ids) = model::testkit::random_batch(&mut rng, &config, 1);
    clip.forward_text(&ids, 1).unwrap();
    let mut text = vec![0.0; config.projection_dim];
    clip.backend.download_f32(&clip.text_embeds(1), &mut text).unwrap();
    let (more, _) = model::testkit::random_batch(&mut rng, &config, 1);
    let pixels: Vec<f32> = pixels.into_iter().chain(more).collect();

    let (sim, g) = similarity(&frozen, &pixels, &text, b, true);
    // The frozen forward is the ordinary forward.
    clip.upload_pixels(&pixels, b).unwrap();
    clip.forward_vision(b).unwrap();
    let mut e1 = vec![0.0; b * config.projection_dim];
    let mut e2 = e1.clone();
    clip.backend.download_f32(&clip.image_embeds(b), &mut e1).unwrap();
    frozen.backend.download_f32(&frozen.image_embeds(b), &mut e2).unwrap();
    assert_eq!(e1, e2, "the frozen model's forward differs from the trainable one's");
    assert!(g.iter().all(|x| x.is_finite()) && g.iter().any(|&x| x != 0.0), "pixel gradient {:?}..", &g[..4]);

    // The similarity is an f32 computation: a fourth-order difference (Richardson on steps h
    // and 2h) keeps the truncation error small at a step large enough to drown the rounding.
    let at = |dir: &[f64], step: f64| {
        let p: Vec<f32> = pixels.iter().zip(dir).map(|(&x, &v)| (x as f64 + step * v) as f32).collect();
        similarity(&frozen, &p, &text, b, false).0
    };
    let fd = |dir: &[f64], h: f64| {
        let central = |s: f64| (at(dir, s) - at(dir, -s)) / (2.0 * s);
        (4.0 * central(h) - central(2.0 * h)) / 3.0
    };
    // Random unit directions over every pixel of both images.
    for trial in 0..3 {
        let mut v: Vec<f64> = (0..pixels.len()).map(|_| rng.random_range(-1.0..1.0)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        let analytic: f64 = g.iter().zip(&v).map(|(&g, &v)| g as f64 * v).sum();
        let want = fd(&v, 1.6e-2);
        let tol = 1e-4 + 1e-2 * want.abs();
        assert!(
            (want - analytic).abs() <= tol && want.is_finite(),
            "direction {trial}: finite differences {want:e} vs analytic {analytic:e} (similarity {sim}, seed {seed})"
        );
    }
    // Single pixels: the largest gradients (where an error in col2im's indexing would show)
    // and random ones, in both images and all three channels.
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&i, &j| g[j].abs().total_cmp(&g[i].abs()));
    let picks: Vec<usize> = order[..6].iter().copied().chain((0..6).map(|_| rng.random_range(0..g.len()))).collect();
    for i in picks {
        let mut e = vec![0.0; pixels.len()];
        e[i] = 1.0;
        let want = fd(&e, 1.6e-2);
        let tol = 1e-4 + 1e-2 * want.abs();
        assert!(
            (want - g[i] as f64).abs() <= tol && want.is_finite(),
            "pixel {i}: finite differences {want:e} vs analytic {:e} (seed {seed})",
            g[i]
        );
    }
}

#[test]
fn a_frozen_model_holds_no_parameter_gradients() {
    let config = tiny();
    let mut frozen = Clip::new_frozen(Cpu, config.clone(), 1).unwrap();
    assert!(frozen.is_frozen());
    assert_eq!(frozen.grads.len(), 0, "a frozen model allocated a gradient buffer");
    assert!(frozen.trainable().iter().all(|&t| !t));
    let err = frozen.set_trainable(vec![true; frozen.layout.specs.len()]).unwrap_err().to_string();
    assert!(err.contains("cannot train"), "{err}");
    assert!(frozen.grads_to_host().is_err());

    // And an ordinary model has no backward to the pixels.
    let clip = Clip::new(Cpu, config, 1).unwrap();
    assert!(!clip.is_frozen());
    let err = clip.backward_vision_to_pixels(1).unwrap_err().to_string();
    assert!(err.contains("new_frozen"), "{err}");
    assert!(clip.pixels_grad(1).is_err());
}
