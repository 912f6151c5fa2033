//! `train_state.safetensors`: what a run needs to continue exactly where it stopped: the
//! AdamW moments (by parameter name, so a reordered layout still loads), the step, the RNG
//! state and the data position.
//!
//! Only the trainable parameters' moments are written: a frozen parameter's stay zero for the
//! whole run (the optimiser starts at zero and never updates them), and writing them would make
//! an adapters run's state as large as a full one's (ViT-B/32: 1.2 GB instead of a few MB), or
//! a fine-tuning run's carry the unused text tower's (the demo's: 57 MB, 5 MB of it used).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use kernels::Backend;
use safetensors::tensor::{Dtype, TensorView};

use crate::checkpoint::{parse_safetensors, read_safetensors, write_file_atomically};
use crate::clip::Clip;
use crate::optim::AdamW;

/// The non-tensor part of a run's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunPosition {
    /// Optimiser updates done.
    pub step: u64,
    /// Serialised RNG state (opaque bytes owned by the caller).
    pub rng: Vec<u8>,
    pub data_epoch: u64,
    /// Global batches consumed within `data_epoch`.
    pub data_batch: u64,
}

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn save<B: Backend>(path: &Path, model: &Clip<B>, opt: &AdamW<B>, pos: &RunPosition) -> Result<()> {
    let be = &model.backend;
    let mut m = vec![0.0; model.layout.total];
    let mut v = vec![0.0; model.layout.total];
    be.download_f32(&opt.m, &mut m)?;
    be.download_f32(&opt.v, &mut v)?;
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (s, _) in model.layout.specs.iter().zip(model.trainable()).filter(|(_, &t)| t) {
        let r = s.offset..s.offset + s.len;
        owned.push((format!("m.{}", s.name), Dtype::F32, s.shape.clone(), le_f32(&m[r.clone()])));
        owned.push((format!("v.{}", s.name), Dtype::F32, s.shape.clone(), le_f32(&v[r])));
    }
    let ints = [pos.step, pos.data_epoch, pos.data_batch];
    owned.push(("position".into(), Dtype::I64, vec![3], ints.iter().flat_map(|x| (*x as i64).to_le_bytes()).collect()));
    owned.push(("rng".into(), Dtype::U8, vec![pos.rng.len()], pos.rng.clone()));
    let views = owned
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = HashMap::from([("format".to_string(), "cxrclip-train-state".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta))?;
    write_file_atomically(path, &bytes)
}

/// Restores the moments into `opt` (and its step) and returns the run position. Every
/// trainable parameter's moments must be in the file; a frozen one's are zero when absent.
pub fn load<B: Backend>(path: &Path, model: &Clip<B>, opt: &mut AdamW<B>) -> Result<RunPosition> {
    let bytes = read_safetensors(path)?;
    let st = parse_safetensors(&bytes, path)?;
    let mut m = vec![0.0; model.layout.total];
    let mut v = vec![0.0; model.layout.total];
    for (s, &trainable) in model.layout.specs.iter().zip(model.trainable()) {
        for (prefix, dst) in [("m", &mut m), ("v", &mut v)] {
            let name = format!("{prefix}.{}", s.name);
            let t = match st.tensor(&name) {
                Ok(t) => t,
                Err(_) if !trainable => continue,
                Err(_) => anyhow::bail!("{} has no tensor {name} (a trainable parameter's moments)", path.display()),
            };
            ensure!(t.dtype() == Dtype::F32, "tensor {name} in {} is {:?}, not F32", path.display(), t.dtype());
            ensure!(
                t.shape() == s.shape.as_slice(),
                "tensor {name} in {} has shape {:?}, expected {:?}",
                path.display(),
                t.shape(),
                s.shape
            );
            for (d, b) in dst[s.offset..s.offset + s.len].iter_mut().zip(t.data().chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
    let p = st.tensor("position").with_context(|| format!("{} has no tensor position", path.display()))?;
    ensure!(p.dtype() == Dtype::I64 && p.shape() == [3], "tensor position in {} is malformed", path.display());
    let ints: Vec<u64> =
        p.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as u64).collect();
    let rng = st.tensor("rng").with_context(|| format!("{} has no tensor rng", path.display()))?.data().to_vec();
    model.backend.upload_f32(&opt.m, &m)?;
    model.backend.upload_f32(&opt.v, &v)?;
    opt.step = ints[0];
    Ok(RunPosition { step: ints[0], rng, data_epoch: ints[1], data_batch: ints[2] })
}
