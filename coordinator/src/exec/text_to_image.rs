//! The `text-to-image` run: for each finding, a real test image whose report names it, the
//! report sentence that does, and an image generated from that sentence by CLIP guidance on the
//! run's model (`coordinator imagine`'s optimisation) — the paper's figure, one column each.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use data::labels::{label_index, LabelValue};
use data::{Dataset, Split};
use worker::Device;

use super::evaluate::ProbeOnGenerated;
use crate::imagine::{self, output, views, Generated, ImagineOptions, Parameterization};
use crate::report::{TextToImageCell, TextToImageRow};

/// Views per step: the middle of the paper's 5-8.
const VIEWS: usize = 6;
/// The paper's learning rate.
const LR: f32 = 0.03;

/// A sentence of `report` that names `finding` without negating it. The report text joins its
/// sections with spaces, so an indication without a full stop ("man with hypoxia // ___") can
/// run into the next sentence: what comes before the last anonymisation mark or `//` is cut.
pub fn naming_sentence(report: &str, finding: &str) -> Option<String> {
    let word = finding.to_lowercase();
    report
        .split_inclusive(['.', '\n'])
        .map(|s| {
            let cut = ["//", "___"].iter().filter_map(|m| s.rfind(m).map(|i| i + m.len())).max().unwrap_or(0);
            s[cut..].trim()
        })
        .filter(|s| !s.is_empty())
        .find(|s| {
            let l = s.to_lowercase();
            let negated =
                ["no ", "not ", "without", "cannot exclude", "resolved", "free of"].iter().any(|n| l.contains(n));
            l.contains(&word) && !negated && !l.starts_with("no")
        })
        .map(str::to_string)
}

/// The first frontal test image positive for `finding` whose report has a sentence naming it,
/// and that sentence (any view when no frontal one has one).
pub fn real_example<'a>(ds: &'a Dataset, finding: &str) -> Option<(&'a data::Pair, String)> {
    let col = label_index(finding)?;
    let candidates = ds.pairs.iter().filter(|p| p.split == Split::Test && p.labels[col] == LabelValue::Positive);
    let frontal = |p: &&data::Pair| matches!(p.view.as_str(), "PA" | "AP");
    let named = |p: &'a data::Pair| naming_sentence(&p.text, finding).map(|s| (p, s));
    candidates.clone().filter(frontal).find_map(named).or_else(|| candidates.clone().find_map(named))
}

/// Fills each cell's probe columns from a probe's scores of the generated images (in cell order).
pub fn add_probe(row: &mut TextToImageRow, p: &ProbeOnGenerated) {
    for (k, cell) in row.cells.iter_mut().enumerate() {
        if let (Some(j), Some(g)) = (p.labels.iter().position(|l| *l == cell.finding), p.generated.get(k)) {
            cell.probe = Some(g[j]);
            cell.probe_real_positive = Some(p.real_positive_mean[j]).filter(|v| v.is_finite());
            cell.probe_real_negative = Some(p.real_negative_mean[j]).filter(|v| v.is_finite());
        }
    }
}

/// Runs the text-to-image job of one run into `dir`; also returns the generation (for the
/// images' embeddings).
#[allow(clippy::too_many_arguments)]
pub fn run(
    checkpoint: &Path,
    ds: &Dataset,
    findings: &[String],
    steps: usize,
    size: usize,
    seed: u64,
    device: Device,
    dir: &Path,
    name: &str,
    setting: &str,
) -> Result<(TextToImageRow, Generated)> {
    let mut prompts = Vec::with_capacity(findings.len());
    let mut reals = Vec::with_capacity(findings.len());
    for (k, f) in findings.iter().enumerate() {
        match real_example(ds, f) {
            Some((pair, sentence)) => {
                let path = ds.image_path(pair);
                let img = data::imageio::load_grey(&path)?;
                let file = dir.join(format!("real-{:02}.png", k + 1));
                let px = output::to_u8(&views::centre_square(&img, size));
                model::checkpoint::write_file_atomically(&file, &output::png_bytes(&px, size, size)?)?;
                prompts.push(sentence);
                reals.push(Some((file, path)));
            }
            None => {
                // No test report names it: the paper's template, and no real image.
                prompts.push(format!("A frontal chest x-ray of {}", f.to_lowercase()));
                reals.push(None);
            }
        }
    }
    let opts = ImagineOptions {
        prompts: prompts.clone(),
        neutral: None,
        steps,
        size,
        views: VIEWS,
        lr: LR,
        seed,
        parameterization: Parameterization::Fourier,
        init: None,
    };
    // An interrupted run left a partial folder: start it again.
    let out = dir.join("imagine");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    let (g, files) = imagine::imagine_to_dir(checkpoint, &opts, device, &out, false)?;
    let cells = findings
        .iter()
        .enumerate()
        .map(|(k, f)| {
            let sims = &g.final_similarity[k];
            Ok(TextToImageCell {
                finding: f.clone(),
                prompt: prompts[k].clone(),
                generated: files.get(k).ok_or_else(|| anyhow!("imagine wrote too few images"))?.display().to_string(),
                real: reals[k].as_ref().map(|(f, _)| f.display().to_string()),
                real_source: reals[k].as_ref().map(|(_, p)| p.display().to_string()),
                similarity: sims[k],
                own_prompt_wins: (0..sims.len()).all(|j| j == k || sims[j] < sims[k]),
                probe: None,
                probe_real_positive: None,
                probe_real_negative: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let row = TextToImageRow {
        run: name.to_string(),
        setting: setting.to_string(),
        steps,
        size,
        cells,
        seconds: g.seconds,
        run_dir: dir.display().to_string(),
    };
    Ok((row, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sentence_names_the_finding_without_negating_it() {
        let r = "No focal consolidation. Moderate cardiomegaly. Left basilar atelectasis, unchanged.";
        assert_eq!(naming_sentence(r, "Cardiomegaly").as_deref(), Some("Moderate cardiomegaly."));
        assert_eq!(naming_sentence(r, "Atelectasis").as_deref(), Some("Left basilar atelectasis, unchanged."));
        assert_eq!(naming_sentence(r, "Consolidation"), None);
        assert_eq!(naming_sentence(r, "Edema"), None);
        let r = "History: man with hypoxia  // ___ Left lower lobe consolidation. Mild edema.";
        assert_eq!(naming_sentence(r, "Consolidation").as_deref(), Some("Left lower lobe consolidation."));
    }
}
