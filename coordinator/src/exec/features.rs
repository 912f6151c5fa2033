//! Feature tables: what an embed job produces for one checkpoint and one dataset, merged from
//! the workers' part files into `features.safetensors`, and read back by every probe,
//! zero-shot and retrieval run of that checkpoint and dataset.
//!
//! Layout (safetensors, f32 unless said):
//! - `<split>.x` `[n, dim]`: normalised image embeddings of the split's readable images;
//! - `<split>.y` `[n, labels]`: 1, 0, or NaN where the label policy masks the label;
//! - `<split>.patient` (i64) `[n]`: index into the metadata's `<split>.patients` list;
//! - `<split>.logits` `[n, head labels]`: a fine-tuned checkpoint's head (absent otherwise);
//! - `reports.x` `[m, dim]` and `reports.study` (i64) `[m]`: the test split's report embeddings,
//!   one per study, and the study (index into `test.studies`) each belongs to;
//! - metadata: `labels`, `head_labels`, and per split `<split>.images`, `<split>.patients`,
//!   `<split>.studies` (JSON lists), `<split>.study` (JSON list of each image's study index),
//!   and `skipped` (unreadable images left out, JSON list of paths).
//!
//! Splits are named `train`, `valid`, `test`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, ensure, Context, Result};
use model::checkpoint::{parse_safetensors, read_safetensors, to_f32, to_i64, write_tables, Column};
use proto::v1::ShardEntry;
use serde::{Deserialize, Serialize};
use worker::embed::Embedded;

pub const FEATURES: &str = "features.safetensors";

/// The split names of a feature table, in order.
pub const SPLITS: [&str; 3] = ["train", "valid", "test"];

/// One split's images: who they are, their labels, their features.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitTable {
    pub images: Vec<String>,
    pub patients: Vec<String>,
    pub studies: Vec<String>,
    /// Per image, the index of its study in `studies`.
    pub study: Vec<usize>,
    /// `[n, labels]`: Some(true/false), None where masked.
    pub truth: Vec<Option<bool>>,
    /// `[n, dim]` (filled by the merge).
    #[serde(skip)]
    pub x: Vec<f32>,
    #[serde(skip)]
    pub logits: Vec<f32>,
}

impl SplitTable {
    pub fn len(&self) -> usize {
        self.images.len()
    }
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

/// A whole table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeatureTable {
    pub dim: usize,
    pub labels: Vec<String>,
    /// The labels of the checkpoint's head, when it has one.
    pub head_labels: Vec<String>,
    pub splits: BTreeMap<String, SplitTable>,
    /// `[m, dim]` report embeddings of the test split and each one's study index.
    pub reports: Vec<f32>,
    pub report_study: Vec<usize>,
    pub skipped: Vec<String>,
}

/// What the embed job is asked to embed: the items (ids are positions in this list) and how
/// they map back to splits and reports.
pub struct EmbedRequest {
    pub items: Vec<ShardEntry>,
    /// Per image item (by id), its split and row.
    image_rows: HashMap<u64, (String, usize)>,
    /// Per text item (by id), the study index (test split) of that report.
    report_rows: HashMap<u64, usize>,
    /// The table without features yet.
    pub table: FeatureTable,
}

impl EmbedRequest {
    /// The items of `splits` (rows as given), and, when `reports` holds one text per test study
    /// (study index -> text), those reports as text items.
    pub fn new(labels: Vec<String>, splits: BTreeMap<String, SplitTable>, reports: Vec<(usize, String)>) -> Self {
        let mut items = Vec::new();
        let mut image_rows = HashMap::new();
        let mut report_rows = HashMap::new();
        for (name, t) in &splits {
            for (row, image) in t.images.iter().enumerate() {
                let id = items.len() as u64;
                items.push(ShardEntry { pair_id: id, image: image.clone(), ..Default::default() });
                image_rows.insert(id, (name.clone(), row));
            }
        }
        for (study, text) in reports {
            let id = items.len() as u64;
            items.push(ShardEntry { pair_id: id, text, ..Default::default() });
            report_rows.insert(id, study);
        }
        let table = FeatureTable { labels, splits, ..FeatureTable::default() };
        EmbedRequest { items, image_rows, report_rows, table }
    }

    /// Merges the workers' parts into the finished table: rows of unreadable images are
    /// dropped (and listed in `skipped`), everything else must be there exactly once.
    pub fn merge(self, parts: &[Embedded], head_labels: Vec<String>) -> Result<FeatureTable> {
        let mut table = self.table;
        let dim = parts.iter().map(|p| p.dim).find(|&d| d > 0).unwrap_or(0);
        table.dim = dim;
        table.head_labels = head_labels;
        let nh = table.head_labels.len();
        // (split, row) -> (features, head logits) of every embedded image.
        type Rows<'a> = HashMap<(String, usize), (&'a [f32], &'a [f32])>;
        let mut x: Rows = HashMap::new();
        let mut failed: HashMap<(String, usize), ()> = HashMap::new();
        let mut reports: Vec<(usize, &[f32])> = Vec::new();
        for p in parts {
            ensure!(p.dim == dim || p.image_ids.is_empty() && p.text_ids.is_empty(), "parts of different widths");
            ensure!(p.labels == nh || p.labels == 0 && nh == 0, "a part has {} head logits, expected {nh}", p.labels);
            for (k, id) in p.image_ids.iter().enumerate() {
                let row = self.image_rows.get(id).ok_or_else(|| anyhow!("a part holds unknown image item {id}"))?;
                let logits = if nh > 0 { &p.logits[k * nh..(k + 1) * nh] } else { &[][..] };
                ensure!(
                    x.insert(row.clone(), (&p.image[k * dim..(k + 1) * dim], logits)).is_none(),
                    "image item {id} twice"
                );
            }
            for (id, _) in &p.failed {
                let row = self.image_rows.get(id).ok_or_else(|| anyhow!("a part lists unknown image item {id}"))?;
                failed.insert(row.clone(), ());
            }
            for (k, id) in p.text_ids.iter().enumerate() {
                let study = self.report_rows.get(id).ok_or_else(|| anyhow!("a part holds unknown text item {id}"))?;
                reports.push((*study, &p.text[k * dim..(k + 1) * dim]));
            }
        }
        for (name, t) in table.splits.iter_mut() {
            let l = t.truth.len().checked_div(t.images.len()).unwrap_or(0);
            let mut kept = SplitTable { studies: t.studies.clone(), ..SplitTable::default() };
            for row in 0..t.images.len() {
                let key = (name.clone(), row);
                match x.get(&key) {
                    Some((feat, logits)) => {
                        kept.images.push(t.images[row].clone());
                        kept.patients.push(t.patients[row].clone());
                        kept.study.push(t.study[row]);
                        kept.truth.extend_from_slice(&t.truth[row * l..(row + 1) * l]);
                        kept.x.extend_from_slice(feat);
                        kept.logits.extend_from_slice(logits);
                    }
                    None if failed.contains_key(&key) => table.skipped.push(t.images[row].clone()),
                    None => return Err(anyhow!("no worker embedded {} ({name} row {row})", t.images[row])),
                }
            }
            *t = kept;
        }
        reports.sort_by_key(|(s, _)| *s);
        table.report_study = reports.iter().map(|(s, _)| *s).collect();
        table.reports = reports.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        Ok(table)
    }
}

impl FeatureTable {
    /// Writes the table as `features.safetensors` (atomically).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut meta = HashMap::new();
        meta.insert("labels".to_string(), serde_json::to_string(&self.labels)?);
        meta.insert("head_labels".to_string(), serde_json::to_string(&self.head_labels)?);
        meta.insert("skipped".to_string(), serde_json::to_string(&self.skipped)?);
        let mut owned: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut ints: Vec<(String, Vec<i64>)> = Vec::new();
        let l = self.labels.len();
        for (name, t) in &self.splits {
            let n = t.len();
            meta.insert(format!("{name}.images"), serde_json::to_string(&t.images)?);
            meta.insert(format!("{name}.studies"), serde_json::to_string(&t.studies)?);
            meta.insert(format!("{name}.study"), serde_json::to_string(&t.study)?);
            let mut patients: Vec<String> = t.patients.clone();
            patients.sort();
            patients.dedup();
            let index: HashMap<&str, i64> = patients.iter().enumerate().map(|(i, p)| (p.as_str(), i as i64)).collect();
            meta.insert(format!("{name}.patients"), serde_json::to_string(&patients)?);
            owned.push((format!("{name}.x"), vec![n, self.dim], t.x.clone()));
            let y: Vec<f32> = t.truth.iter().map(|v| v.map_or(f32::NAN, |b| if b { 1.0 } else { 0.0 })).collect();
            owned.push((format!("{name}.y"), vec![n, l], y));
            if !self.head_labels.is_empty() {
                owned.push((format!("{name}.logits"), vec![n, self.head_labels.len()], t.logits.clone()));
            }
            ints.push((format!("{name}.patient"), t.patients.iter().map(|p| index[p.as_str()]).collect()));
        }
        owned.push(("reports.x".into(), vec![self.report_study.len(), self.dim], self.reports.clone()));
        ints.push(("reports.study".into(), self.report_study.iter().map(|&s| s as i64).collect()));
        let mut cols: Vec<(String, Column)> =
            owned.iter().map(|(n, s, v)| (n.clone(), Column::F32(s.clone(), v.as_slice()))).collect();
        cols.extend(ints.iter().map(|(n, v)| (n.clone(), Column::I64(vec![v.len()], v.as_slice()))));
        write_tables(path, &cols, meta)
    }

    /// Reads a table written by [`FeatureTable::write`].
    pub fn read(path: &Path) -> Result<FeatureTable> {
        let bytes = read_safetensors(path)?;
        let st = parse_safetensors(&bytes, path)?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let json = |k: &str| -> Result<serde_json::Value> {
            let s = meta.get(k).ok_or_else(|| anyhow!("{}: no metadata {k}", path.display()))?;
            serde_json::from_str(s).with_context(|| format!("{}: metadata {k}", path.display()))
        };
        let strings = |k: &str| -> Result<Vec<String>> { Ok(serde_json::from_value(json(k)?)?) };
        let tensor = |k: &str| st.tensor(k).map_err(|e| anyhow!("{}: no tensor {k} ({e})", path.display()));
        let labels = strings("labels")?;
        let head_labels = strings("head_labels")?;
        let x = tensor("reports.x")?;
        let mut t = FeatureTable {
            dim: x.shape().get(1).copied().unwrap_or(0),
            labels,
            head_labels,
            splits: BTreeMap::new(),
            reports: to_f32(&x, "reports.x", path)?,
            report_study: to_i64(&tensor("reports.study")?, "reports.study", path)?
                .into_iter()
                .map(|v| v as usize)
                .collect(),
            skipped: strings("skipped")?,
        };
        for name in SPLITS {
            if !meta.contains_key(&format!("{name}.images")) {
                continue;
            }
            let patients = strings(&format!("{name}.patients"))?;
            let pidx = to_i64(&tensor(&format!("{name}.patient"))?, "patient", path)?;
            let xv = tensor(&format!("{name}.x"))?;
            t.dim = t.dim.max(xv.shape().get(1).copied().unwrap_or(0));
            let y = to_f32(&tensor(&format!("{name}.y"))?, "y", path)?;
            let split = SplitTable {
                images: strings(&format!("{name}.images"))?,
                patients: pidx
                    .iter()
                    .map(|&i| {
                        patients
                            .get(i as usize)
                            .cloned()
                            .ok_or_else(|| anyhow!("{}: patient index {i}", path.display()))
                    })
                    .collect::<Result<_>>()?,
                studies: strings(&format!("{name}.studies"))?,
                study: serde_json::from_value(json(&format!("{name}.study"))?)?,
                truth: y.iter().map(|v| if v.is_nan() { None } else { Some(*v > 0.5) }).collect(),
                x: to_f32(&xv, "x", path)?,
                logits: if t.head_labels.is_empty() {
                    Vec::new()
                } else {
                    to_f32(&tensor(&format!("{name}.logits"))?, "logits", path)?
                },
            };
            t.splits.insert(name.to_string(), split);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(n: usize, tag: &str) -> SplitTable {
        SplitTable {
            images: (0..n).map(|i| format!("{tag}/{i}.jpg")).collect(),
            patients: (0..n).map(|i| format!("p{}", i / 2)).collect(),
            studies: (0..n.div_ceil(2)).map(|i| format!("s{i}")).collect(),
            study: (0..n).map(|i| i / 2).collect(),
            truth: (0..n * 2).map(|i| if i % 5 == 0 { None } else { Some(i % 3 == 0) }).collect(),
            ..SplitTable::default()
        }
    }

    #[test]
    fn a_request_merges_parts_from_any_ranks_and_round_trips() {
        let splits = BTreeMap::from([("train".to_string(), split(5, "tr")), ("test".to_string(), split(4, "te"))]);
        let req = EmbedRequest::new(vec!["A".into(), "B".into()], splits, vec![(0, "r0".into()), (1, "r1".into())]);
        assert_eq!(req.items.len(), 11);
        // Two "ranks": contiguous shares; item 7 (train row 3) unreadable.
        let dim = 3;
        let embed = |ids: &[u64]| {
            let mut e = Embedded { dim, ..Embedded::default() };
            for &id in ids {
                let it = &req.items[id as usize];
                if !it.image.is_empty() {
                    if id == 7 {
                        e.failed.push((id, "corrupt".into()));
                        continue;
                    }
                    e.image_ids.push(id);
                    e.image.extend([id as f32, 1.0, -1.0]);
                } else {
                    e.text_ids.push(id);
                    e.text.extend([0.5, id as f32, 0.0]);
                }
            }
            e
        };
        let parts = [embed(&[0, 1, 2, 3, 4, 5]), embed(&[6, 7, 8, 9, 10])];
        let t = req.merge(&parts, Vec::new()).unwrap();
        let train = &t.splits["train"];
        assert_eq!(train.len(), 4);
        assert_eq!(t.skipped, vec!["tr/3.jpg".to_string()]);
        assert_eq!(train.images[3], "tr/4.jpg");
        // BTreeMap order: test (ids 0-3) before train (ids 4-8).
        assert_eq!(&train.x[9..12], &[8.0, 1.0, -1.0]);
        assert_eq!(train.truth.len(), 8);
        assert_eq!(t.report_study, vec![0, 1]);
        let dir = std::env::temp_dir().join(format!("cxrclip-features-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FEATURES);
        t.write(&path).unwrap();
        assert_eq!(FeatureTable::read(&path).unwrap(), t);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_row_is_an_error() {
        let splits = BTreeMap::from([("test".to_string(), split(2, "te"))]);
        let req = EmbedRequest::new(vec!["A".into(), "B".into()], splits, Vec::new());
        let part = Embedded { dim: 1, image_ids: vec![0], image: vec![1.0], ..Embedded::default() };
        let err = req.merge(&[part], Vec::new()).unwrap_err().to_string();
        assert!(err.contains("te/1.jpg"), "{err}");
    }
}
