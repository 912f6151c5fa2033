//! Seeded splits and training fractions, always by patient so that no patient straddles two sets.

use std::collections::HashMap;

use crate::dataset::{Pair, Split};
use crate::synth::mix;

/// A patient's position in [0, 1) for a seed: the same for every fraction and every call.
pub fn unit_hash(seed: u64, key: &str) -> f64 {
    // FNV-1a over the key, then the SplitMix finaliser with the seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (mix(seed, h, 0x5EED) >> 11) as f64 / (1u64 << 53) as f64
}

/// Splits groups (patients) into train / validate / test with the given fractions, stratified
/// by `stratum` (e.g. positive or not): within each stratum, groups are ordered by their seeded
/// hash and cut at the cumulative fractions.
pub fn stratified_split(groups: &[(String, usize)], fractions: [f64; 3], seed: u64) -> HashMap<String, Split> {
    let mut by: HashMap<usize, Vec<&String>> = HashMap::new();
    for (k, s) in groups {
        by.entry(*s).or_default().push(k);
    }
    let total: f64 = fractions.iter().sum();
    let mut out = HashMap::with_capacity(groups.len());
    for (_, mut keys) in by {
        keys.sort_by(|a, b| unit_hash(seed, a).total_cmp(&unit_hash(seed, b)).then(a.cmp(b)));
        let n = keys.len() as f64;
        let n_train = (n * fractions[0] / total).round() as usize;
        let n_val = (n * (fractions[0] + fractions[1]) / total).round() as usize;
        for (i, k) in keys.into_iter().enumerate() {
            let s = if i < n_train {
                Split::Train
            } else if i < n_val {
                Split::Validate
            } else {
                Split::Test
            };
            out.insert(k.clone(), s);
        }
    }
    out
}

/// The training fractions the experiments use.
pub const FRACTIONS: [f64; 5] = [0.01, 0.03, 0.1, 0.3, 1.0];

/// Positions in `patients` (one patient id per row) of the rows of a `fraction` of the
/// patients. A patient is in when its seeded hash is below the fraction, so smaller fractions
/// are nested in larger ones and the draw is reproducible from the seed. At least one patient
/// is kept for any fraction > 0.
pub fn patient_fraction<S: AsRef<str>>(patients: &[S], fraction: f64, seed: u64) -> Vec<usize> {
    if fraction >= 1.0 {
        return (0..patients.len()).collect();
    }
    let hash = |i: usize| unit_hash(seed, patients[i].as_ref());
    let keep: Vec<usize> = (0..patients.len()).filter(|&i| hash(i) < fraction).collect();
    if !keep.is_empty() || fraction <= 0.0 {
        return keep;
    }
    // The patient with the smallest hash: the one every larger fraction also contains.
    let Some(first) = (0..patients.len()).min_by(|&a, &b| hash(a).total_cmp(&hash(b))) else { return keep };
    (0..patients.len()).filter(|&i| patients[i].as_ref() == patients[first].as_ref()).collect()
}

/// Indices of the training pairs in a `fraction` of the training patients
/// ([`patient_fraction`] over the training split).
pub fn training_fraction(pairs: &[Pair], fraction: f64, seed: u64) -> Vec<usize> {
    let train: Vec<usize> = (0..pairs.len()).filter(|&i| pairs[i].split == Split::Train).collect();
    let patients: Vec<&str> = train.iter().map(|&i| pairs[i].subject_id.as_str()).collect();
    patient_fraction(&patients, fraction, seed).into_iter().map(|k| train[k]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{LabelValue, NUM_LABELS};

    fn pairs(n: usize) -> Vec<Pair> {
        (0..n)
            .map(|i| Pair {
                subject_id: format!("p{}", i / 3),
                study_id: format!("s{i}"),
                image: format!("{i}.jpg").into(),
                split: if i % 10 == 9 { Split::Test } else { Split::Train },
                view: "PA".into(),
                labels: [LabelValue::Blank; NUM_LABELS],
                text: String::new(),
                boxes: vec![],
            })
            .collect()
    }

    #[test]
    fn fractions_are_nested_by_patient_and_reproducible() {
        let p = pairs(3000);
        let mut prev: Vec<usize> = Vec::new();
        for f in FRACTIONS {
            let s = training_fraction(&p, f, 11);
            assert_eq!(s, training_fraction(&p, f, 11), "reproducible");
            assert!(prev.iter().all(|i| s.contains(i)), "nested at {f}");
            // Whole patients only.
            for &i in &s {
                for (j, q) in p.iter().enumerate() {
                    if q.subject_id == p[i].subject_id && q.split == Split::Train {
                        assert!(s.contains(&j));
                    }
                }
            }
            assert!(s.iter().all(|&i| p[i].split == Split::Train));
            prev = s;
        }
        let n_train = p.iter().filter(|x| x.split == Split::Train).count();
        let tenth = training_fraction(&p, 0.1, 11).len() as f64 / n_train as f64;
        assert!((tenth - 0.1).abs() < 0.04, "{tenth}");
        assert_ne!(training_fraction(&p, 0.1, 11), training_fraction(&p, 0.1, 12));
        assert!(!training_fraction(&p, 0.0001, 11).is_empty());
    }

    #[test]
    fn stratified_split_keeps_strata_proportions() {
        let groups: Vec<(String, usize)> = (0..1000).map(|i| (format!("g{i}"), (i % 4 == 0) as usize)).collect();
        let s = stratified_split(&groups, [0.7, 0.15, 0.15], 5);
        assert_eq!(s, stratified_split(&groups, [0.7, 0.15, 0.15], 5));
        for stratum in [0, 1] {
            let in_s: Vec<&(String, usize)> = groups.iter().filter(|g| g.1 == stratum).collect();
            let test = in_s.iter().filter(|g| s[&g.0] == Split::Test).count() as f64 / in_s.len() as f64;
            assert!((test - 0.15).abs() < 0.01, "{test}");
        }
    }
}
