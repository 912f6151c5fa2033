//! Zero-shot scores from prompt embeddings: (a) the positive/negative prompt pair softmax
//! ("{label}" against "no {label}"), (b) the neutral-prompt score, cos(image, label prompt) -
//! cos(image, neutral prompt), and the template ensemble that turns several phrasings of one
//! prompt into one embedding. Features are compared by cosine, so their scale does not matter.

use anyhow::{ensure, Result};

/// Cosine similarity in f64; `None` when the lengths differ, a vector is all zeros, or a value
/// is not finite.
pub fn cosine(a: &[f32], b: &[f32]) -> Option<f64> {
    if a.len() != b.len() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return None;
    }
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    (aa > 0.0 && bb > 0.0).then(|| ab / (aa.sqrt() * bb.sqrt()))
}

/// The mean of the L2-normalised template embeddings, normalised again (CLIP's prompt
/// ensembling). Errors on no template, unequal lengths, a zero or non-finite embedding, or
/// templates that cancel out.
pub fn ensemble(templates: &[Vec<f32>]) -> Result<Vec<f32>> {
    ensure!(!templates.is_empty(), "prompt ensemble: no template embedding");
    let d = templates[0].len();
    ensure!(d > 0, "prompt ensemble: empty embeddings");
    let mut sum = vec![0f64; d];
    for (k, t) in templates.iter().enumerate() {
        ensure!(t.len() == d, "prompt ensemble: template {k} has {} values, template 0 has {d}", t.len());
        ensure!(t.iter().all(|v| v.is_finite()), "prompt ensemble: template {k} is not finite");
        let norm = t.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        ensure!(norm > 0.0, "prompt ensemble: template {k} is all zeros");
        for (s, &v) in sum.iter_mut().zip(t) {
            *s += v as f64 / norm;
        }
    }
    let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
    ensure!(norm > 1e-12, "prompt ensemble: the templates cancel out (their mean is zero)");
    Ok(sum.iter().map(|v| (v / norm) as f32).collect())
}

/// Probability of the positive prompt under the softmax of the two prompts' logits,
/// `scale * cos_pos` and `scale * cos_neg`; `scale` is the multiplier (CLIP's exp(logit_scale),
/// 100 for a trained CLIP), not its logarithm.
pub fn pair_probability(cos_pos: f64, cos_neg: f64, scale: f64) -> f64 {
    // softmax([a, b])[0] = 1 / (1 + exp(b - a)), written to neither overflow nor lose tiny values.
    let z = scale * (cos_pos - cos_neg);
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// The neutral-prompt score: how much closer the image is to the label's prompt than to a
/// neutral one (e.g. "a chest radiograph").
pub fn neutral_score(cos_label: f64, cos_neutral: f64) -> f64 {
    cos_label - cos_neutral
}

/// Cosine of every row of `images` (`n x d`) with `prompt`.
fn cosines(images: &[f32], d: usize, prompt: &[f32], what: &str) -> Result<Vec<f64>> {
    ensure!(
        d > 0 && images.len().is_multiple_of(d),
        "zero-shot: {} image values are not a multiple of d = {d}",
        images.len()
    );
    ensure!(prompt.len() == d, "zero-shot: the {what} embedding has {} values, images have {d}", prompt.len());
    images
        .chunks_exact(d)
        .enumerate()
        .map(|(i, img)| {
            cosine(img, prompt)
                .ok_or_else(|| anyhow::anyhow!("zero-shot: image {i} or the {what} embedding is zero or not finite"))
        })
        .collect()
}

/// [`pair_probability`] for every image (`n x d`) against one label's positive and negative
/// prompt embeddings.
pub fn pair_scores(images: &[f32], d: usize, positive: &[f32], negative: &[f32], scale: f64) -> Result<Vec<f64>> {
    ensure!(scale.is_finite() && scale > 0.0, "zero-shot: logit scale {scale} must be positive and finite");
    let pos = cosines(images, d, positive, "positive prompt")?;
    let neg = cosines(images, d, negative, "negative prompt")?;
    Ok(pos.iter().zip(&neg).map(|(&p, &n)| pair_probability(p, n, scale)).collect())
}

/// [`neutral_score`] for every image (`n x d`) against one label's prompt and the neutral prompt.
pub fn neutral_scores(images: &[f32], d: usize, label: &[f32], neutral: &[f32]) -> Result<Vec<f64>> {
    let l = cosines(images, d, label, "label prompt")?;
    let n = cosines(images, d, neutral, "neutral prompt")?;
    Ok(l.iter().zip(&n).map(|(&a, &b)| neutral_score(a, b)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    #[test]
    fn pair_probability_is_the_two_way_softmax() {
        // cos 0.3 vs 0.2 at scale 100: logits 30 and 20 -> e^30 / (e^30 + e^20) = 1 / (1 + e^-10).
        let p = pair_probability(0.3, 0.2, 100.0);
        assert!(close(p, 1.0 / (1.0 + (-10f64).exp()), 1e-15), "{p}");
        assert!(close(pair_probability(0.2, 0.3, 100.0), (-10f64).exp() / (1.0 + (-10f64).exp()), 1e-15));
        assert_eq!(pair_probability(0.25, 0.25, 100.0), 0.5);
        // Extreme logits stay finite and ordered.
        assert_eq!(pair_probability(1.0, -1.0, 1000.0), 1.0);
        let tiny = pair_probability(-1.0, 1.0, 300.0);
        assert!(tiny > 0.0 && tiny < 1e-250, "{tiny}");
    }

    #[test]
    fn ensemble_normalises_before_and_after_the_mean() {
        // (3, 0) and (0, 0.5) normalise to (1, 0) and (0, 1); mean (0.5, 0.5) -> (1/sqrt2, 1/sqrt2).
        let e = ensemble(&[vec![3.0, 0.0], vec![0.0, 0.5]]).unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((e[0] - h).abs() < 1e-7 && (e[1] - h).abs() < 1e-7, "{e:?}");
        assert!(ensemble(&[vec![1.0, 0.0], vec![-2.0, 0.0]]).unwrap_err().to_string().contains("cancel"));
        assert!(ensemble(&[]).is_err());
        assert!(ensemble(&[vec![1.0, 0.0], vec![1.0]]).unwrap_err().to_string().contains("template 1"));
        assert!(ensemble(&[vec![0.0, 0.0]]).unwrap_err().to_string().contains("all zeros"));
    }

    #[test]
    fn batch_scores_match_the_scalar_helpers() {
        // Image (1, 1); positive (1, 0); negative (0, 2); neutral (-1, 1).
        let images = [1.0f32, 1.0, 2.0, 0.0];
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let pair = pair_scores(&images, 2, &[1.0, 0.0], &[0.0, 2.0], 50.0).unwrap();
        // Image 0: cos 0.707 to both -> 0.5. Image 1: cos 1 vs 0 -> 1 / (1 + e^-50).
        assert!(close(pair[0], 0.5, 1e-7));
        assert!(close(pair[1], 1.0 / (1.0 + (-50f64).exp()), 1e-15));
        let neutral = neutral_scores(&images, 2, &[1.0, 0.0], &[-1.0, 1.0]).unwrap();
        // Image 0: 0.707 - 0 ; image 1: 1 - (-0.707).
        assert!(close(neutral[0], h, 1e-7) && close(neutral[1], 1.0 + h, 1e-7), "{neutral:?}");
        assert!(pair_scores(&images, 2, &[1.0], &[0.0, 1.0], 50.0).is_err());
        assert!(neutral_scores(&[0.0, 0.0], 2, &[1.0, 0.0], &[0.0, 1.0]).unwrap_err().to_string().contains("image 0"));
        assert!(pair_scores(&images, 2, &[1.0, 0.0], &[0.0, 1.0], f64::NAN).is_err());
    }
}
