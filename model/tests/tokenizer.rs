//! The CLIP tokenizer against ids from open_clip's own tokenizer
//! (fixture written by scripts/make_tokenizer.py).

use model::tokenizer::{ClipTokenizer, CONTEXT_LEN, EOT, SOT, VOCAB};
use serde_json::Value;

struct Case {
    text: String,
    ids: Vec<i32>,
    /// Our ids where they differ from open_clip on purpose, and why.
    known: Option<(Vec<i32>, String)>,
}

fn ids_of(v: &Value) -> Vec<i32> {
    v.as_array().expect("ids array").iter().map(|x| x.as_i64().expect("integer id") as i32).collect()
}

fn cases() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer_cases.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("reading fixture")).unwrap();
    assert_eq!(json["context_length"].as_u64(), Some(CONTEXT_LEN as u64));
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: ids_of(&c["ids"]),
            known: c.get("known_difference").map(|why| (ids_of(&c["ours"]), why.as_str().unwrap().to_string())),
        })
        .collect()
}

#[test]
fn matches_open_clip() {
    let tok = ClipTokenizer::new().unwrap();
    let cases = cases();
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    let mut same = 0;
    for c in &cases {
        assert_eq!(c.ids.len(), CONTEXT_LEN, "{:?}", c.text);
        let got = tok.encode(&c.text);
        match &c.known {
            None if got == c.ids => same += 1,
            None => failures.push(format!("{:?}\n  open_clip {:?}\n  ours      {:?}", c.text, c.ids, got)),
            Some((ours, why)) => {
                assert_ne!(ours, &c.ids, "{:?} listed as a difference ({why}) but equal", c.text);
                if &got != ours {
                    failures
                        .push(format!("{:?} (known difference)\n  expected {:?}\n  got      {:?}", c.text, ours, got));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    assert!(same >= 40, "only {same} cases identical to open_clip");
}

#[test]
fn batch_equals_single() {
    let tok = ClipTokenizer::new().unwrap();
    let cases = cases();
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let batch = tok.encode_batch(&texts);
    assert_eq!(batch.len(), texts.len() * CONTEXT_LEN);
    for (row, text) in batch.chunks_exact(CONTEXT_LEN).zip(&texts) {
        assert_eq!(row, tok.encode(text).as_slice(), "{text:?}");
    }
    assert!(tok.encode_batch(&[]).is_empty());
}

#[test]
fn vocab_and_special_ids() {
    let tok = ClipTokenizer::new().unwrap();
    assert_eq!(tok.vocab_size(), VOCAB);
    assert_eq!(VOCAB, 49408);
    assert_eq!((SOT, EOT), (49406, 49407));
    assert_eq!((tok.sot(), tok.eot()), (SOT, EOT));
    assert_eq!(tok.token_to_id("<|startoftext|>"), Some(SOT));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(EOT));
    // The byte-level alphabet comes first: "!" is id 0, "!</w>" id 256.
    assert_eq!(tok.token_to_id("!"), Some(0));
    assert_eq!(tok.token_to_id("!</w>"), Some(256));
    // The post-processor in the JSON frames the same way encode does.
    let text = "Stable moderate cardiomegaly.";
    let enc = tok.inner().encode(text, true).unwrap();
    let framed: Vec<i32> = enc.get_ids().iter().map(|&i| i as i32).collect();
    let ids = tok.encode(text);
    assert_eq!(&ids[..framed.len()], framed.as_slice());
    assert_eq!(framed.last(), Some(&EOT));
}

#[test]
fn truncation_keeps_eot_last() {
    let tok = ClipTokenizer::new().unwrap();
    let long = "no acute cardiopulmonary process. ".repeat(40);
    let ids = tok.encode(&long);
    assert_eq!(ids.len(), CONTEXT_LEN);
    assert_eq!(ids[0], SOT);
    assert_eq!(ids[CONTEXT_LEN - 1], EOT);
    assert!(ids[1..CONTEXT_LEN - 1].iter().all(|&i| i != EOT && i != 0 && i != SOT));
    // Exactly 75 tokens fit without cutting: a text of 75 one-token words fills the row.
    let words = vec!["lung"; 75].join(" ");
    let ids = tok.encode(&words);
    assert_eq!(ids[CONTEXT_LEN - 1], EOT);
    assert_eq!(ids[CONTEXT_LEN - 2], ids[1]);
    let ids74 = tok.encode(&vec!["lung"; 74].join(" "));
    assert_eq!((ids74[CONTEXT_LEN - 2], ids74[CONTEXT_LEN - 1]), (EOT, 0));
}

#[test]
fn decode_round_trip() {
    let tok = ClipTokenizer::new().unwrap();
    let ids = tok.encode("No acute  Cardiopulmonary process; café ___.");
    assert_eq!(tok.decode(&ids).unwrap(), "no acute cardiopulmonary process ; café ___.");
    assert_eq!(tok.decode(&tok.encode("")).unwrap(), "");
}

#[test]
fn save_json_and_from_file() {
    let tok = ClipTokenizer::new().unwrap();
    let dir = std::env::temp_dir().join(format!("cxrclip-tokenizer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    tok.save_json(&path).unwrap();
    let back = ClipTokenizer::from_file(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(back.vocab_size(), VOCAB);
    for c in cases() {
        assert_eq!(back.encode(&c.text), tok.encode(&c.text), "{:?}", c.text);
    }
    assert!(ClipTokenizer::from_file(dir.join("missing.json")).is_err());
    assert!(ClipTokenizer::from_json_bytes(b"{}").is_err());
}
