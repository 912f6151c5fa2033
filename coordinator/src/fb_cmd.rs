//! `coordinator forward-backward`: one forward, CLIP loss and backward of a Hugging Face
//! checkpoint on given inputs, with every output and gradient written to safetensors.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use kernels::{Backend, Cpu};
use model::checkpoint::{parse_safetensors, read_safetensors, to_f32, write_f32_safetensors};
use model::collectives::Single;
use model::loss::logits_per_image;
use model::step::{self, InfoNceLoss, LocalBatch};
use model::Clip;
use safetensors::tensor::Dtype;

use worker::Device;

#[derive(Args)]
pub struct ForwardBackwardArgs {
    /// A Hugging Face CLIP folder (config.json + model.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// safetensors with `pixel_values` f32 [B,3,H,W] (normalised) and `input_ids` i64 [B,77].
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write `loss`, `logits_per_image`, `image_embeds`, `text_embeds`, `grad.<name>`.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

/// The two inputs, checked and converted.
struct Inputs {
    batch: usize,
    image: usize,
    pixels: Vec<f32>,
    /// Row-major `[batch, len]`.
    ids: Vec<i64>,
    len: usize,
}

fn read_inputs(path: &Path) -> Result<Inputs> {
    let bytes = read_safetensors(path)?;
    let st = parse_safetensors(&bytes, path)?;
    let pv = st.tensor("pixel_values").map_err(|_| anyhow::anyhow!("{} has no tensor pixel_values", path.display()))?;
    let shape = pv.shape().to_vec();
    ensure!(
        shape.len() == 4 && shape[1] == 3 && shape[2] == shape[3],
        "pixel_values in {} has shape {shape:?}; expected [B, 3, H, H]",
        path.display()
    );
    let pixels = to_f32(&pv, "pixel_values", path)?;
    let ii = st.tensor("input_ids").map_err(|_| anyhow::anyhow!("{} has no tensor input_ids", path.display()))?;
    let ishape = ii.shape().to_vec();
    ensure!(ishape.len() == 2, "input_ids in {} has shape {ishape:?}; expected [B, 77]", path.display());
    ensure!(
        ishape[0] == shape[0],
        "input_ids in {} holds {} texts but pixel_values {} images",
        path.display(),
        ishape[0],
        shape[0]
    );
    let ids: Vec<i64> = match ii.dtype() {
        Dtype::I64 => ii.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
        Dtype::I32 => ii.data().chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64).collect(),
        d => bail!("input_ids in {} is {d:?}; expected I64", path.display()),
    };
    ensure!(shape[0] > 0, "{} holds an empty batch", path.display());
    Ok(Inputs { batch: shape[0], image: shape[2], pixels, ids, len: ishape[1] })
}

pub fn run(args: ForwardBackwardArgs) -> Result<()> {
    refuse_an_input_as_output(&args)?;
    match args.device {
        Device::Cpu => run_on(Cpu, &args),
        Device::Cuda => run_on(kernels::Cuda::new(0)?, &args),
    }
}

/// `--out` must not be one of the inputs (the inputs file, the checkpoint folder or a file in
/// it), whatever path reaches it: writing it would destroy what it is computed from.
fn refuse_an_input_as_output(args: &ForwardBackwardArgs) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // Nothing there yet: it cannot be an input.
    let Ok(out) = std::fs::metadata(&args.out) else { return Ok(()) };
    let is_out = |p: &Path| std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == (out.dev(), out.ino()));
    let mut inputs = vec![args.inputs.clone(), args.checkpoint.clone()];
    inputs.extend(std::fs::read_dir(&args.checkpoint).into_iter().flatten().flatten().map(|e| e.path()));
    if let Some(p) = inputs.iter().find(|p| is_out(p)) {
        bail!("--out {} is one of the inputs ({}); write the results elsewhere", args.out.display(), p.display());
    }
    Ok(())
}

fn run_on<B: Backend>(backend: B, args: &ForwardBackwardArgs) -> Result<()> {
    let inp = read_inputs(&args.inputs)?;
    let config = model::ClipConfig::from_file(&args.checkpoint.join(model::checkpoint::CONFIG))?;
    let (s, ctx, vocab) = (
        config.vision_config.image_size,
        config.text_config.max_position_embeddings,
        config.text_config.vocab_size as i64,
    );
    ensure!(
        inp.image == s,
        "pixel_values in {} are {}x{} but the checkpoint's image_size is {s}",
        args.inputs.display(),
        inp.image,
        inp.image
    );
    ensure!(
        inp.len <= ctx,
        "input_ids in {} has {} tokens per text; the checkpoint allows {ctx}",
        args.inputs.display(),
        inp.len
    );
    if let Some((i, id)) = inp.ids.iter().enumerate().find(|(_, &id)| id < 0 || id >= vocab) {
        bail!(
            "input_ids in {}: id {id} (text {}, position {}) is outside the vocabulary of {vocab}",
            args.inputs.display(),
            i / inp.len,
            i % inp.len
        );
    }
    // Shorter texts are padded to the context: with the causal mask, tokens after the
    // pooled end-of-text token change nothing.
    let b = inp.batch;
    let mut ids = vec![0i32; b * ctx];
    for r in 0..b {
        for k in 0..inp.len {
            ids[r * ctx + k] = inp.ids[r * inp.len + k] as i32;
        }
    }
    let (clip, _report) = Clip::from_pretrained_with(backend, &args.checkpoint, config, b)
        .with_context(|| format!("loading {}", args.checkpoint.display()))?;
    // The training step every caller runs, in a world of one.
    let mut loss_fn = InfoNceLoss::new(&clip, 1)?;
    let loss =
        step::forward_backward(&clip, &mut loss_fn, &mut Single, &LocalBatch { pixels: &inp.pixels, ids: &ids, b })?;

    let be = &clip.backend;
    let p = clip.config.projection_dim;
    let mut img = vec![0.0; b * p];
    let mut txt = vec![0.0; b * p];
    be.download_f32(&clip.image_embeds(b), &mut img)?;
    be.download_f32(&clip.text_embeds(b), &mut txt)?;
    let mut scale = [0.0f32];
    be.download_f32(&clip.logit_scale().value, &mut scale)?;
    let logits = logits_per_image(&img, &txt, b, p, scale[0]);
    let grads = clip.grads_to_host()?;
    let loss_v = [loss];
    let mut out: Vec<(String, Vec<usize>, &[f32])> = vec![
        ("loss".into(), vec![], &loss_v[..]),
        ("logits_per_image".into(), vec![b, b], &logits),
        ("image_embeds".into(), vec![b, p], &img),
        ("text_embeds".into(), vec![b, p], &txt),
    ];
    for spec in &clip.layout.specs {
        out.push((format!("grad.{}", spec.name), spec.shape.clone(), &grads[spec.offset..spec.offset + spec.len]));
    }
    write_f32_safetensors(&args.out, &out).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("loss {loss:.6} over {b} pairs; wrote {}", args.out.display());
    Ok(())
}
