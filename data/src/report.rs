//! Report text: sections found by their headings, and the policies that choose the text a pair
//! trains on. Robust to case, missing colons, headings on their own line or inline, missing
//! sections and `___` de-identification marks.

use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::Rng;

/// A section of a radiology report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Section {
    /// Text before the first heading.
    Preamble,
    /// Text after FINAL REPORT up to the next heading, without the title lines it opens with
    /// (in reports without other headings, the whole report).
    FinalReport,
    Examination,
    Indication,
    History,
    Technique,
    Comparison,
    Findings,
    Impression,
    Addendum,
    Date,
    /// Headings we recognise but do not treat specially (notification, recommendation...).
    Other,
}

/// Heading spellings, longest first so that "CLINICAL HISTORY" wins over "HISTORY".
const HEADINGS: &[(&str, Section)] = &[
    ("REASON FOR EXAMINATION", Section::Indication),
    ("REASON FOR EXAM", Section::Indication),
    ("CLINICAL INFORMATION", Section::Indication),
    ("CLINICAL HISTORY", Section::History),
    ("FINAL REPORT", Section::FinalReport),
    ("EXAMINATION", Section::Examination),
    ("INDICATION", Section::Indication),
    ("CONCLUSION", Section::Impression),
    ("COMPARISON", Section::Comparison),
    ("IMPRESSION", Section::Impression),
    ("NOTIFICATION", Section::Other),
    ("RECOMMENDATION(S)", Section::Other),
    ("RECOMMENDATIONS", Section::Other),
    ("RECOMMENDATION", Section::Other),
    ("TECHNIQUE", Section::Technique),
    ("FINDINGS", Section::Findings),
    ("ADDENDUM", Section::Addendum),
    ("HISTORY", Section::History),
    ("EXAM", Section::Examination),
    ("DATE", Section::Date),
];

/// One found heading: where it starts, where its text starts, and what it is.
#[derive(Clone, Copy, Debug)]
struct Hit {
    start: usize,
    body: usize,
    section: Section,
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// Finds the headings of `text`. A heading counts when it
/// - is followed by a colon (anywhere, inline or not, any case), or
/// - stands alone on its line (any case), or
/// - starts a line in capitals and is followed by text (a missing colon).
fn find_headings(text: &str) -> Vec<Hit> {
    let upper = text.to_ascii_uppercase();
    let ub = upper.as_bytes();
    let tb = text.as_bytes();
    let mut hits: Vec<Hit> = Vec::new();
    for &(name, section) in HEADINGS {
        let mut from = 0;
        while let Some(off) = upper[from..].find(name) {
            let start = from + off;
            let end = start + name.len();
            from = start + 1;
            if start > 0 && is_word_byte(ub[start - 1]) {
                continue;
            }
            if end < ub.len() && is_word_byte(ub[end]) {
                continue;
            }
            // Skip spaces after the heading.
            let mut j = end;
            while j < tb.len() && (tb[j] == b' ' || tb[j] == b'\t') {
                j += 1;
            }
            let line_start = text[..start].rfind('\n').map_or(0, |p| p + 1);
            let at_line_start = text[line_start..start].trim().is_empty();
            let body = if j < tb.len() && tb[j] == b':' {
                Some(j + 1)
            } else if at_line_start && (j >= tb.len() || tb[j] == b'\n' || tb[j] == b'\r') {
                Some(j)
            } else if at_line_start && &tb[start..end] == name.as_bytes() && j > end {
                // Capitals at the start of a line followed by text: a heading without its colon.
                Some(j)
            } else {
                None
            };
            if let Some(body) = body {
                if !hits.iter().any(|h| start < h.body && h.start < body) {
                    hits.push(Hit { start, body, section });
                }
            }
        }
    }
    hits.sort_by_key(|h| h.start);
    hits
}

/// Words that make an upper-case line a film title ("CHEST RADIOGRAPH PERFORMED ON ___",
/// "CHEST (PA AND LAT)", "PORTABLE AP CHEST").
const TITLE_WORDS: &[&str] = &["CHEST", "RADIOGRAPH", "PORTABLE", "X-RAY", "XRAY", "FILM"];

/// A title line: capitals only (no lower-case letter), naming the film, and not a sentence (an
/// upper-case sentence such as "NO ACUTE CHEST DISEASE." ends with a full stop and stays).
fn is_title(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty()
        && !t.ends_with('.')
        && !t.bytes().any(|b| b.is_ascii_lowercase())
        && TITLE_WORDS.iter().any(|w| t.contains(w))
}

/// The text without the title lines it opens with (blank lines between them are skipped too).
fn strip_titles(body: &str) -> &str {
    let mut rest = body;
    loop {
        let (line, after) = match rest.find('\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if !(line.trim().is_empty() || is_title(line)) {
            return rest;
        }
        if after.is_empty() {
            return "";
        }
        rest = after;
    }
}

/// "___", "45": the number of an age phrase (ages are de-identified as ___ in MIMIC).
fn is_age_number(w: &str) -> bool {
    w == "___" || (!w.is_empty() && w.len() <= 3 && w.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `parts` (lower case, hyphens split) is an age phrase: "___ year old", "45 yrs old",
/// "___ yo", "___ y/o", "___ y.o".
fn is_age_phrase(parts: &[&str]) -> bool {
    match parts {
        [n, y, "old"] => is_age_number(n) && matches!(*y, "year" | "years" | "yr" | "yrs"),
        [n, y] => is_age_number(n) && matches!(*y, "yo" | "y/o" | "y.o"),
        _ => false,
    }
}

/// Removes age phrases ("___-year-old", "___ year old", "45 yo") from cleaned text, as the
/// paper's preprocessing does; punctuation that ended a phrase stays on the word before it.
pub fn drop_age_phrases(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut i = 0;
    'words: while i < words.len() {
        for n in 1..=3.min(words.len() - i) {
            let phrase = words[i..i + n].join(" ").to_lowercase();
            let core = phrase.trim_end_matches([',', ';', ':', '.']);
            let parts: Vec<&str> = core.split([' ', '-']).filter(|p| !p.is_empty()).collect();
            if is_age_phrase(&parts) {
                let punct = &phrase[core.len()..];
                // "y.o." ends in its own full stop: only what follows the phrase is punctuation.
                let punct = if core.ends_with("y.o") { punct.strip_prefix('.').unwrap_or(punct) } else { punct };
                if let Some(prev) = out.last_mut() {
                    if !prev.ends_with([',', ';', ':', '.']) {
                        prev.push_str(punct);
                    }
                }
                i += n;
                continue 'words;
            }
        }
        out.push(words[i].to_string());
        i += 1;
    }
    out.join(" ")
}

/// Collapses whitespace and long runs of de-identification underscores.
pub fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for w in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        if w.len() > 3 && w.bytes().all(|b| b == b'_') {
            out.push_str("___");
        } else {
            out.push_str(w);
        }
    }
    out
}

/// A report split into sections, in order of appearance; repeated headings (several addenda)
/// stay separate entries.
#[derive(Clone, Debug, Default)]
pub struct Sections {
    pub parts: Vec<(Section, String)>,
    raw: String,
}

impl Sections {
    pub fn parse(text: &str) -> Sections {
        let hits = find_headings(text);
        let mut parts = Vec::new();
        let first = hits.first().map_or(text.len(), |h| h.start);
        let pre = clean(strip_titles(&text[..first]));
        if !pre.is_empty() {
            parts.push((Section::Preamble, pre));
        }
        for (k, h) in hits.iter().enumerate() {
            let end = hits.get(k + 1).map_or(text.len(), |n| n.start);
            let body = &text[h.body..end];
            // Text after FINAL REPORT is the report itself when no other heading follows: only the
            // title lines it opens with are not content.
            let body = if h.section == Section::FinalReport { strip_titles(body) } else { body };
            parts.push((h.section, clean(body)));
        }
        Sections { parts, raw: text.to_string() }
    }

    /// The text of a section (several occurrences joined), or None when absent or empty.
    pub fn get(&self, s: Section) -> Option<String> {
        let v: Vec<&str> =
            self.parts.iter().filter(|(k, t)| *k == s && !t.is_empty()).map(|(_, t)| t.as_str()).collect();
        (!v.is_empty()).then(|| v.join(" "))
    }

    /// The last non-empty paragraph of the raw text (blank-line separated), cleaned.
    pub fn last_paragraph(&self) -> String {
        let mut paras: Vec<String> = Vec::new();
        let mut cur = String::new();
        for line in self.raw.lines() {
            if line.trim().is_empty() {
                if !cur.trim().is_empty() {
                    paras.push(std::mem::take(&mut cur));
                }
                cur.clear();
            } else {
                cur.push_str(line);
                cur.push('\n');
            }
        }
        if !cur.trim().is_empty() {
            paras.push(cur);
        }
        let last = paras.pop().unwrap_or_default();
        // A trailing paragraph that holds headings keeps just their text (FINAL REPORT's body is
        // the report's text, without the heading words and the title lines).
        let s = Sections::parse(&last);
        let body: Vec<&str> = s.parts.iter().map(|(_, t)| t.as_str()).filter(|t| !t.is_empty()).collect();
        body.join(" ")
    }
}

/// Which text a pair trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SectionPolicy {
    /// The whole report without TECHNIQUE, COMPARISON, DATE and EXAMINATION, the words FINAL
    /// REPORT, film title lines and age phrases (the paper's).
    #[default]
    Paper,
    /// The impression, else the findings, else the last paragraph.
    Impression,
    /// Findings and impression, whichever exist (else the last paragraph).
    FindingsImpression,
}

impl FromStr for SectionPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "paper" => Ok(SectionPolicy::Paper),
            "impression" => Ok(SectionPolicy::Impression),
            "findings+impression" => Ok(SectionPolicy::FindingsImpression),
            o => Err(format!("unknown section policy '{o}' (paper, impression, findings+impression)")),
        }
    }
}

/// Applies a section policy to a report.
pub fn select_text(report: &str, policy: SectionPolicy) -> String {
    let s = Sections::parse(report);
    match policy {
        SectionPolicy::Paper => {
            let keep: Vec<&str> = s
                .parts
                .iter()
                .filter(|(k, _)| {
                    !matches!(k, Section::Technique | Section::Comparison | Section::Date | Section::Examination)
                })
                .map(|(_, t)| t.as_str())
                .filter(|t| !t.is_empty())
                .collect();
            drop_age_phrases(&keep.join(" "))
        }
        SectionPolicy::Impression => {
            s.get(Section::Impression).or_else(|| s.get(Section::Findings)).unwrap_or_else(|| s.last_paragraph())
        }
        SectionPolicy::FindingsImpression => {
            let v: Vec<String> = [s.get(Section::Findings), s.get(Section::Impression)].into_iter().flatten().collect();
            if v.is_empty() {
                s.last_paragraph()
            } else {
                v.join(" ")
            }
        }
    }
}

/// Splits text into sentences (ends at '.', '?' or '!' followed by a space or the end).
pub fn sentences(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..b.len() {
        if matches!(b[i], b'.' | b'?' | b'!') && (i + 1 == b.len() || b[i + 1] == b' ') {
            let s = text[start..=i].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = i + 1;
        }
    }
    let tail = text[start..].trim();
    if !tail.is_empty() {
        out.push(tail);
    }
    out
}

/// Training-time augmentation: the same sentences in a random order.
pub fn shuffle_sentences(text: &str, rng: &mut impl Rng) -> String {
    let mut s = sentences(text);
    s.shuffle(rng);
    s.join(" ")
}

/// Turns text into token ids. The CLIP tokenizer lives in `model`; the loader takes any of these.
pub trait Tokenize: Send + Sync {
    /// Exactly `context` (77) ids, padded and truncated as the model expects.
    fn encode(&self, text: &str) -> Vec<i32>;
}

impl<F: Fn(&str) -> Vec<i32> + Send + Sync> Tokenize for F {
    fn encode(&self, text: &str) -> Vec<i32> {
        self(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIMIC: &str = "                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___ year old woman with cough  // ___
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  ___
 
 FINDINGS: 
 
 The heart is mildly enlarged. No pleural effusion.
 
 IMPRESSION: 
 
 Mild cardiomegaly.
";

    #[test]
    fn standard_report() {
        let s = Sections::parse(MIMIC);
        assert_eq!(s.get(Section::Findings).unwrap(), "The heart is mildly enlarged. No pleural effusion.");
        assert_eq!(s.get(Section::Impression).unwrap(), "Mild cardiomegaly.");
        assert_eq!(s.get(Section::Technique).unwrap(), "Chest PA and lateral");
        let paper = select_text(MIMIC, SectionPolicy::Paper);
        assert_eq!(
            paper,
            "woman with cough // ___ The heart is mildly enlarged. No pleural effusion. Mild cardiomegaly."
        );
        assert_eq!(select_text(MIMIC, SectionPolicy::Impression), "Mild cardiomegaly.");
        assert_eq!(
            select_text(MIMIC, SectionPolicy::FindingsImpression),
            "The heart is mildly enlarged. No pleural effusion. Mild cardiomegaly."
        );
    }

    /// MIMIC reports without section headings: FINAL REPORT, a title line, then the text.
    const HEADLESS: &str = "                                 FINAL REPORT
 CHEST RADIOGRAPH PERFORMED ON ___
 
 Comparison is made to the prior study from ___.
 
 A ___-year-old man with cough. The heart size is normal. There is no
 focal consolidation or pleural effusion.
";
    const HEADLESS_ONE_PARAGRAPH: &str = "FINAL REPORT
CHEST (PORTABLE AP)
Patient is a 67 year old woman. Lungs are clear. No pneumothorax.
";

    #[test]
    fn report_without_headings_keeps_its_text() {
        let s = Sections::parse(HEADLESS);
        assert_eq!(
            s.get(Section::FinalReport).unwrap(),
            "Comparison is made to the prior study from ___. A ___-year-old man with cough. The heart size is \
             normal. There is no focal consolidation or pleural effusion."
        );
        assert_eq!(
            select_text(HEADLESS, SectionPolicy::Paper),
            "Comparison is made to the prior study from ___. A man with cough. The heart size is normal. There \
             is no focal consolidation or pleural effusion."
        );
        let last = "A ___-year-old man with cough. The heart size is normal. There is no focal consolidation or \
                    pleural effusion.";
        assert_eq!(select_text(HEADLESS, SectionPolicy::Impression), last);
        assert_eq!(select_text(HEADLESS, SectionPolicy::FindingsImpression), last);
        // One paragraph: the last paragraph is the whole report, less its heading and title.
        let text = "Patient is a woman. Lungs are clear. No pneumothorax.";
        assert_eq!(select_text(HEADLESS_ONE_PARAGRAPH, SectionPolicy::Paper), text);
        let kept = "Patient is a 67 year old woman. Lungs are clear. No pneumothorax.";
        assert_eq!(select_text(HEADLESS_ONE_PARAGRAPH, SectionPolicy::Impression), kept);
        assert_eq!(select_text(HEADLESS_ONE_PARAGRAPH, SectionPolicy::FindingsImpression), kept);
    }

    #[test]
    fn titles_go_but_capital_sentences_and_later_lines_stay() {
        // Several title lines; an upper-case sentence after them is text.
        let t = "FINAL REPORT\nPORTABLE AP CHEST\nCHEST RADIOGRAPH(S) ___\n\nNO ACUTE CHEST DISEASE.\n";
        assert_eq!(select_text(t, SectionPolicy::Paper), "NO ACUTE CHEST DISEASE.");
        // A title-like line after the text starts is not dropped.
        let t = "FINAL REPORT\nLungs are clear.\nCHEST TUBE IN PLACE\n";
        assert_eq!(select_text(t, SectionPolicy::Paper), "Lungs are clear. CHEST TUBE IN PLACE");
        // Sectioned reports keep their sections after the title.
        let t = "FINAL REPORT\nCHEST (PA AND LAT)\n\nFINDINGS: Small effusion.\nIMPRESSION: Effusion.\n";
        assert_eq!(select_text(t, SectionPolicy::Paper), "Small effusion. Effusion.");
        assert_eq!(select_text(t, SectionPolicy::Impression), "Effusion.");
        // Reports that open with a title and no FINAL REPORT.
        assert_eq!(select_text("CHEST RADIOGRAPH\nLungs are clear.", SectionPolicy::Paper), "Lungs are clear.");
        assert_eq!(select_text("FINAL REPORT\nCHEST RADIOGRAPH\n", SectionPolicy::Paper), "");
    }

    #[test]
    fn age_phrases() {
        for (t, want) in [
            ("___-year-old woman with cough.", "woman with cough."),
            ("A ___ year old man.", "A man."),
            ("A ___ year-old man.", "A man."),
            ("A 45-year old man.", "A man."),
            ("Patient, 82 yrs old, fell.", "Patient, fell."),
            ("Patient is ___ years old.", "Patient is."),
            ("___ yo F with pain", "F with pain"),
            ("___ y/o M, pain", "M, pain"),
            ("___ y.o. M, pain", "M, pain"),
            // Not ages: a year, a size, "old" on its own.
            ("Old fracture. 2 cm nodule.", "Old fracture. 2 cm nodule."),
            ("Stable since 2150 year end.", "Stable since 2150 year end."),
            ("___ year study.", "___ year study."),
        ] {
            assert_eq!(drop_age_phrases(t), want, "{t}");
        }
    }

    #[test]
    fn lower_case_missing_colons_and_own_lines() {
        let t = "Findings\nLungs are clear.\nimpression\nNo acute process.\n";
        let s = Sections::parse(t);
        assert_eq!(s.get(Section::Findings).unwrap(), "Lungs are clear.");
        assert_eq!(s.get(Section::Impression).unwrap(), "No acute process.");
        // Capitals without a colon, followed by text on the same line.
        let t = "FINDINGS Lungs are clear.\nIMPRESSION No acute process.";
        let s = Sections::parse(t);
        assert_eq!(s.get(Section::Impression).unwrap(), "No acute process.");
        assert_eq!(s.get(Section::Findings).unwrap(), "Lungs are clear.");
    }

    #[test]
    fn inline_headings_and_words_that_are_not_headings() {
        let t = "Findings were discussed with Dr. ___. The lungs are clear. Impression: normal chest. \
                 History of smoking is noted in the examination request.";
        let s = Sections::parse(t);
        // "Findings were" and "History of" are prose: only "Impression:" is a heading.
        assert!(s.get(Section::Findings).is_none());
        assert!(s.get(Section::History).is_none());
        assert!(s.get(Section::Impression).unwrap().starts_with("normal chest."));
        assert!(s.get(Section::Preamble).unwrap().starts_with("Findings were discussed"));
        // "EXAMINATION" inside "REEXAMINATION" is not a heading.
        let s = Sections::parse("REEXAMINATION: done. IMPRESSION: ok.");
        assert!(s.get(Section::Examination).is_none());
    }

    #[test]
    fn missing_sections_fall_back() {
        let t = "EXAMINATION: CHEST\n\nThe lungs are clear.\n\nNo acute cardiopulmonary process.\n";
        assert_eq!(select_text(t, SectionPolicy::Impression), "No acute cardiopulmonary process.");
        assert_eq!(select_text(t, SectionPolicy::FindingsImpression), "No acute cardiopulmonary process.");
        let t = "FINDINGS: Small left effusion.\n";
        assert_eq!(select_text(t, SectionPolicy::Impression), "Small left effusion.");
        assert_eq!(select_text("", SectionPolicy::Impression), "");
        assert_eq!(select_text("", SectionPolicy::Paper), "");
    }

    #[test]
    fn addenda_dates_and_deid() {
        let t = "FINDINGS: Clear.\nIMPRESSION: Normal.\nDATE: ___\nADDENDUM: Called Dr. ________ at ___.\n\
                 ADDENDUM: Second note.";
        let s = Sections::parse(t);
        assert_eq!(s.get(Section::Addendum).unwrap(), "Called Dr. ___ at ___. Second note.");
        let p = select_text(t, SectionPolicy::Paper);
        assert_eq!(p, "Clear. Normal. Called Dr. ___ at ___. Second note.");
    }

    #[test]
    fn sentence_shuffle_keeps_sentences() {
        use rand::SeedableRng;
        let t = "One. Two is 2.5 cm. Three? Four";
        assert_eq!(sentences(t), vec!["One.", "Two is 2.5 cm.", "Three?", "Four"]);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let s = shuffle_sentences(t, &mut rng);
        let mut a = sentences(&s);
        a.sort();
        let mut b = sentences(t);
        b.sort();
        assert_eq!(a, b);
    }
}
