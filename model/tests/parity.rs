//! Reference parity: the CPU model against `transformers.CLIPModel` fixtures dumped by
//! `scripts/make_fixtures.py` (forward, loss, every parameter gradient, 10 AdamW steps).

use std::path::{Path, PathBuf};

use kernels::{Backend, Cpu};
use model::checkpoint::{parse_safetensors, read_safetensors};
use model::collectives::Single;
use model::loss::logits_per_image;
use model::optim::{AdamW, AdamWConfig};
use model::step::{self, InfoNceLoss, LocalBatch};
use model::Clip;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("fixture has no {name}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn i64s(st: &SafeTensors<'_>, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("fixture has no {name}"));
    assert_eq!(t.dtype(), Dtype::I64, "{name}");
    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

/// `|ours - ref| <= atol + rtol |ref|` everywhere; NaN never passes. Returns the worst ratio.
fn assert_close(what: &str, ours: &[f32], reference: &[f32], rtol: f64, atol: f64) -> f64 {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for (i, (&o, &r)) in ours.iter().zip(reference).enumerate() {
        let (o, r) = (o as f64, r as f64);
        assert!(o.is_finite(), "{what}[{i}] = {o} is not finite");
        let ratio = (o - r).abs() / (atol + rtol * r.abs());
        // Written so that a NaN ratio fails too.
        if ratio.is_nan() || ratio > 1.0 {
            panic!(
                "{what}[{i}]: ours {o:e} vs reference {r:e} (|diff| {:e} > {atol:e} + {rtol:e}*|ref|)",
                (o - r).abs()
            );
        }
        if ratio > worst.0 {
            worst = (ratio, i);
        }
    }
    worst.0
}

struct Case {
    b: usize,
    pixels: Vec<f32>,
    ids: Vec<i32>,
}

fn load_case(st: &SafeTensors<'_>, ctx: usize) -> Case {
    let pixels = f32s(st, "pixel_values");
    let raw = i64s(st, "input_ids");
    let len = st.tensor("input_ids").unwrap().shape()[1];
    let b = raw.len() / len;
    let mut ids = vec![0i32; b * ctx];
    for r in 0..b {
        for k in 0..len {
            ids[r * ctx + k] = raw[r * len + k] as i32;
        }
    }
    Case { b, pixels, ids }
}

/// The training step every caller runs (a world of one): gradients into `clip.grads`.
fn step<B: Backend>(clip: &mut Clip<B>, loss: &mut InfoNceLoss<B>, case: &Case) -> f32 {
    let lb = LocalBatch { pixels: &case.pixels, ids: &case.ids, b: case.b };
    step::forward_backward(clip, loss, &mut Single, &lb).unwrap()
}

fn check_fixture(name: &str) {
    let dir = fixtures().join(name);
    let ref_path = dir.join("reference.safetensors");
    let bytes = read_safetensors(&ref_path).unwrap();
    let st = parse_safetensors(&bytes, &ref_path).unwrap();
    let config = model::ClipConfig::from_file(&dir.join("config.json")).unwrap();
    let ctx = config.text_config.max_position_embeddings;
    let case = load_case(&st, ctx);
    let (mut clip, report) = Clip::from_pretrained(Cpu, &dir, case.b).unwrap();
    assert!(report.initialised.is_empty());
    let mut loss_fn = InfoNceLoss::new(&clip, 1).unwrap();
    let loss = step(&mut clip, &mut loss_fn, &case);

    let b = case.b;
    let p = clip.config.projection_dim;
    let mut img = vec![0.0; b * p];
    let mut txt = vec![0.0; b * p];
    clip.backend.download_f32(&clip.image_embeds(b), &mut img).unwrap();
    clip.backend.download_f32(&clip.text_embeds(b), &mut txt).unwrap();
    let mut scale = [0.0f32];
    clip.backend.download_f32(&clip.logit_scale().value, &mut scale).unwrap();
    assert_close(&format!("{name} loss"), &[loss], &f32s(&st, "loss"), 1e-5, 1e-6);
    assert_close(&format!("{name} image_embeds"), &img, &f32s(&st, "image_embeds"), 1e-4, 1e-6);
    assert_close(&format!("{name} text_embeds"), &txt, &f32s(&st, "text_embeds"), 1e-4, 1e-6);
    let logits = logits_per_image(&img, &txt, b, p, scale[0]);
    assert_close(&format!("{name} logits_per_image"), &logits, &f32s(&st, "logits_per_image"), 1e-4, 1e-5);

    let grads = clip.grads_to_host().unwrap();
    let mut checked = 0;
    for spec in &clip.layout.specs {
        let ours = &grads[spec.offset..spec.offset + spec.len];
        let key = format!("grad.{}", spec.name);
        let reference = f32s(&st, &key);
        let rows_key = format!("grad_rows.{}", spec.name);
        let expanded;
        let reference: &[f32] = if st.tensor(&rows_key).is_ok() {
            // A sparse reference: the listed rows, zero elsewhere.
            let width = spec.shape[1];
            let mut full = vec![0.0f32; spec.len];
            for (k, &row) in i64s(&st, &rows_key).iter().enumerate() {
                full[row as usize * width..(row as usize + 1) * width]
                    .copy_from_slice(&reference[k * width..(k + 1) * width]);
            }
            expanded = full;
            &expanded
        } else {
            &reference
        };
        assert_close(&format!("{name} {key}"), ours, reference, 1e-4, 1e-6);
        checked += 1;
    }
    let in_fixture = st.names().iter().filter(|n| n.starts_with("grad.")).count();
    assert_eq!(checked, in_fixture, "{name}: every reference gradient has a parameter");

    // Ten AdamW steps on the same batch follow the reference's losses.
    let hp = f32s(&st, "adamw_hparams");
    let want = f32s(&st, "adamw_losses");
    let (mut clip, _) = Clip::from_pretrained(Cpu, &dir, case.b).unwrap();
    let cfg = AdamWConfig { beta1: hp[1], beta2: hp[2], eps: hp[3], weight_decay: hp[4], max_grad_norm: Some(hp[5]) };
    let mut opt = AdamW::new(&clip, cfg).unwrap();
    let mut losses = Vec::new();
    for _ in 0..want.len() {
        losses.push(step(&mut clip, &mut loss_fn, &case));
        opt.step(&clip, hp[0]).unwrap();
    }
    assert_close(&format!("{name} adamw_losses"), &losses, &want, 1e-4, 1e-5);
}

#[test]
fn tiny_quickgelu() {
    check_fixture("tiny_quickgelu");
}

#[test]
fn small_gelu() {
    check_fixture("small_gelu");
}

#[test]
fn fullvocab() {
    check_fixture("fullvocab");
}

#[test]
fn legacy_eos2() {
    check_fixture("legacy_eos2");
}
