//! The job's training mode on a real model: in `adapters` mode a few AdamW steps move the
//! adapters and the layer norms and nothing else (logit scale, projections, embeddings and the
//! blocks' own weights stay bit for bit); in `full` mode every tensor moves; a resumed job
//! rebuilds the checkpoint's adapters and refuses a checkpoint whose adapters differ.

use kernels::Cpu;
use model::collectives::Single;
use model::optim::AdamW;
use model::step::{train_step, InfoNceLoss, LocalBatch};
use model::{Clip, ClipConfig};
use proto::v1::{Job, TrainOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use worker::train_opts::{adamw_config, apply_mode, build_model, MODE_ADAPTERS, MODE_FULL};

const B: usize = 4;
const ADAPTER: usize = 8;

fn job(mode: &str, seed: u64) -> Job {
    let mut config = ClipConfig::small(32, 8, 64, 2, 2);
    config.adapter_dim = Some(ADAPTER);
    Job {
        config_json: config.to_json(),
        steps: 3,
        global_batch: B as u64,
        lr: 1e-3,
        weight_decay: 0.2,
        seed,
        options: Some(TrainOptions {
            mode: mode.into(),
            schedule: "cosine".into(),
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            augment_rotate_deg: 45.0,
            augment_scale_lo: 0.9,
            augment_scale_hi: 1.1,
            augment_translate: 0.15,
            shuffle_sentences: true,
            uncertain: "zeros".into(),
            ..TrainOptions::default()
        }),
        ..Job::default()
    }
}

/// Random pixels and token ids (texts of different lengths) for `B` pairs.
fn batch(rng: &mut ChaCha8Rng, image: usize, ctx: usize) -> (Vec<f32>, Vec<i32>) {
    let pixels = (0..B * 3 * image * image).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let ids = (0..B * ctx)
        .map(|i| match i % ctx {
            0 => 49406,
            k if k == 4 + i / ctx => 49407,
            k if k > 4 + i / ctx => 0,
            _ => rng.random_range(1..49406),
        })
        .collect();
    (pixels, ids)
}

/// The parameters before and after three steps of the job, in the model's layout.
fn three_steps(job: &Job, rng: &mut ChaCha8Rng) -> (Clip<Cpu>, Vec<f32>, Vec<f32>) {
    let (mut clip, start) = build_model(Cpu, job, B).expect("model");
    assert_eq!(start, 0);
    apply_mode(&mut clip, job).expect("mode");
    let mut opt = AdamW::new(&clip, adamw_config(job).expect("adamw")).expect("optimiser");
    let mut loss = InfoNceLoss::new(&clip, 1).expect("loss");
    let before = clip.params_to_host().expect("params");
    let (s, ctx) = (clip.image_size(), clip.context_len());
    for _ in 0..3 {
        let (px, ids) = batch(rng, s, ctx);
        let lb = LocalBatch { pixels: &px, ids: &ids, b: B };
        let out = train_step(&clip, &mut opt, &mut loss, &mut Single, &lb, job.lr as f32).expect("step");
        assert!(out.loss.is_finite() && out.grad_norm > 0.0, "{out:?}");
    }
    let after = clip.params_to_host().expect("params");
    (clip, before, after)
}

/// Adapter and layer-norm tensors by name, written out here rather than taken from the
/// freezing patterns the mode uses.
fn is_adapter_or_norm(name: &str) -> bool {
    name.contains(".adapter.") || ["layer_norm", "layrnorm", "layernorm"].iter().any(|n| name.contains(n))
}

#[test]
fn adapters_mode_moves_only_adapters_and_layer_norms() {
    let mut rng = ChaCha8Rng::seed_from_u64(rand::rng().random());
    let (clip, before, after) = three_steps(&job(MODE_ADAPTERS, rng.random()), &mut rng);
    let (mut moved, mut kept) = (0, 0);
    for spec in &clip.layout.specs {
        let r = spec.offset..spec.offset + spec.len;
        let changed = before[r.clone()] != after[r.clone()];
        assert!(after[r].iter().all(|x| x.is_finite()), "{} is not finite", spec.name);
        if is_adapter_or_norm(&spec.name) {
            assert!(changed, "{} should train in adapters mode but did not move", spec.name);
            moved += 1;
        } else {
            assert!(!changed, "{} should be frozen in adapters mode but moved", spec.name);
            kept += 1;
        }
    }
    // 2 blocks x 2 towers x 4 adapter tensors, and the norms; most of the model is frozen.
    let adapters = clip.layout.specs.iter().filter(|s| s.name.contains(".adapter.")).count();
    assert_eq!(adapters, 16);
    assert!(moved > adapters && kept > 10, "moved {moved}, kept {kept}");
    for frozen in ["logit_scale", "visual_projection.weight", "text_projection.weight"] {
        assert!(clip.layout.specs.iter().any(|s| s.name == frozen && !is_adapter_or_norm(&s.name)));
    }
}

#[test]
fn full_mode_moves_every_tensor() {
    let mut rng = ChaCha8Rng::seed_from_u64(rand::rng().random());
    let (clip, before, after) = three_steps(&job(MODE_FULL, rng.random()), &mut rng);
    for spec in &clip.layout.specs {
        let r = spec.offset..spec.offset + spec.len;
        assert!(before[r.clone()] != after[r], "{} did not move in full mode", spec.name);
    }
}

#[test]
fn a_resumed_job_rebuilds_the_checkpoints_adapters() {
    let mut rng = ChaCha8Rng::seed_from_u64(rand::rng().random());
    let j = job(MODE_ADAPTERS, rng.random());
    let (clip, _) = build_model(Cpu, &j, B).expect("model");
    let dir = tempfile_dir();
    clip.save_pretrained(&dir, &[]).expect("save");
    let resumed = Job { resume_step: 5, resume_dir: dir.to_string_lossy().into_owned(), ..j.clone() };
    let (back, start) = build_model(Cpu, &resumed, B).expect("resume");
    assert_eq!((start, back.config.adapter_dim), (5, Some(ADAPTER)));
    assert_eq!(back.params_to_host().unwrap(), clip.params_to_host().unwrap());
    // A job that asks for other adapters than the checkpoint holds is refused.
    let mut other: ClipConfig = serde_json::from_str(&j.config_json).unwrap();
    other.adapter_dim = Some(2 * ADAPTER);
    let wrong = Job { config_json: other.to_json(), ..resumed };
    let e = build_model(Cpu, &wrong, B).err().expect("accepted other adapters").to_string();
    assert!(e.contains("adapters of width 8") && e.contains("16"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cxrclip-train-opts-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
