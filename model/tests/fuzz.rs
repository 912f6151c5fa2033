//! Property tests ("fuzzing" on stable Rust) of what a checkpoint folder hands the model: its
//! `config.json` (valid configs with keys replaced by extreme or ill-typed values, and raw
//! bytes), its `model.safetensors` and `train_state.safetensors` (a real file's bytes flipped,
//! truncated, spliced, or with a forged header length). Whatever the input, reading returns a
//! value or an error, never panics, and never allocates without bound; a config that is
//! accepted is small enough to build.
//!
//! CI runs a modest number of cases; a long run sets `PROPTEST_CASES`, e.g.
//! `PROPTEST_CASES=20000 cargo test --release -p model --test fuzz`.

use std::path::Path;

use kernels::Cpu;
use model::checkpoint::{parse_safetensors, to_f32};
use model::optim::{AdamW, AdamWConfig};
use model::params::Layout;
use model::train_state::{self, RunPosition};
use model::{Clip, ClipConfig};
use proptest::prelude::*;
use serde_json::Value;

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// A small model, as a checkpoint would hold it.
fn small() -> ClipConfig {
    ClipConfig::small(16, 8, 8, 1, 2)
}

/// The keys a `config.json` has, as paths into the object.
const KEYS: [&[&str]; 22] = [
    &["projection_dim"],
    &["logit_scale_init_value"],
    &["adapter_dim"],
    &["text_config"],
    &["vision_config"],
    &["text_config", "vocab_size"],
    &["text_config", "hidden_size"],
    &["text_config", "intermediate_size"],
    &["text_config", "num_hidden_layers"],
    &["text_config", "num_attention_heads"],
    &["text_config", "max_position_embeddings"],
    &["text_config", "hidden_act"],
    &["text_config", "layer_norm_eps"],
    &["text_config", "eos_token_id"],
    &["vision_config", "hidden_size"],
    &["vision_config", "intermediate_size"],
    &["vision_config", "num_hidden_layers"],
    &["vision_config", "num_attention_heads"],
    &["vision_config", "num_channels"],
    &["vision_config", "image_size"],
    &["vision_config", "patch_size"],
    &["vision_config", "layer_norm_eps"],
];

/// Values a careless or hostile file puts under a key.
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(2),
            Just(3),
            Just(7),
            Just(64),
            Just(1 << 20),
            Just(1 << 32),
            Just(1 << 40)
        ]
        .prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        Just(Value::from(i64::MIN)),
        Just(Value::from(-1)),
        any::<u64>().prop_map(Value::from),
        (0u64..100_000_000).prop_map(Value::from),
        prop_oneof![Just(0.0f64), Just(-0.0), Just(1e-300), Just(1e300), Just(0.5), Just(-1e-5), Just(1e12)]
            .prop_map(Value::from),
        Just(Value::Null),
        Just(Value::Bool(true)),
        Just(Value::from("quick_gelu")),
        Just(Value::from("gelu")),
        "[a-z_]{0,12}".prop_map(Value::from),
        Just(serde_json::json!([1, 2])),
        Just(serde_json::json!({})),
        Just(serde_json::json!({"hidden_size": 0})),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, Value),
    Remove(usize),
    /// `text_config` or `vision_config` moved to the older `*_config_dict` key.
    Legacy(bool),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => (0..KEYS.len(), value()).prop_map(|(k, v)| Edit::Set(k, v)),
        1 => (0..KEYS.len()).prop_map(Edit::Remove),
        1 => any::<bool>().prop_map(Edit::Legacy),
    ]
}

/// The object that holds the last key of `path`, if the document still has one there.
fn parent<'a>(doc: &'a mut Value, path: &[&str]) -> Option<&'a mut serde_json::Map<String, Value>> {
    let mut cur = doc;
    for k in &path[..path.len() - 1] {
        cur = cur.get_mut(*k)?;
    }
    cur.as_object_mut()
}

fn apply(doc: &mut Value, e: &Edit) {
    match e {
        Edit::Set(k, v) => {
            if let Some(m) = parent(doc, KEYS[*k]) {
                m.insert(KEYS[*k].last().unwrap().to_string(), v.clone());
            }
        }
        Edit::Remove(k) => {
            if let Some(m) = parent(doc, KEYS[*k]) {
                m.remove(*KEYS[*k].last().unwrap());
            }
        }
        Edit::Legacy(text) => {
            let tower = if *text { "text" } else { "vision" };
            if let Some(m) = doc.as_object_mut() {
                if let Some(v) = m.remove(&format!("{tower}_config")) {
                    m.insert(format!("{tower}_config_dict"), v);
                }
            }
        }
    }
}

/// What the code after `from_file` does with an accepted config before allocating weights.
fn use_accepted(c: &ClipConfig) {
    let n = c.parameter_count();
    assert!(n.is_finite() && n > 0.0, "an accepted config counts {n} parameters");
    assert!(c.vision_config.num_hidden_layers <= 1024 && c.text_config.num_hidden_layers <= 1024);
    let _ = c.check_limits(&kernels::limits::CPU);
    // The layout is built for every model: names and shapes per tensor, so it must stay small.
    if n < 5e7 {
        let layout = Layout::new(c);
        assert_eq!(layout.total as f64, n, "the count from sizes and the layout's agree");
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Byte edits of a real file.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    /// The 8-byte header length replaced.
    HeaderLen(u64),
    /// Bytes spliced into the header.
    Splice(usize, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
        2 => any::<usize>().prop_map(Damage::Truncate),
        1 => prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(1 << 40), 0u64..4096].prop_map(Damage::HeaderLen),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..24)).prop_map(|(i, b)| Damage::Splice(i, b)),
    ]
}

fn damaged(mut bytes: Vec<u8>, edits: &[Damage]) -> Vec<u8> {
    for d in edits {
        let n = bytes.len().max(1);
        match d {
            Damage::Flip(i, x) => {
                if !bytes.is_empty() {
                    // Mostly the header (names, dtypes, shapes, offsets), where parsing happens.
                    let at = if i % 4 == 0 { i % n } else { i % n.min(400) };
                    bytes[at] ^= x;
                }
            }
            Damage::Truncate(i) => bytes.truncate(i % n),
            Damage::HeaderLen(v) => {
                if bytes.len() >= 8 {
                    bytes[..8].copy_from_slice(&v.to_le_bytes());
                }
            }
            Damage::Splice(i, b) => {
                let at = 8 + i % n.min(400).saturating_sub(8).max(1);
                let at = at.min(bytes.len());
                bytes.splice(at..at, b.iter().copied());
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn config_edits_are_read_or_refused(edits in prop::collection::vec(edit(), 1..5)) {
        let dir = tempfile::tempdir().unwrap();
        let mut doc: Value = serde_json::from_str(&small().to_json()).unwrap();
        for e in &edits {
            apply(&mut doc, e);
        }
        let path = write(dir.path(), "config.json", doc.to_string().as_bytes());
        if let Ok(c) = ClipConfig::from_file(&path) {
            use_accepted(&c);
        }
    }

    #[test]
    fn config_bytes_are_read_or_refused(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "config.json", &bytes);
        if let Ok(c) = ClipConfig::from_file(&path) {
            use_accepted(&c);
        }
    }

    #[test]
    fn damaged_weights_load_or_fail(edits in prop::collection::vec(damage(), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        let clip = Clip::random(Cpu, small(), 1, 3).unwrap();
        clip.save_pretrained(dir.path(), &[]).unwrap();
        let file = dir.path().join("model.safetensors");
        let bytes = damaged(std::fs::read(&file).unwrap(), &edits);
        std::fs::write(&file, &bytes).unwrap();
        // The parser alone, every tensor converted, then the model's own loader.
        if let Ok(st) = parse_safetensors(&bytes, &file) {
            for (name, view) in st.tensors() {
                let _ = to_f32(&view, &name, &file);
            }
        }
        let _ = clip.load_weights(&file);
    }

    #[test]
    fn damaged_train_state_loads_or_fails(edits in prop::collection::vec(damage(), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        let clip = Clip::random(Cpu, small(), 1, 3).unwrap();
        let opt = AdamW::new(&clip, AdamWConfig::default()).unwrap();
        let file = dir.path().join("train_state.safetensors");
        let pos = RunPosition { step: 5, rng: vec![1, 2, 3], data_epoch: 1, data_batch: 2 };
        train_state::save(&file, &clip, &opt, &pos).unwrap();
        let bytes = damaged(std::fs::read(&file).unwrap(), &edits);
        std::fs::write(&file, &bytes).unwrap();
        let mut again = AdamW::new(&clip, AdamWConfig::default()).unwrap();
        let _ = train_state::load(&file, &clip, &mut again);
    }
}
