//! Image-report retrieval on a test split: recall@1/5/10 and the median rank, image-to-report
//! and report-to-image, by cosine similarity of the two towers' features.
//!
//! One report per study; every image points at its study's report. An image's correct report is
//! that one. A report's correct images are all the images of its study, and its rank is that of
//! the best of them. Tie rule (pessimistic): a wrong candidate whose similarity equals the
//! correct one's is ranked ahead of it, so rank = 1 + the number of wrong candidates with
//! similarity >= the correct one's; other correct images never count against a report. Reports
//! without any image stay in the pool as wrong candidates for image queries but are not queries.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;
use serde::Serialize;

/// Recall at 1, 5 and 10 (fractions of queries) and the median rank (1 = first).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recall {
    pub at1: f64,
    pub at5: f64,
    pub at10: f64,
    /// Median of the ranks; the mean of the two middle ones for an even count.
    pub median_rank: f64,
    pub queries: usize,
}

/// Both directions' recall.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Retrieval {
    pub image_to_report: Recall,
    pub report_to_image: Recall,
}

/// Every query's rank (1 = first), for callers that want more than the summary.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrievalRanks {
    /// Per image: the rank of its report among all reports.
    pub image_to_report: Vec<usize>,
    /// Per report: the best rank of its images among all images; `None` for a report no image
    /// points at.
    pub report_to_image: Vec<Option<usize>>,
}

/// Rows of `x` (`rows x d`) scaled to unit length (in f64, stored as f32).
fn normalised(x: &[f32], d: usize, what: &str) -> Result<Vec<f32>> {
    ensure!(d > 0 && x.len().is_multiple_of(d), "retrieval: {what} has {} values, not a multiple of d = {d}", x.len());
    let mut out = Vec::with_capacity(x.len());
    for (i, row) in x.chunks_exact(d).enumerate() {
        ensure!(row.iter().all(|v| v.is_finite()), "retrieval: {what} row {i} is not finite");
        let norm = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
        ensure!(norm > 0.0, "retrieval: {what} row {i} is all zeros (no direction to compare)");
        out.extend(row.iter().map(|&v| (v as f64 / norm) as f32));
    }
    Ok(out)
}

/// Dot product with eight independent partial sums (vectorises; same order on every run).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The rank of every query, both directions. `images` is `n x d`, `reports` is `m x d` (both
/// normalised here, so any scale works), `report_of_image[i]` the report of image `i`'s study.
pub fn retrieval_ranks(images: &[f32], reports: &[f32], d: usize, report_of_image: &[usize]) -> Result<RetrievalRanks> {
    let images = normalised(images, d, "image features")?;
    let reports = normalised(reports, d, "report features")?;
    let (n, m) = (images.len() / d, reports.len() / d);
    ensure!(n > 0 && m > 0, "retrieval: {n} images and {m} reports; need at least one of each");
    ensure!(report_of_image.len() == n, "retrieval: {} report indices for {n} images", report_of_image.len());
    if let Some(i) = report_of_image.iter().position(|&r| r >= m) {
        bail!("retrieval: image {i} points at report {} but there are {m} reports", report_of_image[i]);
    }
    // similarity[i * m + r] = cos(image i, report r)
    let similarity: Vec<f32> =
        images.par_chunks_exact(d).flat_map_iter(|img| reports.chunks_exact(d).map(move |rep| dot(img, rep))).collect();

    let image_to_report = (0..n)
        .into_par_iter()
        .map(|i| {
            let row = &similarity[i * m..(i + 1) * m];
            let correct = report_of_image[i];
            let target = row[correct];
            1 + row.iter().enumerate().filter(|&(r, &s)| r != correct && s >= target).count()
        })
        .collect();

    let mut images_of_report: Vec<Vec<usize>> = vec![Vec::new(); m];
    for (i, &r) in report_of_image.iter().enumerate() {
        images_of_report[r].push(i);
    }
    let report_to_image = (0..m)
        .into_par_iter()
        .map(|r| {
            let own = &images_of_report[r];
            let best = own.iter().map(|&i| similarity[i * m + r]).reduce(f32::max)?;
            let ahead = (0..n).filter(|&j| report_of_image[j] != r && similarity[j * m + r] >= best).count();
            Some(1 + ahead)
        })
        .collect();
    Ok(RetrievalRanks { image_to_report, report_to_image })
}

/// Recall@K and the median rank of a list of ranks.
pub fn summarise(ranks: &[usize]) -> Recall {
    let q = ranks.len();
    let within = |k: usize| if q == 0 { 0.0 } else { ranks.iter().filter(|&&r| r <= k).count() as f64 / q as f64 };
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    let median_rank = match q {
        0 => f64::NAN,
        _ if q % 2 == 1 => sorted[q / 2] as f64,
        _ => (sorted[q / 2 - 1] + sorted[q / 2]) as f64 / 2.0,
    };
    Recall { at1: within(1), at5: within(5), at10: within(10), median_rank, queries: q }
}

/// Recall@1/5/10 and median rank, image-to-report and report-to-image (see the module doc).
pub fn retrieval(images: &[f32], reports: &[f32], d: usize, report_of_image: &[usize]) -> Result<Retrieval> {
    let ranks = retrieval_ranks(images, reports, d, report_of_image)?;
    let report_ranks: Vec<usize> = ranks.report_to_image.iter().flatten().copied().collect();
    Ok(Retrieval { image_to_report: summarise(&ranks.image_to_report), report_to_image: summarise(&report_ranks) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_ranks_with_ties() {
        // d = 2; vectors chosen so the ties are exact in f32 (mirror images, equal components).
        // Reports: 0 = (1, 0), 1 = (0, 3), 2 = (-1, 0); report 2 has no image.
        let reports = [1.0f32, 0.0, 0.0, 3.0, -1.0, 0.0];
        // Image 0 = (2, 0.4), study 0: nearest report 0 -> rank 1.
        // Image 1 = (0.5, 0.5), study 1: equal cosine to reports 0 and 1, the tie counts against
        //   it -> rank 2.
        // Image 2 = (-0.5, 2), study 0: report 1 (0.97) and report 2 (0.24) ahead of report 0
        //   (-0.24) -> rank 3.
        // Image 3 = (0.5, 2), study 1: report 1 first -> rank 1.
        let images = [2.0f32, 0.4, 0.5, 0.5, -0.5, 2.0, 0.5, 2.0];
        let report_of_image = [0, 1, 0, 1];
        let ranks = retrieval_ranks(&images, &reports, 2, &report_of_image).unwrap();
        assert_eq!(ranks.image_to_report, vec![1, 2, 3, 1]);
        // Report 0: its best image is image 0 (0.98); wrong images 1 (0.71) and 3 (0.24) are
        //   below -> rank 1.
        // Report 1: its best image is image 3 (0.970); wrong image 2, its mirror image, has the
        //   same cosine and the tie counts against -> rank 2. Its own image 1 never counts.
        // Report 2: no image -> not a query.
        assert_eq!(ranks.report_to_image, vec![Some(1), Some(2), None]);

        let r = retrieval(&images, &reports, 2, &report_of_image).unwrap();
        assert_eq!(r.image_to_report, Recall { at1: 0.5, at5: 1.0, at10: 1.0, median_rank: 1.5, queries: 4 });
        assert_eq!(r.report_to_image, Recall { at1: 0.5, at5: 1.0, at10: 1.0, median_rank: 1.5, queries: 2 });
    }

    #[test]
    fn summary_counts_ks_and_median() {
        let r = summarise(&[1, 3, 7, 12, 5]);
        assert_eq!(r, Recall { at1: 0.2, at5: 0.6, at10: 0.8, median_rank: 5.0, queries: 5 });
    }

    #[test]
    fn identical_features_all_tie_to_the_last_rank() {
        // Every report identical: each image's correct report ties with all m-1 others.
        let m = 12;
        let reports = vec![1.0f32; m * 3];
        let images = vec![0.5f32; 2 * 3];
        let ranks = retrieval_ranks(&images, &reports, 3, &[4, 7]).unwrap();
        assert_eq!(ranks.image_to_report, vec![m, m]);
        // Report 4's only image ties with the other image (wrong for report 4) -> rank 2.
        assert_eq!(ranks.report_to_image[4], Some(2));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let f = [1.0f32, 0.0, 0.0, 1.0];
        assert!(retrieval(&f, &f, 2, &[0, 2]).unwrap_err().to_string().contains("points at report 2"));
        assert!(retrieval(&f, &f, 2, &[0]).unwrap_err().to_string().contains("1 report indices for 2 images"));
        assert!(retrieval(&[0.0, 0.0], &f, 2, &[0]).unwrap_err().to_string().contains("all zeros"));
        assert!(retrieval(&[f32::NAN, 0.0], &f, 2, &[0]).unwrap_err().to_string().contains("not finite"));
        assert!(retrieval(&f, &f, 3, &[0]).unwrap_err().to_string().contains("multiple"));
    }
}
