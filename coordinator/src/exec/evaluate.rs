//! The evaluations the coordinator does itself on a feature table: the linear probe, zero-shot
//! prompts, retrieval, and scoring a fine-tuned head's logits. Each writes `predictions.csv`
//! (and the probe `probe.json`) into the run folder and returns its report rows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use kernels::Backend;
use model::tokenizer::ClipTokenizer;
use model::Clip;

use crate::plan::{ProbeGrid, Templates};
use crate::report::{Ablation, ResultRow, RetrievalRow, ZeroShotRow};

use super::features::{FeatureTable, SplitTable};

/// Where a row comes from, besides its numbers.
pub struct RowInfo<'a> {
    pub run: &'a str,
    pub setting: &'a str,
    pub kind: &'a str,
    pub dataset: &'a str,
    pub fraction: Option<f64>,
    pub ablation: Option<Ablation>,
    pub run_dir: &'a Path,
}

/// A split's rows as the probe reads them.
fn feature_set(t: &SplitTable, table: &FeatureTable, rows: Option<&[usize]>) -> eval::FeatureSet {
    let l = table.labels.len();
    let all: Vec<usize> = (0..t.len()).collect();
    let rows = rows.unwrap_or(&all);
    eval::FeatureSet {
        x: rows.iter().flat_map(|&i| t.x[i * table.dim..(i + 1) * table.dim].iter().copied()).collect(),
        d: table.dim,
        truth: rows.iter().flat_map(|&i| t.truth[i * l..(i + 1) * l].iter().copied()).collect(),
        labels: table.labels.clone(),
        images: rows.iter().map(|&i| t.images[i].clone()).collect(),
        patients: rows.iter().map(|&i| t.patients[i].clone()).collect(),
    }
}

fn split<'a>(table: &'a FeatureTable, name: &str) -> Result<&'a SplitTable> {
    table.splits.get(name).filter(|t| !t.is_empty()).ok_or_else(|| anyhow!("the feature table has no {name} images"))
}

/// A linear probe fitted on the table's real training features (strength chosen on its
/// validation split) applied to other embeddings, e.g. generated images': their probability of
/// each label, and for reference the mean probability over the real test images that are
/// positive and that are negative for it. Labels in `table.labels` order.
pub struct ProbeOnGenerated {
    pub labels: Vec<String>,
    /// `[image][label]`.
    pub generated: Vec<Vec<f64>>,
    pub real_positive_mean: Vec<f64>,
    pub real_negative_mean: Vec<f64>,
}

pub fn probe_generated(table: &FeatureTable, embeddings: &[Vec<f32>]) -> Result<ProbeOnGenerated> {
    let train = feature_set(split(table, "train")?, table, None);
    let valid = feature_set(split(table, "valid")?, table, None);
    let test = feature_set(split(table, "test")?, table, None);
    let probe = eval::LinearProbe::fit(&train, &valid, &eval::ProbeConfig::default())?;
    let l = table.labels.len();
    let names: Vec<String> = (0..embeddings.len()).map(|k| format!("generated-{k}")).collect();
    let generated = eval::FeatureSet {
        x: embeddings.iter().flatten().copied().collect(),
        d: table.dim,
        truth: vec![None; embeddings.len() * l],
        labels: table.labels.clone(),
        images: names.clone(),
        patients: names,
    };
    let g = probe.predict(&generated)?;
    let t = probe.predict(&test)?;
    let mean_where = |j: usize, want: bool| {
        let v: Vec<f64> =
            (0..test.rows()).filter(|&i| t.truth[i * l + j] == Some(want)).map(|i| t.scores[i * l + j]).collect();
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    Ok(ProbeOnGenerated {
        labels: table.labels.clone(),
        generated: g.scores.chunks_exact(l).map(|r| r.to_vec()).collect(),
        real_positive_mean: (0..l).map(|j| mean_where(j, true)).collect(),
        real_negative_mean: (0..l).map(|j| mean_where(j, false)).collect(),
    })
}

/// Scores predictions: macro AUC with the patient-bootstrap CI, per label, into a row; writes
/// `predictions.csv` under `dir`.
pub fn score(
    p: &eval::Predictions,
    info: &RowInfo,
    split: &str,
    dir: &Path,
    bootstrap: &eval::BootstrapConfig,
) -> Result<(ResultRow, PathBuf)> {
    let path = dir.join("predictions.csv");
    p.write_csv(&path)?;
    let ci = eval::macro_auc_ci(p, bootstrap).with_context(|| format!("{}: the {split} split's AUC", info.run))?;
    let m = p.macro_auc()?;
    // Labels with one class in the split have no AUC: left out (an empty cell in the tables).
    let per_label: BTreeMap<String, f64> =
        p.labels.iter().zip(&m.per_label).filter_map(|(l, a)| a.map(|a| (l.clone(), a))).collect();
    let row = ResultRow {
        run: info.run.to_string(),
        setting: info.setting.to_string(),
        kind: info.kind.to_string(),
        dataset: info.dataset.to_string(),
        split: split.to_string(),
        fraction: info.fraction,
        ablation: info.ablation.clone(),
        macro_auc: ci.macro_auc,
        ci95: ci.ci95,
        per_label,
        images: ci.images,
        patients: ci.patients,
        run_dir: info.run_dir.to_string_lossy().into_owned(),
    };
    Ok((row, path))
}

/// The linear probe: fitted on the train split (a `fraction` of its patients), its strength
/// chosen on the valid split, scored on the test split.
pub fn linear_probe(
    table: &FeatureTable,
    info: &RowInfo,
    fraction: f64,
    seed: u64,
    grid: &ProbeGrid,
    bootstrap: &eval::BootstrapConfig,
) -> Result<(ResultRow, PathBuf)> {
    let train = split(table, "train")?;
    // Drawn as fine-tuning draws its labelled images, so LP and FT at one fraction see the
    // same patients.
    let rows = data::splits::patient_fraction(&train.patients, fraction, seed);
    let train = feature_set(train, table, Some(&rows));
    let valid = feature_set(split(table, "valid")?, table, None);
    let test = feature_set(split(table, "test")?, table, None);
    let cfg = eval::ProbeConfig { grid: grid.values(), ..eval::ProbeConfig::default() };
    let probe = eval::LinearProbe::fit(&train, &valid, &cfg)?;
    let report = probe.report();
    model::checkpoint::write_file_atomically(
        &info.run_dir.join("probe.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let preds = probe.predict(&test)?;
    score(&preds, info, "test", info.run_dir, bootstrap)
}

/// A fine-tuned checkpoint's head on the test split.
pub fn head(table: &FeatureTable, info: &RowInfo, bootstrap: &eval::BootstrapConfig) -> Result<(ResultRow, PathBuf)> {
    let test = split(table, "test")?;
    let (l, lh) = (table.labels.len(), table.head_labels.len());
    ensure!(lh > 0, "the checkpoint has no label head");
    // The head's columns of the dataset's evaluated labels.
    let cols: Vec<usize> = table
        .labels
        .iter()
        .map(|name| {
            table.head_labels.iter().position(|h| h == name).ok_or_else(|| anyhow!("the head has no label '{name}'"))
        })
        .collect::<Result<_>>()?;
    let p = eval::Predictions {
        images: test.images.clone(),
        patients: test.patients.clone(),
        labels: table.labels.clone(),
        scores: (0..test.len()).flat_map(|i| cols.iter().map(move |&c| test.logits[i * lh + c] as f64)).collect(),
        truth: (0..test.len()).flat_map(|i| test.truth[i * l..(i + 1) * l].iter().copied()).collect(),
    };
    score(&p, info, "test", info.run_dir, bootstrap)
}

/// Text embeddings of `texts` by the checkpoint's text tower, on the CPU (a few prompts), with
/// its logit scale (the multiplier, `exp` of the stored value).
pub fn embed_texts(checkpoint: &Path, texts: &[String]) -> Result<(Vec<Vec<f32>>, f64)> {
    ensure!(!texts.is_empty(), "no text to embed");
    let (clip, _) = Clip::from_pretrained(kernels::Cpu, checkpoint, texts.len())
        .with_context(|| format!("loading {}", checkpoint.display()))?;
    let tok = ClipTokenizer::new()?;
    let ids: Vec<i32> = texts.iter().flat_map(|t| tok.encode(t)).collect();
    clip.forward_text(&ids, texts.len())?;
    let d = clip.config.projection_dim;
    let mut host = vec![0.0f32; texts.len() * d];
    clip.backend.download_f32(&clip.text_embeds(texts.len()), &mut host)?;
    let mut scale = [0.0f32];
    clip.backend.download_f32(&clip.logit_scale().value, &mut scale)?;
    Ok((host.chunks_exact(d).map(|c| c.to_vec()).collect(), (scale[0] as f64).exp()))
}

/// Zero-shot on the test split: (a) the prompt-pair softmax averaged over the template pairs,
/// (b) the neutral-prompt score. One predictions file per method, in a folder named after it.
pub fn zero_shot(
    table: &FeatureTable,
    checkpoint: &Path,
    templates: &Templates,
    info: &RowInfo,
    bootstrap: &eval::BootstrapConfig,
) -> Result<Vec<ZeroShotRow>> {
    let test = split(table, "test")?;
    let fill = |t: &str, label: &str| t.replace("{label}", &label.to_lowercase());
    let mut texts = vec![templates.neutral.clone()];
    for label in &table.labels {
        texts.extend(templates.positive.iter().map(|t| fill(t, label)));
        texts.extend(templates.negative.iter().map(|t| fill(t, label)));
    }
    let (emb, scale) = embed_texts(checkpoint, &texts)?;
    let (np, nn) = (templates.positive.len(), templates.negative.len());
    ensure!(np == nn && np > 0, "zero-shot templates: {np} positive and {nn} negative; they pair by position");
    let neutral = &emb[0];
    let (n, l, d) = (test.len(), table.labels.len(), table.dim);
    let mut pair = vec![0.0f64; n * l];
    let mut neut = vec![0.0f64; n * l];
    for k in 0..l {
        let base = 1 + k * (np + nn);
        let pos: Vec<Vec<f32>> = emb[base..base + np].to_vec();
        let neg: Vec<Vec<f32>> = emb[base + np..base + np + nn].to_vec();
        for j in 0..np {
            let s = eval::zeroshot::pair_scores(&test.x, d, &pos[j], &neg[j], scale)?;
            for i in 0..n {
                pair[i * l + k] += s[i] / np as f64;
            }
        }
        let label_prompt = eval::zeroshot::ensemble(&pos)?;
        let s = eval::zeroshot::neutral_scores(&test.x, d, &label_prompt, neutral)?;
        for i in 0..n {
            neut[i * l + k] = s[i];
        }
    }
    let mut rows = Vec::new();
    for (method, scores) in [("prompt pair", pair), ("neutral prompt", neut)] {
        let p = eval::Predictions {
            images: test.images.clone(),
            patients: test.patients.clone(),
            labels: table.labels.clone(),
            scores,
            truth: test.truth.clone(),
        };
        let dir = info.run_dir.join(method.replace(' ', "-"));
        std::fs::create_dir_all(&dir)?;
        let (row, _) = score(&p, info, "test", &dir, bootstrap)?;
        rows.push(ZeroShotRow {
            run: row.run,
            setting: info.setting.to_string(),
            dataset: row.dataset,
            split: row.split,
            method: method.to_string(),
            macro_auc: row.macro_auc,
            ci95: row.ci95,
            per_label: row.per_label,
            run_dir: dir.to_string_lossy().into_owned(),
        });
    }
    Ok(rows)
}

/// Retrieval on the test split: every image against the test studies' reports.
pub fn retrieval(table: &FeatureTable, info: &RowInfo) -> Result<RetrievalRow> {
    let test = split(table, "test")?;
    ensure!(!table.report_study.is_empty(), "{}: the dataset has no reports to retrieve", info.dataset);
    // Report index of each image: its study's report.
    let mut report_of_study = vec![usize::MAX; test.studies.len()];
    for (k, &s) in table.report_study.iter().enumerate() {
        report_of_study[s] = k;
    }
    let keep: Vec<usize> = (0..test.len()).filter(|&i| report_of_study[test.study[i]] != usize::MAX).collect();
    let d = table.dim;
    let images: Vec<f32> = keep.iter().flat_map(|&i| test.x[i * d..(i + 1) * d].iter().copied()).collect();
    let of: Vec<usize> = keep.iter().map(|&i| report_of_study[test.study[i]]).collect();
    let r = eval::retrieval(&images, &table.reports, d, &of)?;
    let recall =
        |x: &eval::Recall| crate::report::Recall { at1: x.at1, at5: x.at5, at10: x.at10, median_rank: x.median_rank };
    let row = RetrievalRow {
        run: info.run.to_string(),
        setting: info.setting.to_string(),
        dataset: info.dataset.to_string(),
        split: "test".into(),
        image_to_report: recall(&r.image_to_report),
        report_to_image: recall(&r.report_to_image),
        images: keep.len(),
        reports: table.report_study.len(),
        run_dir: info.run_dir.to_string_lossy().into_owned(),
    };
    model::checkpoint::write_file_atomically(
        &info.run_dir.join("retrieval.json"),
        serde_json::to_string_pretty(&r)?.as_bytes(),
    )?;
    Ok(row)
}
