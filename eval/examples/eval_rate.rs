//! Wall time of the eval crate's heavy steps on random data of realistic sizes:
//! `cargo run --release -p eval --example eval_rate [-- --quick]`.
//!
//! Patient bootstrap and paired difference (1,000 resamples, 14 labels, 5,000 test images of
//! 2,500 patients), one probe fit (20,000 x 512, one label, one C), a whole probe (5,000 x 128
//! train, 1,000 valid, 14 labels x 13 C), retrieval (5,000 images x 2,500 reports, d = 512).

use std::time::Instant;

use eval::{
    macro_auc_ci, paired_difference, retrieval, BootstrapConfig, FeatureSet, LinearProbe, Predictions, ProbeConfig,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Uniform features; label `l` is positive where the projection on `directions[l]` plus noise is
/// large.
fn features(rng: &mut ChaCha8Rng, n: usize, d: usize, directions: &[f32]) -> FeatureSet {
    let labels = directions.len() / d;
    let x: Vec<f32> = (0..n * d).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut truth = Vec::with_capacity(n * labels);
    for i in 0..n {
        for l in 0..labels {
            let z: f32 = x[i * d..(i + 1) * d].iter().zip(&directions[l * d..(l + 1) * d]).map(|(a, b)| a * b).sum();
            truth.push(Some(z * 4.0 + rng.random::<f32>() - 0.5 > 0.5));
        }
    }
    FeatureSet {
        x,
        d,
        truth,
        labels: (0..labels).map(|l| format!("label{l}")).collect(),
        images: (0..n).map(|i| format!("i{i}")).collect(),
        patients: (0..n).map(|i| format!("p{}", i / 2)).collect(),
    }
}

fn predictions(rng: &mut ChaCha8Rng, n: usize, labels: usize) -> Predictions {
    let truth: Vec<Option<bool>> = (0..n * labels).map(|_| Some(rng.random_bool(0.2))).collect();
    Predictions {
        images: (0..n).map(|i| format!("i{i}")).collect(),
        patients: (0..n).map(|i| format!("p{}", i / 2)).collect(),
        labels: (0..labels).map(|l| format!("label{l}")).collect(),
        scores: truth.iter().map(|t| rng.random::<f64>() + if t.unwrap() { 0.5 } else { 0.0 }).collect(),
        truth,
    }
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    println!("threads: {}", rayon::current_num_threads());

    let a = predictions(&mut rng, 5000 / scale, 14);
    let mut b = a.clone();
    for s in b.scores.iter_mut() {
        *s += rng.random::<f64>() * 0.3;
    }
    let cfg = BootstrapConfig::default();
    let t = Instant::now();
    let ci = macro_auc_ci(&a, &cfg)?;
    println!(
        "macro_auc_ci: {} images, 14 labels, 1000 resamples: {:.2} s ({ci:?})",
        a.rows(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let d = paired_difference(&a, &b, &cfg)?;
    println!("paired_difference: {:.2} s ({d:?})", t.elapsed().as_secs_f64());

    let directions = |rng: &mut ChaCha8Rng, d: usize, labels: usize| -> Vec<f32> {
        (0..labels * d).map(|_| rng.random::<f32>() - 0.5).collect()
    };
    let dir = directions(&mut rng, 512, 1);
    let big = features(&mut rng, 20000 / scale, 512, &dir);
    let t = Instant::now();
    let model = eval::fit_logistic(&big, 0, 1.0, &ProbeConfig::default())?;
    let iterations = match &model {
        eval::LabelModel::Logistic(f) => f.iterations,
        eval::LabelModel::Constant { .. } => 0,
    };
    println!("fit_logistic {} x 512 at C = 1: {:.2} s, {iterations} iterations", big.rows(), t.elapsed().as_secs_f64());

    let dir = directions(&mut rng, 128, 14);
    let (train, valid) = (features(&mut rng, 5000 / scale, 128, &dir), features(&mut rng, 1000 / scale, 128, &dir));
    let t = Instant::now();
    let probe = LinearProbe::fit(&train, &valid, &ProbeConfig::default())?;
    println!(
        "LinearProbe::fit {} x 128, 14 labels x 13 C: {:.2} s, valid macro AUC {:?}",
        train.rows(),
        t.elapsed().as_secs_f64(),
        probe.summary().valid_macro_auc
    );

    let (n, m, dim) = (5000 / scale, 2500 / scale, 512);
    let images: Vec<f32> = (0..n * dim).map(|_| rng.random::<f32>() - 0.5).collect();
    let reports: Vec<f32> = (0..m * dim).map(|_| rng.random::<f32>() - 0.5).collect();
    let report_of_image: Vec<usize> = (0..n).map(|i| i * m / n).collect();
    let t = Instant::now();
    let r = retrieval(&images, &reports, dim, &report_of_image)?;
    println!(
        "retrieval {n} images x {m} reports, d = {dim}: {:.2} s (R@10 {:.3})",
        t.elapsed().as_secs_f64(),
        r.image_to_report.at10
    );
    Ok(())
}
