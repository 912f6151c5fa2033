//! `coordinator imagine`: what a CLIP has learned, shown by optimising the pixels of an image
//! to raise its similarity to a prompt (no generative network: CLIP guidance only).
//!
//! Each step renders every prompt's image from its parameters ([`param`]), shows CLIP
//! `--views` augmented views of it ([`views`]), and moves the parameters with AdamW along the
//! gradient of the mean similarity, computed by the frozen model's backward down to the
//! pixels ([`Clip::backward_vision_to_pixels`]). All prompts' views go through the model as
//! one batch. Images are grayscale: one channel, shown to CLIP as three with its
//! normalisation, like the radiographs it was trained on.

pub mod output;
pub mod param;
pub mod views;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use data::loader::{CLIP_MEAN, CLIP_STD};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::{AdamWStep, Backend, Cpu};
use model::checkpoint::{CONFIG, TOKENIZER};
use model::tokenizer::{ClipTokenizer, CONTEXT_LEN};
use model::{Clip, ClipConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use worker::Device;

use param::Basis;
pub use param::Parameterization;
use views::{View, ViewRanges};

/// Largest `--size` accepted (a 1024 x 1024 image of parameters is already slow on a CPU).
pub const MAX_SIZE: usize = 1024;
/// Most views per step (each is one image through the vision tower).
pub const MAX_VIEWS: usize = 64;

#[derive(Args, Clone, Debug)]
pub struct ImagineArgs {
    /// A Hugging Face CLIP folder (config.json + model.safetensors), e.g. a training run's
    /// checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A text to make an image of; repeat for several (one image each). At least one.
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// Folder to write the PNGs, grid.png, similarity.jsonl and imagine.json into; it must not
    /// exist or be empty.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Side of the generated images in pixels (a multiple of the model's patch size); views
    /// are resampled to the model's input size.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Augmented views per image and step (random crop and scale, small rotation and shift,
    /// noise).
    #[arg(long, default_value_t = 6)]
    pub views: usize,
    /// AdamW's learning rate on the image parameters.
    #[arg(long, default_value_t = 0.03)]
    pub lr: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Parameterization::Fourier)]
    pub parameterization: Parameterization,
    /// A neutral text: optimise similarity to the prompt minus similarity to this one.
    #[arg(long)]
    pub neutral: Option<String>,
    /// Start every image from this radiograph (PNG, JPEG or DICOM; its centre square,
    /// resampled to --size) instead of from gray: what the model changes in it is written
    /// beside each image.
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
}

/// A starting image (`--init`): where it came from, and its gray values at `--size`.
#[derive(Clone, Debug)]
pub struct StartImage {
    pub source: PathBuf,
    /// `size * size` values in [0, 1].
    pub gray: Vec<f32>,
}

impl StartImage {
    /// Reads `path` (PNG, JPEG or DICOM, by its extension) as its centre square at `size`.
    pub fn load(path: &Path, size: usize) -> Result<Self> {
        let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        let img = match ext.as_str() {
            "png" => {
                let bytes = std::fs::read(path).with_context(|| format!("--init {}", path.display()))?;
                let png = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
                    .with_context(|| format!("--init {}: not a readable PNG", path.display()))?
                    .into_luma8();
                data::dicom::GreyImage { w: png.width() as usize, h: png.height() as usize, pixels: png.into_raw() }
            }
            "jpg" | "jpeg" | "dcm" => {
                data::imageio::load_grey(path).with_context(|| format!("--init {}", path.display()))?
            }
            _ => bail!("--init {}: not a PNG, JPEG or DICOM file (by its extension)", path.display()),
        };
        ensure!(img.w > 0 && img.h > 0, "--init {}: an empty image", path.display());
        Ok(Self { source: path.to_path_buf(), gray: views::centre_square(&img, size) })
    }
}

/// What to generate (the command's options without the files).
#[derive(Clone, Debug)]
pub struct ImagineOptions {
    pub prompts: Vec<String>,
    pub neutral: Option<String>,
    pub steps: usize,
    pub size: usize,
    pub views: usize,
    pub lr: f32,
    pub seed: u64,
    pub parameterization: Parameterization,
    /// Start every image from this one instead of from gray.
    pub init: Option<StartImage>,
}

impl ImagineOptions {
    pub fn from_args(a: &ImagineArgs) -> Self {
        Self {
            prompts: a.prompts.clone(),
            neutral: a.neutral.clone(),
            steps: a.steps,
            size: a.size,
            views: a.views,
            lr: a.lr,
            seed: a.seed,
            parameterization: a.parameterization,
            init: None,
        }
    }

    /// Checks everything that does not need the weights, against the model's config.
    pub fn validate(&self, config: &ClipConfig) -> Result<()> {
        ensure!(!self.prompts.is_empty(), "no prompt: give at least one --prompt TEXT");
        for (k, p) in self.prompts.iter().enumerate() {
            ensure!(!p.trim().is_empty(), "prompt {} is empty", k + 1);
        }
        if let Some(n) = &self.neutral {
            ensure!(!n.trim().is_empty(), "the neutral prompt is empty");
        }
        let patch = config.vision_config.patch_size;
        ensure!(
            self.size >= patch && self.size <= MAX_SIZE && self.size.is_multiple_of(patch),
            "--size {}: must be a multiple of the model's patch size {patch} between {patch} and {MAX_SIZE}",
            self.size
        );
        ensure!(self.steps >= 1, "--steps must be at least 1");
        ensure!((1..=MAX_VIEWS).contains(&self.views), "--views {}: must be between 1 and {MAX_VIEWS}", self.views);
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr {}: must be a positive number", self.lr);
        if let Some(init) = &self.init {
            ensure!(init.gray.len() == self.size * self.size, "the starting image is not {0} x {0}", self.size);
        }
        ensure!(
            config.text_config.max_position_embeddings == CONTEXT_LEN,
            "the checkpoint's text tower reads {} tokens; the tokenizer frames {CONTEXT_LEN}",
            config.text_config.max_position_embeddings
        );
        Ok(())
    }
}

/// One step's record (a line of `similarity.jsonl`).
#[derive(Clone, Debug)]
pub struct StepRecord {
    /// 1-based.
    pub step: usize,
    /// Per prompt: the mean over its views of cos(image, prompt).
    pub similarity: Vec<f64>,
    /// Per prompt: the mean over its views of cos(image, neutral), with `--neutral`.
    pub neutral: Option<Vec<f64>>,
}

/// The result: one image per prompt, and how the final images score.
#[derive(Clone, Debug)]
pub struct Generated {
    pub size: usize,
    /// `size * size` gray values in [0, 1], one per prompt.
    pub images: Vec<Vec<f32>>,
    /// `final_similarity[i][j]`: cos(final image i seen whole, prompt j), unaugmented.
    pub final_similarity: Vec<Vec<f64>>,
    /// cos(final image i, the neutral prompt), with `--neutral`.
    pub final_neutral: Option<Vec<f64>>,
    /// The final images' unit embeddings (seen whole), `projection_dim` each.
    pub final_embeddings: Vec<Vec<f32>>,
    pub seconds: f64,
}

/// AdamW's settings besides the learning rate: torch's defaults (`torch.optim.AdamW`).
const BETAS: (f32, f32) = (0.9, 0.999);
const EPS: f32 = 1e-8;
const WEIGHT_DECAY: f32 = 0.01;
/// Standard deviation of the initial parameters: a gray image with faint noise.
const INIT_STD: f32 = 0.01;

/// The text embeddings of `texts` by `clip`'s text tower (unit rows of `projection_dim`).
pub fn embed_prompts<B: Backend>(clip: &Clip<B>, tok: &ClipTokenizer, texts: &[String]) -> Result<Vec<Vec<f32>>> {
    let n = texts.len();
    ensure!(n <= clip.capacity(), "{n} texts above the model's capacity {}", clip.capacity());
    let mut ids = vec![0i32; n * CONTEXT_LEN];
    for (t, row) in texts.iter().zip(ids.chunks_exact_mut(CONTEXT_LEN)) {
        tok.try_encode_into(t, row).with_context(|| format!("tokenizing \"{t}\""))?;
    }
    clip.forward_text(&ids, n)?;
    let d = clip.config.projection_dim;
    let mut host = vec![0.0f32; n * d];
    clip.backend.download_f32(&clip.text_embeds(n), &mut host)?;
    Ok(host.chunks_exact(d).map(|c| c.to_vec()).collect())
}

/// Gray views (`[b, m, m]` in [0, 1]) as the model's normalised 3-channel input.
fn to_model_input(gray: &[f32], b: usize, m: usize, out: &mut [f32]) {
    for (img, dst) in gray.chunks_exact(m * m).zip(out.chunks_exact_mut(3 * m * m)).take(b) {
        for ch in 0..3 {
            for (o, &v) in dst[ch * m * m..(ch + 1) * m * m].iter_mut().zip(img) {
                *o = (v - CLIP_MEAN[ch]) / CLIP_STD[ch];
            }
        }
    }
}

/// The gradient of the gray views from that of the model's input (the three channels read
/// the same gray value).
fn from_model_grad(d_input: &[f32], b: usize, m: usize, out: &mut [f32]) {
    for (src, g) in d_input.chunks_exact(3 * m * m).zip(out.chunks_exact_mut(m * m)).take(b) {
        for (k, o) in g.iter_mut().enumerate() {
            *o = (0..3).map(|ch| src[ch * m * m + k] / CLIP_STD[ch]).sum();
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Runs the optimisation on a frozen model (see [`Clip::new_frozen`]) whose capacity holds
/// `prompts * views` images and `prompts + 1` texts. `on_step` sees every step's record.
pub fn generate<B: Backend>(
    clip: &Clip<B>,
    tok: &ClipTokenizer,
    opts: &ImagineOptions,
    on_step: &mut dyn FnMut(&StepRecord) -> Result<()>,
) -> Result<Generated> {
    opts.validate(&clip.config)?;
    let start = Instant::now();
    let (p, v, n) = (opts.prompts.len(), opts.views, opts.size);
    let m = clip.image_size();
    let b = p * v;
    ensure!(clip.capacity() >= capacity(opts), "the model holds {} images; {b} are needed", clip.capacity());
    let be = &clip.backend;
    let d = clip.config.projection_dim;

    let mut texts = opts.prompts.clone();
    texts.extend(opts.neutral.iter().cloned());
    let emb = embed_prompts(clip, tok, &texts)?;
    let (targets, neutral) = (&emb[..p], opts.neutral.as_ref().map(|_| &emb[p]));

    // Gradient of the loss (minus the mean over views of the objective) for every view of
    // prompt k: the same for all steps, as the embeddings' gradient of a dot product.
    let d_emb: Vec<f32> = (0..b)
        .flat_map(|i| {
            let t = &targets[i / v];
            (0..d).map(move |j| -(t[j] - neutral.map_or(0.0, |u| u[j])) / v as f32)
        })
        .collect();

    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let basis = Basis::new(opts.parameterization, n);
    let normal = rand_distr_normal();
    // From the starting image when there is one (every prompt from the same), else a gray
    // image with faint noise.
    let from_init = opts.init.as_ref().map(|s| basis.params_for(&param::logit(&s.gray)));
    let mut theta: Vec<Vec<f32>> = (0..p)
        .map(|_| match &from_init {
            Some(t) => t.clone(),
            None => (0..n * n).map(|_| INIT_STD * normal(&mut rng)).collect(),
        })
        .collect();
    let mut moments: Vec<(Vec<f32>, Vec<f32>)> = (0..p).map(|_| (vec![0.0; n * n], vec![0.0; n * n])).collect();
    let ranges = ViewRanges::default();

    let mut gray = vec![0.0f32; b * m * m];
    let mut input = vec![0.0f32; b * 3 * m * m];
    let mut d_input = vec![0.0f32; b * 3 * m * m];
    let mut d_gray = vec![0.0f32; b * m * m];
    let mut embeds = vec![0.0f32; b * d];
    for step in 1..=opts.steps {
        let rendered: Vec<(Vec<f32>, Vec<f32>)> = theta.iter().map(|t| param::sigmoid(&basis.logits(t))).collect();
        let views: Vec<View> = (0..b).map(|_| View::random(n, m, &ranges, &mut rng)).collect();
        for (i, view) in views.iter().enumerate() {
            let g = &mut gray[i * m * m..(i + 1) * m * m];
            view.gather(&rendered[i / v].0, g);
            for x in g.iter_mut() {
                *x += ranges.noise * normal(&mut rng);
            }
        }
        to_model_input(&gray, b, m, &mut input);
        clip.upload_pixels(&input, b)?;
        clip.forward_vision(b)?;
        be.download_f32(&clip.image_embeds(b), &mut embeds)?;
        let record = StepRecord {
            step,
            similarity: (0..p)
                .map(|k| (0..v).map(|j| dot(&embeds[(k * v + j) * d..][..d], &targets[k])).sum::<f64>() / v as f64)
                .collect(),
            neutral: neutral.map(|u| {
                (0..p)
                    .map(|k| (0..v).map(|j| dot(&embeds[(k * v + j) * d..][..d], u)).sum::<f64>() / v as f64)
                    .collect()
            }),
        };
        on_step(&record)?;

        be.upload_f32(&clip.image_embeds_grad(b), &d_emb)?;
        clip.backward_vision_to_pixels(b)?;
        be.download_f32(&clip.pixels_grad(b)?, &mut d_input)?;
        from_model_grad(&d_input, b, m, &mut d_gray);
        for (k, ((t, (mo, ve)), (_, dsig))) in theta.iter_mut().zip(&mut moments).zip(&rendered).enumerate() {
            let mut d_img = vec![0.0f32; n * n];
            for j in 0..v {
                let i = k * v + j;
                views[i].scatter(&d_gray[i * m * m..(i + 1) * m * m], &mut d_img);
            }
            let d_logits: Vec<f32> = d_img.iter().zip(dsig).map(|(g, s)| g * s).collect();
            let grad = basis.backward(&d_logits);
            ensure!(grad.iter().all(|g| g.is_finite()), "step {step}: the gradient of prompt {} is not finite", k + 1);
            let hp = AdamWStep {
                lr: opts.lr,
                beta1: BETAS.0,
                beta2: BETAS.1,
                eps: EPS,
                weight_decay: WEIGHT_DECAY,
                step: step as u64,
            };
            kernels::cpu::adamw::step(t, &grad, mo, ve, hp);
        }
    }

    let images: Vec<Vec<f32>> = theta.iter().map(|t| param::sigmoid(&basis.logits(t)).0).collect();
    let scores = score_images(clip, &images, n, targets, neutral.map(|u| u.as_slice()))?;
    Ok(Generated {
        size: n,
        images,
        final_similarity: scores.similarity,
        final_neutral: scores.neutral,
        final_embeddings: scores.embeddings,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `[image][text]` cosine similarities, each image's against the neutral text if any, and the
/// images' embeddings.
pub struct Scores {
    pub similarity: Vec<Vec<f64>>,
    pub neutral: Option<Vec<f64>>,
    pub embeddings: Vec<Vec<f32>>,
}

/// cos(image i seen whole and unaugmented, text j) for every pair, and against `neutral`.
pub fn score_images<B: Backend>(
    clip: &Clip<B>,
    images: &[Vec<f32>],
    size: usize,
    texts: &[Vec<f32>],
    neutral: Option<&[f32]>,
) -> Result<Scores> {
    let m = clip.image_size();
    let d = clip.config.projection_dim;
    let whole = View::identity(size, m);
    let mut sims = Vec::with_capacity(images.len());
    let mut neut = Vec::with_capacity(images.len());
    let mut embeddings = Vec::with_capacity(images.len());
    for chunk in images.chunks(clip.capacity()) {
        let b = chunk.len();
        let mut gray = vec![0.0f32; b * m * m];
        for (img, g) in chunk.iter().zip(gray.chunks_exact_mut(m * m)) {
            whole.gather(img, g);
        }
        let mut input = vec![0.0f32; b * 3 * m * m];
        to_model_input(&gray, b, m, &mut input);
        clip.upload_pixels(&input, b)?;
        clip.forward_vision(b)?;
        let mut e = vec![0.0f32; b * d];
        clip.backend.download_f32(&clip.image_embeds(b), &mut e)?;
        for row in e.chunks_exact(d) {
            sims.push(texts.iter().map(|t| dot(row, t)).collect());
            neut.push(neutral.map_or(0.0, |u| dot(row, u)));
            embeddings.push(row.to_vec());
        }
    }
    Ok(Scores { similarity: sims, neutral: neutral.map(|_| neut), embeddings })
}

/// The batch capacity a model needs for `opts`: every view of every prompt, and the texts.
pub fn capacity(opts: &ImagineOptions) -> usize {
    (opts.prompts.len() * opts.views).max(opts.prompts.len() + 1)
}

/// A standard normal sampler (Box-Muller on the seeded generator: no extra dependency).
fn rand_distr_normal() -> impl Fn(&mut ChaCha8Rng) -> f32 {
    |rng: &mut ChaCha8Rng| {
        use rand::Rng;
        let u1: f64 = rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = rng.random();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// The checkpoint's tokenizer when it has one, else the embedded CLIP tokenizer.
pub fn tokenizer_for(checkpoint: &Path) -> Result<ClipTokenizer> {
    let file = checkpoint.join(TOKENIZER);
    if file.is_file() {
        ClipTokenizer::from_file(&file)
    } else {
        ClipTokenizer::new()
    }
}

/// Reads the checkpoint's config, checks `opts` against it, then loads the frozen model on
/// `B` and generates.
pub fn generate_from<B: Backend>(
    backend: B,
    checkpoint: &Path,
    opts: &ImagineOptions,
    on_step: &mut dyn FnMut(&StepRecord) -> Result<()>,
) -> Result<Generated> {
    let config = read_config(checkpoint)?;
    opts.validate(&config)?;
    let (clip, _) = Clip::from_pretrained_frozen(backend, checkpoint, capacity(opts))
        .with_context(|| format!("loading {}", checkpoint.display()))?;
    let tok = tokenizer_for(checkpoint)?;
    generate(&clip, &tok, opts, on_step)
}

fn read_config(checkpoint: &Path) -> Result<ClipConfig> {
    ensure!(checkpoint.is_dir(), "checkpoint {}: no such folder", checkpoint.display());
    let file = checkpoint.join(CONFIG);
    ensure!(file.is_file(), "checkpoint {}: no {CONFIG} (not a Hugging Face CLIP folder)", checkpoint.display());
    ClipConfig::from_file(&file)
}

/// Refuses an `--out` that holds anything (a previous result is never overwritten).
fn prepare_out(out: &Path) -> Result<()> {
    if out.exists() {
        ensure!(out.is_dir(), "--out {}: exists and is not a folder", out.display());
        let mut entries = std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?;
        if entries.next().is_some() {
            bail!("--out {}: the folder is not empty (choose a new one)", out.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

fn progress_bar(steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Generates into `out`: the images, the grid, `similarity.jsonl` and `imagine.json`.
/// Returns the result and the image files (grid last).
pub fn imagine_to_dir(
    checkpoint: &Path,
    opts: &ImagineOptions,
    device: Device,
    out: &Path,
    show_progress: bool,
) -> Result<(Generated, Vec<PathBuf>)> {
    // Everything that needs no weights is checked before the folder is made.
    opts.validate(&read_config(checkpoint)?)?;
    prepare_out(out)?;
    let bar = if show_progress { progress_bar(opts.steps as u64) } else { ProgressBar::hidden() };
    let mut log = output::StepLog::create(out.join("similarity.jsonl"))?;
    let mut on_step = |r: &StepRecord| -> Result<()> {
        log.write(&json!({ "step": r.step, "similarity": r.similarity, "neutral": r.neutral }))?;
        let mean = r.similarity.iter().sum::<f64>() / r.similarity.len() as f64;
        bar.set_message(format!("similarity {mean:.3}"));
        bar.inc(1);
        Ok(())
    };
    let generated = match device {
        Device::Cpu => generate_from(Cpu, checkpoint, opts, &mut on_step)?,
        Device::Cuda => generate_from(kernels::Cuda::new(0)?, checkpoint, opts, &mut on_step)?,
    };
    bar.finish_and_clear();
    log.finish()?;
    let files = output::write_images(out, &opts.prompts, &generated.images, generated.size)?;
    let changes = match &opts.init {
        Some(init) => Some(output::write_changes(out, &opts.prompts, &generated.images, &init.gray, generated.size)?),
        None => None,
    };
    let summary = json!({
        "checkpoint": checkpoint.display().to_string(),
        "prompts": opts.prompts,
        "neutral": opts.neutral,
        "files": files.iter().map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned())).collect::<Vec<_>>(),
        "steps": opts.steps,
        "size": opts.size,
        "views": opts.views,
        "lr": opts.lr,
        "seed": opts.seed,
        "parameterization": opts.parameterization.name(),
        "device": device.name(),
        "final_similarity": generated.final_similarity,
        "final_neutral": generated.final_neutral,
        "init": opts.init.as_ref().map(|s| s.source.display().to_string()),
        "change_files": changes.as_ref().map(|c| c.files.iter().map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned())).collect::<Vec<_>>()),
        "mean_abs_change": changes.as_ref().map(|c| c.mean_abs.clone()),
        "seconds": generated.seconds,
    });
    let text = serde_json::to_string_pretty(&summary)?;
    model::checkpoint::write_file_atomically(&out.join("imagine.json"), text.as_bytes())?;
    Ok((generated, files))
}

pub fn run(args: ImagineArgs) -> Result<()> {
    let mut opts = ImagineOptions::from_args(&args);
    if let Some(path) = &args.init {
        // The size is checked before the image is resampled to it; nothing is written yet.
        opts.validate(&read_config(&args.checkpoint)?)?;
        opts.init = Some(StartImage::load(path, args.size)?);
    }
    let (g, files) = imagine_to_dir(&args.checkpoint, &opts, args.device, &args.out, true)?;
    for (k, prompt) in opts.prompts.iter().enumerate() {
        println!("{:.3}  {}  {prompt}", g.final_similarity[k][k], files[k].display());
    }
    if let Some(grid) = files.last() {
        println!(
            "grid: {}  ({:.1} s; each line: the final image's cosine similarity to its prompt)",
            grid.display(),
            g.seconds
        );
    }
    if opts.init.is_some() {
        println!(
            "changes: {}  (mid-gray: unchanged; brighter: made brighter; +-{:.1} spans black to white)",
            args.out.join(output::CHANGES_GRID).display(),
            0.5 / output::CHANGE_GAIN
        );
    }
    Ok(())
}
