//! Reports written from the same truth as the image, and the labels read back from them the way
//! the CheXpert labeller reads a report: mentions in the impression (else the findings) are
//! positive, negated or uncertain; unmentioned labels stay blank.

use rand::seq::IndexedRandom;
use rand::Rng;

use super::truth::{idx::*, Side, Truth, View};
use crate::labels::{LabelValue, NUM_LABELS};

/// How a sentence speaks of a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Positive,
    Negative,
    /// Uncertain; `strong` hedges ("likely") that NegBio reads as positive.
    Uncertain {
        strong: bool,
    },
}

/// One sentence and the labels it mentions.
#[derive(Clone, Debug)]
struct Sentence {
    text: String,
    mentions: Vec<(usize, Kind)>,
    /// Whether the impression repeats it.
    key: bool,
}

/// A written report and its labels under both labellers.
#[derive(Clone, Debug)]
pub struct Written {
    pub text: String,
    pub chexpert: [LabelValue; NUM_LABELS],
    pub negbio: [LabelValue; NUM_LABELS],
}

fn sev_word(s: f32) -> &'static str {
    if s < 0.5 {
        "mild"
    } else if s < 0.8 {
        "moderate"
    } else {
        "severe"
    }
}

fn size_word(s: f32) -> &'static str {
    if s < 0.45 {
        "small"
    } else if s < 0.8 {
        "moderate"
    } else {
        "large"
    }
}

fn pick<'a>(rng: &mut impl Rng, xs: &[&'a str]) -> &'a str {
    xs.choose(rng).copied().unwrap_or("")
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn side_lung(s: Side) -> &'static str {
    match s {
        Side::Right => "right",
        Side::Left => "left",
        Side::Both => "bilateral",
    }
}

/// The sentence for a present finding, positive or hedged.
fn finding_sentence(rng: &mut impl Rng, t: &Truth, i: usize, uncertain: bool) -> Sentence {
    let s = t.severity[i];
    let side = side_lung(t.side[i]);
    let zone = t.zone[i].word();
    let change = pick(rng, &["", "", "", " unchanged from prior", " new since the prior study", " slightly improved"]);
    let strong = rng.random::<f32>() < 0.4;
    let hedge = if strong {
        pick(rng, &["likely", "probably", "most likely"])
    } else {
        pick(rng, &["possible", "questionable", "cannot exclude"])
    };
    let kind = if uncertain { Kind::Uncertain { strong } } else { Kind::Positive };
    let mut extra = Vec::new();
    let text = match (i, uncertain) {
        (CARDIOMEGALY, false) => pick(
            rng,
            &[
                &format!("{} enlargement of the cardiac silhouette{change}.", cap(sev_word(s))),
                &format!("The heart is {} enlarged{change}.", sev_word(s)),
                &format!("{} cardiomegaly{change}.", cap(sev_word(s))),
            ],
        )
        .to_string(),
        (CARDIOMEGALY, true) => match hedge {
            "cannot exclude" => "Cannot exclude mild cardiomegaly.".to_string(),
            h => format!("{} mild cardiomegaly.", cap(h)),
        },
        (ECM, false) => pick(
            rng,
            &[
                "The mediastinum is widened.",
                "The cardiomediastinal silhouette is enlarged.",
                "Widening of the superior mediastinum.",
            ],
        )
        .to_string(),
        (ECM, true) => format!("{} mediastinal widening.", cap(hedge)),
        (OPACITY, false) => pick(
            rng,
            &[
                &format!("Patchy opacity in the {side} {zone} lung{change}."),
                &format!("There is a hazy {side} {zone} lung opacity."),
                &format!("Ill-defined opacities in the {side} {zone} lung zone{change}."),
            ],
        )
        .to_string(),
        (OPACITY, true) => format!("{} faint opacity in the {side} {zone} lung.", cap(hedge)),
        (LESION, false) => {
            let mm = (8.0 + 25.0 * s) as u32;
            pick(
                rng,
                &[
                    &format!("A {mm} mm nodule projects over the {side} {zone} lung."),
                    &format!("{} {zone} lung nodule measuring {mm} mm, recommend chest CT.", cap(side)),
                    &format!("Rounded mass in the {side} {zone} lung."),
                ],
            )
            .to_string()
        }
        (LESION, true) => format!("{} nodule in the {side} {zone} lung; recommend dedicated imaging.", cap(hedge)),
        (EDEMA, false) => pick(
            rng,
            &[
                &format!("{} pulmonary edema{change}.", cap(sev_word(s))),
                &format!(
                    "Perihilar haziness and interstitial markings consistent with {} pulmonary edema.",
                    sev_word(s)
                ),
                &format!("{} interstitial edema with Kerley B lines.", cap(sev_word(s))),
            ],
        )
        .to_string(),
        (EDEMA, true) => format!("{} mild interstitial edema.", cap(hedge)),
        (CONSOLIDATION, false) => pick(
            rng,
            &[
                &format!("{} {zone} lobe consolidation{change}.", cap(side)),
                &format!("Dense consolidation in the {side} {zone} lung with air bronchograms."),
                &format!("Airspace consolidation at the {side} {zone} lung."),
            ],
        )
        .to_string(),
        (CONSOLIDATION, true) => format!("{} early consolidation in the {side} {zone} lung.", cap(hedge)),
        (PNEUMONIA, false) => pick(
            rng,
            &[
                &format!("Findings consistent with {side} {zone} lobe pneumonia."),
                &format!("{} {zone} lung pneumonia{change}.", cap(side)),
            ],
        )
        .to_string(),
        (PNEUMONIA, true) => {
            // The classic hedge names an opacity too: the labeller reads both.
            extra.push((OPACITY, Kind::Positive));
            match hedge {
                "cannot exclude" => format!("{} {zone} opacity; cannot exclude pneumonia.", cap(side)),
                h => format!("{} {zone} lung opacity, {h} pneumonia.", cap(side)),
            }
        }
        (ATELECTASIS, false) => pick(
            rng,
            &[
                &format!("Plate-like atelectasis at the {side} lung base."),
                &format!("{} basilar atelectasis{change}.", cap(side)),
                &format!("Linear atelectasis in the {side} lower lung."),
            ],
        )
        .to_string(),
        (ATELECTASIS, true) => format!("{} basilar streaky density, {hedge} atelectasis.", cap(side)),
        (PNEUMOTHORAX, false) => {
            let sz = if s < 0.45 {
                "small"
            } else if s < 0.8 {
                "moderate"
            } else {
                "large"
            };
            pick(
                rng,
                &[
                    &format!("{} {side} apical pneumothorax.", cap(sz)),
                    &format!("There is a {sz} {side} pneumothorax{change}."),
                ],
            )
            .to_string()
        }
        (PNEUMOTHORAX, true) => format!("{} tiny {side} apical pneumothorax.", cap(hedge)),
        (EFFUSION, false) => {
            let sz = size_word(s);
            if t.side[i] == Side::Both {
                pick(
                    rng,
                    &[
                        &format!("{} bilateral pleural effusions{change}.", cap(sz)),
                        &format!("Bilateral pleural effusions, {sz}."),
                    ],
                )
                .to_string()
            } else {
                pick(
                    rng,
                    &[
                        &format!("{} {side} pleural effusion{change}.", cap(sz)),
                        &format!("Blunting of the {side} costophrenic angle from a {sz} pleural effusion."),
                        &format!("{} {sz} pleural effusion with adjacent atelectasis.", cap(side)),
                    ],
                )
                .to_string()
            }
        }
        (EFFUSION, true) => format!("{} trace {side} pleural effusion.", cap(hedge)),
        (PLEURAL_OTHER, false) => pick(
            rng,
            &[
                &format!("{} pleural thickening.", cap(side)),
                &format!("Calcified pleural plaque along the {side} chest wall."),
            ],
        )
        .to_string(),
        (PLEURAL_OTHER, true) => format!("{} {side} pleural thickening.", cap(hedge)),
        (FRACTURE, false) => {
            let nth = pick(rng, &["fifth", "sixth", "seventh", "eighth", "posterior"]);
            let age = pick(rng, &["healing", "displaced", "old"]);
            pick(
                rng,
                &[
                    &format!("Acute fracture of the {side} {nth} rib."),
                    &format!("{} {side} {nth} rib fracture.", cap(age)),
                ],
            )
            .to_string()
        }
        (FRACTURE, true) => format!("{} nondisplaced {side} rib fracture.", cap(hedge)),
        _ => String::new(),
    };
    // The "adjacent atelectasis" variant also mentions atelectasis.
    if text.contains("adjacent atelectasis") {
        extra.push((ATELECTASIS, Kind::Positive));
    }
    let mut mentions = vec![(i, kind)];
    mentions.extend(extra);
    Sentence { text, mentions, key: true }
}

fn device_sentences(rng: &mut impl Rng, t: &Truth) -> Vec<Sentence> {
    let d = t.devices;
    let mut out = Vec::new();
    let mut add = |s: String| out.push(Sentence { text: s, mentions: vec![(DEVICES, Kind::Positive)], key: false });
    if d.ett {
        add(format!("Endotracheal tube terminates {} cm above the carina.", rng.random_range(2..7)));
    }
    if d.ng_tube {
        add(pick(
            rng,
            &["Enteric tube courses below the diaphragm into the stomach.", "Nasogastric tube tip is in the stomach."],
        )
        .to_string());
    }
    if d.central_line {
        add(pick(
            rng,
            &[
                "Right internal jugular central venous catheter tip in the SVC.",
                "Central venous catheter terminates in the mid SVC.",
                "Left-sided PICC line tip at the cavoatrial junction.",
            ],
        )
        .to_string());
    }
    if d.pacemaker {
        add("Left chest wall pacemaker with lead terminating in the right ventricle.".to_string());
    }
    if d.sternal_wires {
        add("Median sternotomy wires are intact.".to_string());
    }
    out
}

/// Negation statements for some absent findings, as radiologists write them.
fn negations(rng: &mut impl Rng, t: &Truth) -> Vec<Sentence> {
    let absent = |i: usize| !t.present(i);
    let mut out = Vec::new();
    let mut neg = |text: &str, labels: &[usize]| {
        out.push(Sentence {
            text: text.to_string(),
            mentions: labels.iter().map(|&l| (l, Kind::Negative)).collect(),
            key: false,
        })
    };
    if absent(CARDIOMEGALY) && absent(ECM) && rng.random::<f32>() < 0.7 {
        let s = pick(
            rng,
            &[
                "Heart size and mediastinal contours are normal.",
                "The cardiomediastinal silhouette is within normal limits.",
                "Normal heart size.",
            ],
        );
        let labels: &[usize] = if s.starts_with("Normal heart") { &[CARDIOMEGALY] } else { &[CARDIOMEGALY, ECM] };
        neg(s, labels);
    }
    if absent(CONSOLIDATION) && absent(EFFUSION) && absent(PNEUMOTHORAX) && rng.random::<f32>() < 0.6 {
        neg("No focal consolidation, pleural effusion or pneumothorax.", &[CONSOLIDATION, EFFUSION, PNEUMOTHORAX]);
    } else {
        if absent(EFFUSION) && rng.random::<f32>() < 0.6 {
            neg(pick(rng, &["No pleural effusion.", "There is no pleural effusion."]), &[EFFUSION]);
        }
        if absent(PNEUMOTHORAX) && rng.random::<f32>() < 0.7 {
            neg(pick(rng, &["No pneumothorax.", "There is no pneumothorax."]), &[PNEUMOTHORAX]);
        }
        if absent(CONSOLIDATION) && rng.random::<f32>() < 0.4 {
            neg("No focal consolidation.", &[CONSOLIDATION]);
        }
    }
    if absent(EDEMA) && rng.random::<f32>() < 0.35 {
        neg(pick(rng, &["No pulmonary edema.", "No evidence of pulmonary edema."]), &[EDEMA]);
    }
    if absent(PNEUMONIA) && t.acuity > 0 && rng.random::<f32>() < 0.2 {
        neg("No evidence of pneumonia.", &[PNEUMONIA]);
    }
    if absent(FRACTURE) && rng.random::<f32>() < 0.25 {
        neg(pick(rng, &["No acute osseous abnormality.", "No displaced rib fracture."]), &[FRACTURE]);
    }
    out
}

fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = 0;
    for word in text.split_whitespace() {
        if line > 0 && line + 1 + word.len() > width {
            out.push_str("\n ");
            line = 0;
        } else if line > 0 {
            out.push(' ');
            line += 1;
        }
        out.push_str(word);
        line += word.len();
    }
    out
}

fn heading(style: u8, name: &str) -> String {
    match style {
        0 => format!(" {name}:  "),
        1 => format!(" {name}:\n "),
        2 => format!(" {}: ", cap(&name.to_lowercase())),
        _ => format!(" {name}\n "),
    }
}

/// Labels as the CheXpert labeller aggregates mentions: positive wins, then uncertain, then
/// negative; No Finding is positive only when no pathology is positive or uncertain.
fn label(mentions: &[(usize, Kind)], negbio: bool) -> [LabelValue; NUM_LABELS] {
    let mut l = [LabelValue::Blank; NUM_LABELS];
    for &(i, k) in mentions {
        let v = match k {
            Kind::Positive => LabelValue::Positive,
            Kind::Negative => LabelValue::Negative,
            Kind::Uncertain { strong: true } if negbio => LabelValue::Positive,
            Kind::Uncertain { .. } => LabelValue::Uncertain,
        };
        let rank = |x: LabelValue| match x {
            LabelValue::Positive => 3,
            LabelValue::Uncertain => 2,
            LabelValue::Negative => 1,
            LabelValue::Blank => 0,
        };
        if rank(v) > rank(l[i]) {
            l[i] = v;
        }
    }
    let sick = (1..DEVICES).any(|i| matches!(l[i], LabelValue::Positive | LabelValue::Uncertain));
    if !sick {
        l[NO_FINDING] = LabelValue::Positive;
    }
    l
}

/// Writes the report of a study and labels it.
pub fn write(rng: &mut impl Rng, t: &Truth) -> Written {
    let mut findings: Vec<Sentence> = Vec::new();
    for i in 1..DEVICES {
        if !t.present(i) {
            continue;
        }
        let s = t.severity[i];
        // Subtle findings are hedged or missed, as they are in practice.
        if s < 0.4 && rng.random::<f32>() < 0.15 {
            continue;
        }
        let uncertain = if s < 0.45 { rng.random::<f32>() < 0.5 } else { rng.random::<f32>() < 0.08 };
        let mut sent = finding_sentence(rng, t, i, uncertain);
        // Small, uncertain findings sometimes stay in the findings section only.
        sent.key = !(uncertain && rng.random::<f32>() < 0.3);
        findings.push(sent);
    }
    // Occasionally a worried hedge about something that is not there.
    if t.acuity > 0 && !t.present(PNEUMONIA) && rng.random::<f32>() < 0.04 {
        findings.push(Sentence {
            text: "Cannot exclude early pneumonia in the appropriate clinical setting.".into(),
            mentions: vec![(PNEUMONIA, Kind::Uncertain { strong: false })],
            key: true,
        });
    }
    let devs = device_sentences(rng, t);
    let negs = negations(rng, t);
    let any_pos = findings.iter().any(|s| s.key);

    let mut body: Vec<&Sentence> = devs.iter().chain(findings.iter()).chain(negs.iter()).collect();
    // Radiologists do not all dictate in the same order.
    if rng.random::<f32>() < 0.3 {
        body.reverse();
    }
    let mut imp: Vec<Sentence> = findings.iter().filter(|s| s.key).cloned().collect();
    if rng.random::<f32>() < 0.5 {
        imp.extend(devs.iter().cloned());
    }
    if !any_pos {
        let normal = pick(
            rng,
            &[
                "No acute cardiopulmonary process.",
                "No acute intrathoracic abnormality.",
                "No radiographic evidence of acute cardiopulmonary disease.",
            ],
        );
        imp.push(Sentence { text: normal.into(), mentions: vec![], key: true });
    }
    let ap = t.frontal == View::Ap;
    let exam = if t.has_lateral {
        "CHEST (PA AND LAT)"
    } else if ap {
        "CHEST (PORTABLE AP)"
    } else {
        "CHEST (PA)"
    };
    let who = if t.female { "woman" } else { "man" };
    let why = pick(
        rng,
        &[
            "cough, fever",
            "shortness of breath",
            "chest pain",
            "eval for pneumonia",
            "s/p line placement",
            "hypoxia",
            "pre-operative evaluation",
            "fall",
        ],
    );
    let style = rng.random_range(0..4u8);
    let layout = rng.random_range(0..10u8);
    let mut txt = String::from("                                 FINAL REPORT\n");
    txt += &format!("{}{exam}\n \n", heading(style, "EXAMINATION"));
    let ind = if rng.random::<bool>() { "INDICATION" } else { "HISTORY" };
    txt += &format!("{}___ year old {who} with {why}  // ___\n \n", heading(style, ind));
    if rng.random::<f32>() < 0.8 {
        let tech = if t.has_lateral {
            "Chest PA and lateral"
        } else if ap {
            "Portable AP chest"
        } else {
            "Chest PA"
        };
        txt += &format!("{}{tech}\n \n", heading(style, "TECHNIQUE"));
    }
    txt += &format!(
        "{}{}\n \n",
        heading(style, "COMPARISON"),
        pick(rng, &["___", "None.", "Chest radiograph from ___.", "Prior study ___."])
    );
    let find_text = wrap(&body.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join(" "), 70);
    let imp_text = wrap(&imp.iter().map(|s| s.text.as_str()).collect::<Vec<_>>().join(" "), 70);
    // Layouts: both sections (most), impression only, findings only.
    let (has_find, has_imp) = match layout {
        0 => (false, true),
        1 => (true, false),
        _ => (true, true),
    };
    if has_find {
        txt += &format!("{}{find_text}\n \n", heading(style, "FINDINGS"));
    }
    if has_imp {
        txt += &format!("{}{imp_text}\n", heading(style, "IMPRESSION"));
    }
    if rng.random::<f32>() < 0.05 {
        txt += " \n ADDENDUM:  Findings were discussed with Dr. ___ by Dr. ___ at ___ on ___.\n";
    }
    // The labeller reads the impression when there is one, else the findings.
    let read: Vec<(usize, Kind)> = if has_imp {
        imp.iter().flat_map(|s| s.mentions.iter().copied()).collect()
    } else {
        body.iter().flat_map(|s| s.mentions.iter().copied()).collect()
    };
    Written { text: txt, chexpert: label(&read, false), negbio: label(&read, true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labeller_precedence() {
        let m = [(EFFUSION, Kind::Negative), (EFFUSION, Kind::Uncertain { strong: false }), (EDEMA, Kind::Negative)];
        let l = label(&m, false);
        assert_eq!(l[EFFUSION], LabelValue::Uncertain);
        assert_eq!(l[EDEMA], LabelValue::Negative);
        assert_eq!(l[NO_FINDING], LabelValue::Blank);
        let l = label(&[(DEVICES, Kind::Positive), (EDEMA, Kind::Negative)], false);
        assert_eq!(l[NO_FINDING], LabelValue::Positive);
        let l = label(&[(ATELECTASIS, Kind::Uncertain { strong: true })], true);
        assert_eq!(l[ATELECTASIS], LabelValue::Positive);
    }
}
