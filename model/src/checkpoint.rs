//! Checkpoints as Hugging Face folders: `config.json`, `model.safetensors` (the `CLIPModel`
//! names and layouts), `tokenizer.json`, and our `train_state.safetensors`.
//!
//! Every folder is written under a temporary name and renamed into place, so a crash never
//! leaves half a checkpoint where a checkpoint is expected.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use kernels::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::clip::Clip;
use crate::config::ClipConfig;
use crate::params::{Init, Layout};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const TRAIN_STATE: &str = "train_state.safetensors";
pub const TOKENIZER: &str = "tokenizer.json";

/// Draws every parameter as `CLIPModel._init_weights` does (normal with the same standard
/// deviations, layer norms at one, biases at zero), from `seed`.
pub fn init_params(layout: &Layout, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut values = vec![0.0f32; layout.total];
    for spec in &layout.specs {
        let dst = &mut values[spec.offset..spec.offset + spec.len];
        match spec.init {
            Init::Zeros => dst.fill(0.0),
            Init::Ones => dst.fill(1.0),
            Init::Const(c) => dst.fill(c),
            Init::Normal(std) => {
                for x in dst {
                    *x = std * standard_normal(&mut rng);
                }
            }
        }
    }
    values
}

/// Box-Muller: one standard normal sample.
pub fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A floating-point tensor of any width as f32 values, with errors that name it and its file.
pub fn to_f32(view: &TensorView<'_>, name: &str, file: &Path) -> Result<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F64 => data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        Dtype::BF16 => {
            data.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect()
        }
        other => bail!("tensor {name} in {} has dtype {other:?}; expected F32, F64, F16 or BF16", file.display()),
    })
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: renormalise.
            let mut e = 127 - 15 + 1;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Reads a safetensors file whole, with errors that name the file.
pub fn read_safetensors(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

pub fn parse_safetensors<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{} is truncated or not a safetensors file ({e})", path.display()))
}

/// What loading weights found besides the expected tensors.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Tensors in the file the model does not use (e.g. `position_ids` buffers).
    pub unused: Vec<String>,
    /// Our extension tensors (adapters) absent from the file, left at their initial values.
    pub initialised: Vec<String>,
}

impl<B: Backend> Clip<B> {
    /// A model read from a Hugging Face folder (`config.json` + `model.safetensors`).
    pub fn from_pretrained(backend: B, dir: &Path, capacity: usize) -> Result<(Self, LoadReport)> {
        let config = ClipConfig::from_file(&dir.join(CONFIG))?;
        Self::from_pretrained_with(backend, dir, config, capacity)
    }

    /// As [`Clip::from_pretrained`] with a configuration changed by the caller (e.g. adapters
    /// added to a pretrained model: their tensors are absent and start from `init`).
    pub fn from_pretrained_with(
        backend: B,
        dir: &Path,
        config: ClipConfig,
        capacity: usize,
    ) -> Result<(Self, LoadReport)> {
        let model = Clip::new(backend, config, capacity)?;
        let report = model.load_weights(&dir.join(WEIGHTS))?;
        Ok((model, report))
    }

    /// As [`Clip::from_pretrained`], frozen: no parameter gradients, a backward to the pixels
    /// (see [`Clip::new_frozen`]).
    pub fn from_pretrained_frozen(backend: B, dir: &Path, capacity: usize) -> Result<(Self, LoadReport)> {
        let config = ClipConfig::from_file(&dir.join(CONFIG))?;
        let model = Clip::new_frozen(backend, config, capacity)?;
        let report = model.load_weights(&dir.join(WEIGHTS))?;
        Ok((model, report))
    }

    /// A model initialised from scratch with `seed`.
    pub fn random(backend: B, config: ClipConfig, capacity: usize, seed: u64) -> Result<Self> {
        let model = Clip::new(backend, config, capacity)?;
        model.params_from_host(&init_params(&model.layout, seed))?;
        Ok(model)
    }

    /// Loads `model.safetensors`-style weights, checking every name, shape and dtype.
    pub fn load_weights(&self, path: &Path) -> Result<LoadReport> {
        let bytes = read_safetensors(path)?;
        let st = parse_safetensors(&bytes, path)?;
        let mut values = init_params(&self.layout, 0);
        let mut report = LoadReport::default();
        for spec in &self.layout.specs {
            let view = match st.tensor(&spec.name) {
                Ok(v) => v,
                Err(_) if spec.extension => {
                    report.initialised.push(spec.name.clone());
                    continue;
                }
                Err(_) => bail!("{} has no tensor {}", path.display(), spec.name),
            };
            // A 0-d logit scale is sometimes stored as [1].
            let shape_ok = view.shape() == spec.shape.as_slice() || (spec.shape.is_empty() && view.shape() == [1]);
            ensure!(
                shape_ok,
                "tensor {} in {} has shape {:?}; the config needs {:?}",
                spec.name,
                path.display(),
                view.shape(),
                spec.shape
            );
            let data = to_f32(&view, &spec.name, path)?;
            values[spec.offset..spec.offset + spec.len].copy_from_slice(&data);
        }
        for name in st.names() {
            if self.layout.get(name).is_none() {
                report.unused.push(name.to_string());
            }
        }
        report.unused.sort();
        self.params_from_host(&values)?;
        Ok(report)
    }

    /// Writes a Hugging Face folder that `CLIPModel.from_pretrained` loads, atomically;
    /// `extra` files (e.g. `tokenizer.json`) are written alongside.
    pub fn save_pretrained(&self, dir: &Path, extra: &[(&str, &[u8])]) -> Result<()> {
        self.save_pretrained_with(dir, extra, &[])
    }

    /// [`Clip::save_pretrained`] with `tensors` added to `model.safetensors` (a fine-tuning
    /// head: `transformers` reports them as unused and loads the rest).
    pub fn save_pretrained_with(
        &self,
        dir: &Path,
        extra: &[(&str, &[u8])],
        tensors: &[(String, Vec<usize>, Vec<f32>)],
    ) -> Result<()> {
        let values = self.params_to_host()?;
        write_dir_atomically(dir, |tmp| {
            fs::write(tmp.join(CONFIG), self.config.to_json())?;
            let tensors: Vec<(String, Vec<usize>, &[f32])> = self
                .layout
                .specs
                .iter()
                .map(|s| (s.name.clone(), s.shape.clone(), &values[s.offset..s.offset + s.len]))
                .chain(tensors.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())))
                .collect();
            write_f32_safetensors(&tmp.join(WEIGHTS), &tensors)?;
            for (name, bytes) in extra {
                fs::write(tmp.join(name), bytes)?;
            }
            Ok(())
        })
    }
}

/// Writes named f32 tensors as a safetensors file (with `format: pt` metadata, which
/// `transformers` requires).
pub fn write_f32_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let out = safetensors::serialize(views, Some(meta))?;
    write_file_atomically(path, &out)
}

/// One tensor of a mixed-type safetensors file ([`write_tables`]).
pub enum Column<'a> {
    F32(Vec<usize>, &'a [f32]),
    I64(Vec<usize>, &'a [i64]),
}

/// Writes named f32 and i64 tensors with string metadata as a safetensors file, atomically
/// (feature tables, prediction parts).
pub fn write_tables(path: &Path, tensors: &[(String, Column)], meta: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, c)| match c {
            Column::F32(s, v) => (n.clone(), Dtype::F32, s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Column::I64(s, v) => (n.clone(), Dtype::I64, s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let out = safetensors::serialize(views, Some(meta))?;
    write_file_atomically(path, &out)
}

/// An i64 tensor's values, with errors that name it and its file.
pub fn to_i64(view: &TensorView<'_>, name: &str, file: &Path) -> Result<Vec<i64>> {
    ensure!(
        view.dtype() == Dtype::I64,
        "tensor {name} in {} has dtype {:?}; expected I64",
        file.display(),
        view.dtype()
    );
    Ok(view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, "tmp");
    {
        let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Fills a fresh temporary folder with `fill`, then puts it at `dir` (replacing an older
/// folder there only once the new one is complete).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint {}", dir.display())));
    }
    for entry in fs::read_dir(&tmp)? {
        fs::File::open(entry?.path())?.sync_all()?;
    }
    if dir.exists() {
        let old = sibling(dir, "old");
        fs::rename(dir, &old).with_context(|| format!("moving the old {} aside", dir.display()))?;
        fs::rename(&tmp, dir)?;
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    }
    Ok(())
}
