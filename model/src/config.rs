//! The model configuration in the Hugging Face `CLIPConfig` shape (`config.json`).
//!
//! Keys we do not model are kept (`extra`) and written back, so a configuration read from a
//! Hugging Face folder round-trips. Missing keys take `transformers`' defaults.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use kernels::{Activation, Limits};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_init_range() -> f64 {
    0.02
}
fn default_init_factor() -> f64 {
    1.0
}

/// The most layers a tower may have.
pub const MAX_LAYERS: usize = 1024;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TextConfig {
    #[serde(default = "TextConfig::default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "TextConfig::default_hidden")]
    pub hidden_size: usize,
    #[serde(default = "TextConfig::default_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "TextConfig::default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "TextConfig::default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "TextConfig::default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "TextConfig::default_bos")]
    pub bos_token_id: i64,
    #[serde(default = "TextConfig::default_eos")]
    pub eos_token_id: i64,
    #[serde(default = "TextConfig::default_pad")]
    pub pad_token_id: i64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "default_init_factor")]
    pub initializer_factor: f64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl TextConfig {
    fn default_vocab() -> usize {
        49408
    }
    fn default_hidden() -> usize {
        512
    }
    fn default_intermediate() -> usize {
        2048
    }
    fn default_layers() -> usize {
        12
    }
    fn default_heads() -> usize {
        8
    }
    fn default_positions() -> usize {
        77
    }
    fn default_bos() -> i64 {
        49406
    }
    fn default_eos() -> i64 {
        49407
    }
    fn default_pad() -> i64 {
        1
    }
}

impl Default for TextConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Map::new())).expect("defaults")
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VisionConfig {
    #[serde(default = "VisionConfig::default_hidden")]
    pub hidden_size: usize,
    #[serde(default = "VisionConfig::default_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "VisionConfig::default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "VisionConfig::default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "VisionConfig::default_channels")]
    pub num_channels: usize,
    #[serde(default = "VisionConfig::default_image")]
    pub image_size: usize,
    #[serde(default = "VisionConfig::default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "default_init_factor")]
    pub initializer_factor: f64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl VisionConfig {
    fn default_hidden() -> usize {
        768
    }
    fn default_intermediate() -> usize {
        3072
    }
    fn default_layers() -> usize {
        12
    }
    fn default_heads() -> usize {
        12
    }
    fn default_channels() -> usize {
        3
    }
    fn default_image() -> usize {
        224
    }
    fn default_patch() -> usize {
        32
    }
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
    /// Tokens per image: the patches and the class token.
    pub fn seq_len(&self) -> usize {
        self.num_patches() + 1
    }
}

impl Default for VisionConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Map::new())).expect("defaults")
    }
}

fn default_projection() -> usize {
    512
}
fn default_logit_scale() -> f64 {
    2.6592
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default = "default_projection")]
    pub projection_dim: usize,
    #[serde(default = "default_logit_scale")]
    pub logit_scale_init_value: f64,
    /// Width of the bottleneck adapters after every block of both towers (cxrclip's
    /// extension; `transformers` ignores the key and the adapter tensors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_dim: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Parses a `hidden_act` string.
pub fn activation(name: &str) -> Result<Activation> {
    match name {
        "quick_gelu" => Ok(Activation::QuickGelu),
        "gelu" => Ok(Activation::Gelu),
        other => bail!("hidden_act {other:?} is not supported (quick_gelu or gelu)"),
    }
}

impl ClipConfig {
    /// A small configuration for tests and benches: the same width, depth and heads in both
    /// towers, context 77, the real vocabulary.
    pub fn small(image: usize, patch: usize, width: usize, layers: usize, heads: usize) -> Self {
        let mut c: ClipConfig = serde_json::from_value(Value::Object(Map::new())).expect("defaults");
        c.projection_dim = width;
        let v = &mut c.vision_config;
        v.image_size = image;
        v.patch_size = patch;
        v.hidden_size = width;
        v.intermediate_size = 4 * width;
        v.num_hidden_layers = layers;
        v.num_attention_heads = heads;
        let t = &mut c.text_config;
        t.hidden_size = width;
        t.intermediate_size = 4 * width;
        t.num_hidden_layers = layers;
        t.num_attention_heads = heads;
        c
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut raw: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        // Configurations written by older transformers keep the tower settings under
        // `*_config_dict`; newer ones under `*_config`. Prefer the latter, fall back.
        if let Value::Object(map) = &mut raw {
            for tower in ["text", "vision"] {
                let key = format!("{tower}_config");
                let legacy = format!("{tower}_config_dict");
                if !map.contains_key(&key) {
                    if let Some(v) = map.get(&legacy).cloned() {
                        map.insert(key, v);
                    }
                }
            }
        }
        let config: ClipConfig =
            serde_json::from_value(raw).with_context(|| format!("{} is not a CLIPConfig", path.display()))?;
        config.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(config)
    }

    pub fn to_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("config serialises");
        if let Value::Object(m) = &mut v {
            m.entry("model_type").or_insert(Value::String("clip".into()));
            m.entry("architectures").or_insert(serde_json::json!(["CLIPModel"]));
        }
        serde_json::to_string_pretty(&v).expect("config serialises")
    }

    pub fn validate(&self) -> Result<()> {
        let v = &self.vision_config;
        let t = &self.text_config;
        ensure!(v.num_channels == 3, "vision_config.num_channels is {}, only 3 is supported", v.num_channels);
        ensure!(
            v.patch_size > 0 && v.image_size.is_multiple_of(v.patch_size),
            "vision_config.image_size {} is not a multiple of patch_size {}",
            v.image_size,
            v.patch_size
        );
        for (tower, hidden, heads) in
            [("vision", v.hidden_size, v.num_attention_heads), ("text", t.hidden_size, t.num_attention_heads)]
        {
            ensure!(
                heads > 0 && hidden % heads == 0,
                "{tower}_config.hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            );
        }
        activation(&v.hidden_act).context("vision_config")?;
        activation(&t.hidden_act).context("text_config")?;
        ensure!(
            t.eos_token_id >= 0 && (t.eos_token_id as usize) < t.vocab_size,
            "text_config.eos_token_id outside the vocabulary"
        );
        for (key, value) in [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.image_size", v.image_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.max_position_embeddings", t.max_position_embeddings),
            ("projection_dim", self.projection_dim),
        ] {
            ensure!(value > 0, "{key} is 0; it must be positive");
        }
        if let Some(a) = self.adapter_dim {
            ensure!(a > 0, "adapter_dim is 0; it must be positive (or absent)");
        }
        // Every layer costs names, shapes and buffers besides its weights: a million layers of
        // width 8 fit the weight budget but not the bookkeeping.
        for (key, layers) in [("vision_config", v.num_hidden_layers), ("text_config", t.num_hidden_layers)] {
            ensure!(
                layers <= MAX_LAYERS,
                "{key}.num_hidden_layers is {layers}; at most {MAX_LAYERS} are supported (the largest CLIP has 48)"
            );
        }
        // A layer norm divides by sqrt(var + eps): eps <= 0 turns a constant row into NaN.
        for (key, eps) in [("vision_config", v.layer_norm_eps), ("text_config", t.layer_norm_eps)] {
            ensure!(eps.is_finite() && eps > 0.0, "{key}.layer_norm_eps is {eps}; it must be positive");
        }
        self.check_size(machine_memory_bytes())
    }

    /// The parameters this config makes, counted from its sizes alone (no layout built, no
    /// overflow: in f64), the figure [`crate::memory::parameters`] gives exactly.
    pub fn parameter_count(&self) -> f64 {
        let v = &self.vision_config;
        let t = &self.text_config;
        let a = self.adapter_dim.map_or(0.0, |a| a as f64);
        let block = |c: f64, i: f64| {
            // 2 layer norms, q k v out (weights and biases), fc1 fc2, the adapter's two linears.
            4.0 * c + 4.0 * c * c + 4.0 * c + 2.0 * c * i + i + c + if a > 0.0 { 2.0 * a * c + a + c } else { 0.0 }
        };
        let (cv, ct) = (v.hidden_size as f64, t.hidden_size as f64);
        let (img, patch) = (v.image_size as f64, v.patch_size.max(1) as f64);
        let seq = (img / patch).floor().powi(2) + 1.0;
        let vision = cv
            + cv * 3.0 * patch * patch
            + seq * cv
            + 2.0 * cv
            + v.num_hidden_layers as f64 * block(cv, v.intermediate_size as f64)
            + 2.0 * cv;
        let text = (t.vocab_size as f64 + t.max_position_embeddings as f64) * ct
            + t.num_hidden_layers as f64 * block(ct, t.intermediate_size as f64)
            + 2.0 * ct;
        vision + text + self.projection_dim as f64 * (cv + ct) + 1.0
    }

    /// Refuses a model whose f32 weights alone exceed `memory` bytes (the machine's, when
    /// known), or the address space: one line with the figure, before anything is allocated.
    pub fn check_size(&self, memory: Option<u64>) -> Result<()> {
        let params = self.parameter_count();
        let bytes = params * 4.0;
        ensure!(
            bytes < (isize::MAX as f64) / 8.0,
            "the config makes a model of {params:.3e} parameters ({}): more than any machine can hold",
            human_bytes(bytes)
        );
        if let Some(m) = memory {
            ensure!(
                bytes <= m as f64,
                "the config makes a model of {params:.3e} parameters, whose weights alone take {}: more than this machine's {} of memory",
                human_bytes(bytes),
                human_bytes(m as f64)
            );
        }
        Ok(())
    }

    /// Whether a backend with `limits` can run this model: every tower's attention head
    /// dimension and the InfoNCE feature width (the projection dimension). One line naming the
    /// limit otherwise.
    pub fn check_limits(&self, limits: &Limits) -> Result<()> {
        let v = &self.vision_config;
        let t = &self.text_config;
        for (tower, hidden, heads) in
            [("vision", v.hidden_size, v.num_attention_heads), ("text", t.hidden_size, t.num_attention_heads)]
        {
            if let Some(head_dim) = hidden.checked_div(heads) {
                limits.check_head_dim(tower, head_dim).map_err(anyhow::Error::msg)?;
            }
        }
        limits.check_infonce_dim(self.projection_dim).map_err(anyhow::Error::msg)
    }
}

/// The machine's memory (`MemTotal` of /proc/meminfo), where the OS says.
pub fn machine_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 =
        text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

fn human_bytes(b: f64) -> String {
    let gib = b / (1u64 << 30) as f64;
    if gib >= 1024.0 {
        format!("{:.3e} GiB", gib)
    } else {
        format!("{gib:.1} GiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_name_what_a_backend_cannot_run() {
        let c = ClipConfig::small(64, 8, 128, 1, 2);
        assert!(c.check_limits(&kernels::limits::CPU).is_ok());
        assert!(c.check_limits(&kernels::limits::CUDA).is_ok(), "head dimension 64, width 128");
        let mut odd = c.clone();
        odd.text_config.hidden_size = 80;
        odd.text_config.num_attention_heads = 2;
        let e = odd.check_limits(&kernels::limits::CUDA).unwrap_err().to_string();
        assert!(e.contains("text tower has 40"), "{e}");
        let mut wide = c.clone();
        wide.projection_dim = 0;
        let e = wide.check_limits(&kernels::limits::CUDA).unwrap_err().to_string();
        assert!(e.contains("projection_dim"), "{e}");
    }

    #[test]
    fn defaults_match_transformers() {
        let c: ClipConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.text_config.vocab_size, 49408);
        assert_eq!(c.text_config.eos_token_id, 49407);
        assert_eq!(c.vision_config.patch_size, 32);
        assert_eq!(c.vision_config.seq_len(), 50);
        assert_eq!(c.projection_dim, 512);
    }

    #[test]
    fn unknown_keys_round_trip() {
        let c: ClipConfig =
            serde_json::from_str(r#"{"torch_dtype":"float32","text_config":{"dropout":0.0,"hidden_size":64}}"#)
                .unwrap();
        let back: Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(back["torch_dtype"], "float32");
        assert_eq!(back["text_config"]["dropout"], 0.0);
        assert_eq!(back["text_config"]["hidden_size"], 64);
    }

    /// The count from the sizes alone is the layout's, with and without adapters.
    #[test]
    fn the_parameter_count_is_the_layouts() {
        for (img, patch, width, layers, heads) in [(32, 8, 64, 2, 2), (64, 16, 96, 3, 4), (30, 7, 32, 1, 1)] {
            let mut c = ClipConfig::small(img, patch, width, layers, heads);
            c.text_config.intermediate_size = 3 * width + 5;
            c.projection_dim = width / 2 + 3;
            assert_eq!(c.parameter_count(), crate::memory::parameters(&c) as f64, "{img} {patch} {width}");
            c.adapter_dim = Some(7);
            assert_eq!(c.parameter_count(), crate::memory::parameters(&c) as f64, "adapters");
        }
    }

    /// Absurd sizes in a config.json are one line with the model's size, before any layout or
    /// weight is allocated; a bad layer-norm eps or a zero width are refused too.
    #[test]
    fn absurd_sizes_and_values_are_refused_in_one_line() {
        let dir = std::env::temp_dir().join(format!("cxrclip-config-sizes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base: Value = serde_json::from_str(&ClipConfig::small(32, 8, 64, 2, 2).to_json()).unwrap();
        let cases: [(&str, &str, Value, &str); 8] = [
            ("vision_config", "num_hidden_layers", Value::from(1_000_000_000u64), "num_hidden_layers"),
            // Within the weight budget (width 64: ~5 GB), not within the per-layer bookkeeping.
            ("text_config", "num_hidden_layers", Value::from(100_000u64), "at most 1024"),
            // Found by `tests/fuzz.rs`: vocabulary + positions overflowed (a panic in debug
            // builds, a wrapped, too small count in release).
            ("text_config", "vocab_size", Value::from(u64::MAX), "parameters"),
            ("text_config", "intermediate_size", Value::from(1_000_000_000_000u64), "parameters"),
            ("text_config", "vocab_size", Value::from(1u64 << 40), "parameters"),
            ("vision_config", "layer_norm_eps", Value::from(0.0), "layer_norm_eps"),
            ("text_config", "layer_norm_eps", Value::from(-1e-5), "layer_norm_eps"),
            ("vision_config", "hidden_size", Value::from(0), "hidden_size"),
        ];
        for (tower, key, value, want) in cases {
            let mut raw = base.clone();
            raw[tower][key] = value.clone();
            let path = dir.join("config.json");
            std::fs::write(&path, raw.to_string()).unwrap();
            let e = format!("{:#}", ClipConfig::from_file(&path).expect_err("accepted"));
            assert!(e.contains(want), "{tower}.{key} = {value}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        // Within the address space but past the memory given: the figure and the memory.
        let mut big = ClipConfig::small(32, 8, 64, 2, 2);
        big.text_config.vocab_size = 100_000_000;
        let e = big.check_size(Some(1 << 30)).unwrap_err().to_string();
        assert!(e.contains("6.4") && e.contains("1.0 GiB of memory"), "{e}");
        assert!(big.check_size(Some(1 << 40)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_bad_shapes() {
        let mut c = ClipConfig::small(64, 7, 32, 1, 4);
        assert!(c.validate().unwrap_err().to_string().contains("patch_size"));
        c = ClipConfig::small(64, 8, 30, 1, 4);
        assert!(c.validate().unwrap_err().to_string().contains("num_attention_heads"));
    }
}
