//! One label's ranking metrics: ROC AUC (scikit-learn's `roc_auc_score`), average precision
//! (`average_precision_score`) and the ROC curve's points (`roc_curve` with every distinct
//! threshold kept) for plots.
//!
//! Scores are ordered with `f64::total_cmp`; equal scores form one threshold, so a tied
//! positive/negative pair counts half in the AUC. A value is `None` (a curve empty) when it is
//! undefined: one class is absent, a score is NaN, or the two slices differ in length. A NaN
//! never becomes a number; the callers that hold whole prediction tables refuse NaN up front
//! (`Predictions::validate`), so `None` there only ever means "one class".

/// Tie groups of the scores in ascending order: for each distinct score the number of
/// positives and negatives that carry it. `None` when a score is NaN or the lengths differ.
fn tie_groups(scores: &[f64], truth: &[bool]) -> Option<Vec<(u64, u64)>> {
    if scores.len() != truth.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut groups: Vec<(u64, u64)> = Vec::new();
    let mut last: Option<f64> = None;
    for &i in &order {
        // `==` (not total_cmp) so that -0.0 and 0.0 are one threshold, as in numpy.
        if last != Some(scores[i]) {
            groups.push((0, 0));
            last = Some(scores[i]);
        }
        let g = groups.last_mut().expect("a group was pushed above");
        if truth[i] {
            g.0 += 1;
        } else {
            g.1 += 1;
        }
    }
    Some(groups)
}

/// AUC from ascending tie groups `(positives, negatives)`: the share of positive/negative
/// pairs ordered correctly, ties counting half. Exact integer sums, one rounding at the end.
/// `None` when a class is absent. Shared with the bootstrap, which passes resampled counts.
pub(crate) fn auc_from_groups(groups: impl Iterator<Item = (u64, u64)>) -> Option<f64> {
    let (mut pos, mut neg) = (0u128, 0u128);
    // Twice the number of correctly ordered pairs (a tie adds 1, an ordered pair 2).
    let mut twice_correct = 0u128;
    for (p, n) in groups {
        let (p, n) = (p as u128, n as u128);
        twice_correct += p * (2 * neg + n);
        pos += p;
        neg += n;
    }
    if pos == 0 || neg == 0 {
        return None;
    }
    Some(twice_correct as f64 / (2 * pos * neg) as f64)
}

/// ROC AUC, equal to scikit-learn's `roc_auc_score(truth, scores)`; `None` when only one class
/// is present, a score is NaN, or the lengths differ.
pub fn roc_auc(scores: &[f64], truth: &[bool]) -> Option<f64> {
    auc_from_groups(tie_groups(scores, truth)?.into_iter())
}

/// Average precision, equal to scikit-learn's `average_precision_score(truth, scores)`: the sum
/// over distinct thresholds (highest first) of the recall gained times the precision there, no
/// interpolation. `None` when there is no positive (scikit-learn warns and returns a
/// meaningless value), a score is NaN, or the lengths differ; 1.0 when every row is positive.
pub fn average_precision(scores: &[f64], truth: &[bool]) -> Option<f64> {
    let groups = tie_groups(scores, truth)?;
    let total_pos: u64 = groups.iter().map(|g| g.0).sum();
    if total_pos == 0 {
        return None;
    }
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut ap = 0.0;
    for &(p, n) in groups.iter().rev() {
        tp += p;
        fp += n;
        if p > 0 {
            ap += (p as f64 / total_pos as f64) * (tp as f64 / (tp + fp) as f64);
        }
    }
    Some(ap)
}

/// ROC curve points `(false positive rate, true positive rate)`, one per distinct threshold from
/// the highest score down, starting at (0, 0) and ending at (1, 1). Every threshold is kept
/// (scikit-learn's `drop_intermediate=False`). Empty when the AUC is undefined (see
/// [`roc_auc`]).
pub fn roc_curve(scores: &[f64], truth: &[bool]) -> Vec<(f64, f64)> {
    let Some(groups) = tie_groups(scores, truth) else { return Vec::new() };
    let total_pos: u64 = groups.iter().map(|g| g.0).sum();
    let total_neg: u64 = groups.iter().map(|g| g.1).sum();
    if total_pos == 0 || total_neg == 0 {
        return Vec::new();
    }
    let mut points = Vec::with_capacity(groups.len() + 1);
    points.push((0.0, 0.0));
    let (mut tp, mut fp) = (0u64, 0u64);
    for &(p, n) in groups.iter().rev() {
        tp += p;
        fp += n;
        points.push((fp as f64 / total_neg as f64, tp as f64 / total_pos as f64));
    }
    points
}

/// Indices of `scores` sorted ascending (total order) with the end of each tie group: the
/// precomputation the bootstrap reuses across resamples. NaN must have been refused before.
pub(crate) fn sorted_with_groups(scores: &[f64]) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ends = Vec::new();
    for k in 1..=order.len() {
        if k == order.len() || scores[order[k]] != scores[order[k - 1]] {
            ends.push(k);
        }
    }
    (order, ends)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15 + 1e-15 * b.abs()
    }

    #[test]
    fn auc_without_ties_counts_ordered_pairs() {
        // Positives 0.8, 0.4; negatives 0.6, 0.2: pairs (0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2) = 3/4.
        let auc = roc_auc(&[0.8, 0.6, 0.4, 0.2], &[true, false, true, false]).unwrap();
        assert!(close(auc, 0.75), "{auc}");
    }

    #[test]
    fn auc_ties_count_half() {
        // Positives 0.5, 0.9; negatives 0.5, 0.1, 0.5.
        // Pairs: 0.5 vs (0.5 tie, 0.1 win, 0.5 tie) = 2; 0.9 vs all three wins = 3 -> 5 / 6.
        let auc = roc_auc(&[0.5, 0.5, 0.9, 0.1, 0.5], &[true, false, true, false, false]).unwrap();
        assert!(close(auc, 5.0 / 6.0), "{auc}");
        // Everything tied: exactly 0.5.
        assert_eq!(roc_auc(&[1.0; 4], &[true, false, false, true]), Some(0.5));
        // -0.0 and 0.0 are one threshold.
        assert_eq!(roc_auc(&[-0.0, 0.0], &[true, false]), Some(0.5));
    }

    #[test]
    fn auc_skewed_classes() {
        // One positive among nine negatives, ranked above six of them and tied with one:
        // (6 + 0.5) / 9.
        let scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.7, 0.8, 0.9];
        let truth = [false, false, false, false, false, false, true, false, false, false];
        assert!(close(roc_auc(&scores, &truth).unwrap(), 6.5 / 9.0));
        // Inverted ranking gives 1 - AUC.
        let neg: Vec<f64> = scores.iter().map(|s| -s).collect();
        assert!(close(roc_auc(&neg, &truth).unwrap(), 2.5 / 9.0));
    }

    #[test]
    fn auc_undefined_cases_are_none() {
        assert_eq!(roc_auc(&[0.1, 0.9], &[true, true]), None);
        assert_eq!(roc_auc(&[0.1, 0.9], &[false, false]), None);
        assert_eq!(roc_auc(&[], &[]), None);
        assert_eq!(roc_auc(&[0.1, f64::NAN], &[true, false]), None);
        assert_eq!(roc_auc(&[0.1], &[true, false]), None);
        // Infinities are ordinary scores.
        assert_eq!(roc_auc(&[f64::NEG_INFINITY, f64::INFINITY], &[false, true]), Some(1.0));
    }

    #[test]
    fn average_precision_hand_values() {
        // Descending: 0.9 (+), 0.8 (-), 0.7 (+), 0.2 (-):
        // thresholds with a positive: P=1/1 at R=1/2, P=2/3 at R=2/2 -> 0.5 + 0.5 * 2/3.
        let ap = average_precision(&[0.2, 0.7, 0.8, 0.9], &[false, true, false, true]).unwrap();
        assert!(close(ap, 0.5 + 1.0 / 3.0), "{ap}");
        // A tie of one positive and one negative at the top is one threshold: P = 1/2 at R = 1/2,
        // then 0.3 (+): P = 2/3 at R = 1 -> 0.25 + 1/3 (scikit-learn gives 0.58333...).
        let ap = average_precision(&[0.9, 0.9, 0.3, 0.1], &[true, false, true, false]).unwrap();
        assert!(close(ap, 0.25 + 1.0 / 3.0), "{ap}");
        assert_eq!(average_precision(&[0.3, 0.4], &[false, false]), None);
        assert_eq!(average_precision(&[0.3, 0.4], &[true, true]), Some(1.0));
        assert_eq!(average_precision(&[f64::NAN, 0.4], &[true, false]), None);
    }

    #[test]
    fn roc_curve_points() {
        let pts = roc_curve(&[0.5, 0.5, 0.9, 0.1, 0.5], &[true, false, true, false, false]);
        // Thresholds 0.9, 0.5, 0.1 (3 negatives, 2 positives).
        assert_eq!(pts, vec![(0.0, 0.0), (0.0, 0.5), (2.0 / 3.0, 1.0), (1.0, 1.0)]);
        // The trapezoid area under these points is the AUC.
        let area: f64 = pts.windows(2).map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0).sum();
        assert!(close(area, 5.0 / 6.0));
        assert!(roc_curve(&[0.1, 0.2], &[true, true]).is_empty());
    }

    #[test]
    fn auc_matches_pair_count_on_random_scores() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for _ in 0..20 {
            let n = rng.random_range(2..60);
            // Coarse scores so that ties are common.
            let scores: Vec<f64> = (0..n).map(|_| rng.random_range(0..8) as f64 / 4.0).collect();
            let truth: Vec<bool> = (0..n).map(|_| rng.random_bool(0.3)).collect();
            let mut num = 0.0;
            let mut pairs = 0.0;
            for i in 0..n {
                for j in 0..n {
                    if truth[i] && !truth[j] {
                        pairs += 1.0;
                        num += match scores[i].partial_cmp(&scores[j]).unwrap() {
                            Ordering::Greater => 1.0,
                            Ordering::Equal => 0.5,
                            Ordering::Less => 0.0,
                        };
                    }
                }
            }
            let got = roc_auc(&scores, &truth);
            if pairs == 0.0 {
                assert_eq!(got, None);
            } else {
                assert!(close(got.unwrap(), num / pairs));
            }
        }
    }
}
