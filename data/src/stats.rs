//! `data-stats`: one JSON object summarising a dataset as read, and optionally K pairs as JSON lines.

use crate::dataset::{Dataset, DatasetKind, Pair, Split};
use crate::labels::{LabelValue, UncertainPolicy, LABELS};

fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The labels a dataset has: all 14, or RSNA's one.
fn label_set(kind: DatasetKind) -> Vec<usize> {
    match kind {
        DatasetKind::Rsna => vec![crate::rsna::PNEUMONIA],
        _ => (0..LABELS.len()).collect(),
    }
}

/// The summary object. Label counts are over pairs and use the raw values (before any policy).
pub fn summary_json(d: &Dataset) -> String {
    let count = |s: Split| d.pairs.iter().filter(|p| p.split == s).count();
    let mut labels = Vec::new();
    for i in label_set(d.kind) {
        let mut c = [0usize; 4];
        for p in &d.pairs {
            c[match p.labels[i] {
                LabelValue::Positive => 0,
                LabelValue::Negative => 1,
                LabelValue::Uncertain => 2,
                LabelValue::Blank => 3,
            }] += 1;
        }
        labels.push(format!(
            "{}:{{\"pos\":{},\"neg\":{},\"uncertain\":{},\"blank\":{}}}",
            js(LABELS[i]),
            c[0],
            c[1],
            c[2],
            c[3]
        ));
    }
    format!(
        "{{\"studies\":{},\"images\":{},\"pairs\":{},\"splits\":{{\"train\":{},\"validate\":{},\"test\":{}}},\"labels\":{{{}}},\"skipped\":{}}}",
        d.studies,
        d.images,
        d.pairs.len(),
        count(Split::Train),
        count(Split::Validate),
        count(Split::Test),
        labels.join(","),
        d.problems.len()
    )
}

/// One pair as a JSON line: labels after the uncertain policy (null where masked), the text after
/// the section policy; RSNA pairs list their boxes.
pub fn pair_json(kind: DatasetKind, p: &Pair, policy: UncertainPolicy) -> String {
    let labels: Vec<String> = label_set(kind)
        .into_iter()
        .map(|i| {
            let v = match policy.apply(p.labels[i]) {
                Some(x) => format!("{x:.1}"),
                None => "null".into(),
            };
            format!("{}:{v}", js(LABELS[i]))
        })
        .collect();
    let mut s = format!(
        "{{\"subject_id\":{},\"study_id\":{},\"image\":{},\"split\":{},\"view\":{},\"labels\":{{{}}},\"text\":{}",
        js(&p.subject_id),
        js(&p.study_id),
        js(&p.image.to_string_lossy().replace('\\', "/")),
        js(p.split.name()),
        js(&p.view),
        labels.join(","),
        js(&p.text)
    );
    if kind == DatasetKind::Rsna {
        let b: Vec<String> = p.boxes.iter().map(|b| format!("[{},{},{},{}]", b[0], b[1], b[2], b[3])).collect();
        s += &format!(",\"boxes\":[{}]", b.join(","));
    }
    s.push('}');
    s
}
