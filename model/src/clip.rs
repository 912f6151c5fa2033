//! The CLIP towers, forward and backward, written once over `kernels::Backend`.
//!
//! They compute what `transformers.CLIPModel` computes: pre-LN encoder blocks, the vision
//! tower's `pre_layrnorm` and `post_layernorm` (on the class token only), the text tower's
//! causal attention, `final_layer_norm` and pooling at the first end-of-text token,
//! projections without bias, and L2-normalised embeddings. Pooling happens before the last
//! layer norm (a per-row op, so the result is the same) to normalise `b` rows, not `b*t`.
//!
//! Activations are preallocated for a batch capacity (llm.c's way): a step allocates nothing.

use std::ops::Range;

use anyhow::{ensure, Context, Result};
use kernels::{Activation, Backend, DType, Tensor};

use crate::config::{activation, ClipConfig};
use crate::params::{GradOrder, Layout};

type T<B> = Tensor<B>;

/// A parameter's value and gradient (views into the flat buffers) and whether it trains.
pub struct Param<B: Backend> {
    pub value: T<B>,
    pub grad: T<B>,
    pub train: bool,
}

impl<B: Backend> Param<B> {
    fn grad(&self) -> Option<&T<B>> {
        self.train.then_some(&self.grad)
    }
}

struct Linear<B: Backend> {
    w: Param<B>,
    b: Option<Param<B>>,
    inp: usize,
    out: usize,
}

impl<B: Backend> Linear<B> {
    fn fwd(&self, be: &B, out: &T<B>, inp: &T<B>, n: usize) {
        be.linear_fwd(out, inp, &self.w.value, self.b.as_ref().map(|b| &b.value), n, self.inp, self.out);
    }
    fn bwd(&self, be: &B, dinp: Option<&T<B>>, dout: &T<B>, inp: &T<B>, n: usize) {
        let dbias = self.b.as_ref().and_then(|b| b.grad());
        be.linear_bwd(dinp, self.w.grad(), dbias, dout, inp, &self.w.value, n, self.inp, self.out);
    }
}

struct Norm<B: Backend> {
    g: Param<B>,
    b: Param<B>,
    c: usize,
    eps: f32,
}

/// Saved state of one layer norm for `n` rows.
struct NormActs<B: Backend> {
    out: T<B>,
    mean: T<B>,
    rstd: T<B>,
}

impl<B: Backend> NormActs<B> {
    fn new(be: &B, n: usize, c: usize) -> Result<Self> {
        Ok(Self { out: be.alloc(n * c, DType::Bf16)?, mean: be.alloc(n, DType::F32)?, rstd: be.alloc(n, DType::F32)? })
    }
    fn rows(&self, n: usize, c: usize) -> Self {
        Self { out: self.out.slice(0, n * c), mean: self.mean.slice(0, n), rstd: self.rstd.slice(0, n) }
    }
}

impl<B: Backend> Norm<B> {
    fn fwd(&self, be: &B, a: &NormActs<B>, inp: &T<B>, n: usize) {
        be.layernorm_fwd(&a.out, &a.mean, &a.rstd, inp, &self.g.value, &self.b.value, n, self.c, self.eps);
    }
    /// The residual add in place and this norm in one op: `x += y`, then the norm of `x`
    /// (saved as [`Norm::fwd`] saves it, so [`Norm::bwd`] with input `x` is its backward).
    fn add_fwd(&self, be: &B, a: &NormActs<B>, x: &T<B>, y: &T<B>, n: usize) {
        be.add_layernorm_fwd(&a.out, x, &a.mean, &a.rstd, x, y, &self.g.value, &self.b.value, n, self.c, self.eps);
    }
    fn bwd(&self, be: &B, dinp: &T<B>, dout: &T<B>, a: &NormActs<B>, inp: &T<B>, n: usize) {
        be.layernorm_bwd(dinp, self.g.grad(), self.b.grad(), dout, inp, &self.g.value, &a.mean, &a.rstd, n, self.c);
    }
}

struct Block<B: Backend> {
    ln1: Norm<B>,
    qkv: Linear<B>,
    proj: Linear<B>,
    ln2: Norm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    adapter: Option<(Linear<B>, Linear<B>)>,
}

/// What one block saves for its backward (for the batch capacity).
struct BlockActs<B: Backend> {
    ln1: NormActs<B>,
    qkv: T<B>,
    att_saved: T<B>,
    att: T<B>,
    /// The residual stream after the attention half.
    mid: T<B>,
    ln2: NormActs<B>,
    fc1: T<B>,
    act: T<B>,
    /// The block's output before the adapter (only with adapters).
    block_out: Option<T<B>>,
    ad_down: Option<T<B>>,
    ad_act: Option<T<B>>,
}

/// Shapes of one tower's encoder.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    c: usize,
    heads: usize,
    inner: usize,
    adapter: usize,
    causal: bool,
    act: Activation,
}

struct Encoder<B: Backend> {
    blocks: Vec<Block<B>>,
    dims: Dims,
}

/// An encoder's activations: the residual stream before each block and after the last
/// (`res[0..=L]`), the blocks' saved state, and backward scratch shared by all blocks.
struct EncoderActs<B: Backend> {
    res: Vec<T<B>>,
    blocks: Vec<BlockActs<B>>,
    d_res: T<B>,
    d_ln: T<B>,
    d_att: T<B>,
    d_qkv: T<B>,
    d_fc1: T<B>,
    d_act: T<B>,
    d_ad_down: Option<T<B>>,
    d_ad_act: Option<T<B>>,
}

impl<B: Backend> Encoder<B> {
    fn alloc_acts(&self, be: &B, batch: usize) -> Result<EncoderActs<B>> {
        let Dims { t, c, heads, inner, adapter, .. } = self.dims;
        let n = batch * t;
        let act = |len: usize| be.alloc(len, DType::Bf16);
        let with_adapter = adapter > 0;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for _ in &self.blocks {
            blocks.push(BlockActs {
                ln1: NormActs::new(be, n, c)?,
                qkv: act(n * 3 * c)?,
                att_saved: be.alloc(be.attention_saved_len(batch, t, heads), DType::F32)?,
                att: act(n * c)?,
                mid: act(n * c)?,
                ln2: NormActs::new(be, n, c)?,
                fc1: act(n * inner)?,
                act: act(n * inner)?,
                block_out: if with_adapter { Some(act(n * c)?) } else { None },
                ad_down: if with_adapter { Some(act(n * adapter)?) } else { None },
                ad_act: if with_adapter { Some(act(n * adapter)?) } else { None },
            });
        }
        let res = (0..=self.blocks.len()).map(|_| act(n * c)).collect::<Result<Vec<_>>>()?;
        Ok(EncoderActs {
            res,
            blocks,
            d_res: act(n * c)?,
            d_ln: act(n * c)?,
            d_att: act(n * c)?,
            d_qkv: act(n * 3 * c)?,
            d_fc1: act(n * inner)?,
            d_act: act(n * inner)?,
            d_ad_down: if with_adapter { Some(act(n * adapter)?) } else { None },
            d_ad_act: if with_adapter { Some(act(n * adapter)?) } else { None },
        })
    }

    /// Runs every block on `acts.res[0]` (rows `b * t`), leaving the output in `acts.res[L]`.
    /// A residual add that a layer norm reads next runs fused with it (one pass over the
    /// rows instead of two): the attention half's add with `ln2`, and a block's last add with
    /// the next block's `ln1`. The saved state is what the unfused ops would save.
    fn forward(&self, be: &B, acts: &EncoderActs<B>, b: usize) {
        let Dims { t, c, heads, inner, adapter, causal, act } = self.dims;
        let n = b * t;
        let cut = |x: &T<B>, per_row: usize| x.slice(0, n * per_row);
        if let (Some(blk), Some(a)) = (self.blocks.first(), acts.blocks.first()) {
            blk.ln1.fwd(be, &a.ln1.rows(n, c), &cut(&acts.res[0], c), n);
        }
        for (l, (blk, a)) in self.blocks.iter().zip(&acts.blocks).enumerate() {
            let res_in = cut(&acts.res[l], c);
            let res_out = cut(&acts.res[l + 1], c);
            // ln1 of this block ran already (above, or fused with the previous block's last add).
            let ln1 = a.ln1.rows(n, c);
            let qkv = cut(&a.qkv, 3 * c);
            blk.qkv.fwd(be, &qkv, &ln1.out, n);
            let att = cut(&a.att, c);
            let saved = a.att_saved.slice(0, be.attention_saved_len(b, t, heads));
            be.attention_fwd(&att, &saved, &qkv, b, t, heads, c / heads, causal);
            let mid = cut(&a.mid, c);
            blk.proj.fwd(be, &mid, &att, n);
            let ln2 = a.ln2.rows(n, c);
            blk.ln2.add_fwd(be, &ln2, &mid, &res_in, n);
            let fc1 = cut(&a.fc1, inner);
            let h = cut(&a.act, inner);
            blk.fc1.fwd(be, &fc1, &ln2.out, n);
            be.act_fwd(act, &h, &fc1);
            // The block's last residual add, res_out += skip.
            let skip = match (&blk.adapter, &a.block_out, &a.ad_down, &a.ad_act) {
                (Some((down, up)), Some(bo), Some(dd), Some(da)) => {
                    let bo = cut(bo, c);
                    blk.fc2.fwd(be, &bo, &h, n);
                    be.add(&bo, &bo, &mid);
                    let (dd, da) = (cut(dd, adapter), cut(da, adapter));
                    down.fwd(be, &dd, &bo, n);
                    be.act_fwd(act, &da, &dd);
                    up.fwd(be, &res_out, &da, n);
                    bo
                }
                _ => {
                    blk.fc2.fwd(be, &res_out, &h, n);
                    mid
                }
            };
            match (self.blocks.get(l + 1), acts.blocks.get(l + 1)) {
                (Some(next), Some(na)) => next.ln1.add_fwd(be, &na.ln1.rows(n, c), &res_out, &skip, n),
                _ => be.add(&res_out, &res_out, &skip),
            }
        }
    }

    /// Backward through every block: on entry `acts.d_res` holds the gradient of the
    /// output `res[L]`; on exit, the gradient of the input `res[0]`. `block_done(l)` runs once
    /// block `l`'s parameter gradients are final (last block first).
    fn backward(&self, be: &B, acts: &EncoderActs<B>, b: usize, block_done: &mut dyn FnMut(usize)) {
        let Dims { t, c, heads, inner, adapter, causal, act } = self.dims;
        let n = b * t;
        let cut = |x: &T<B>, per_row: usize| x.slice(0, n * per_row);
        let dres = cut(&acts.d_res, c);
        let d_ln = cut(&acts.d_ln, c);
        let d_att = cut(&acts.d_att, c);
        let d_qkv = cut(&acts.d_qkv, 3 * c);
        let d_fc1 = cut(&acts.d_fc1, inner);
        let d_act = cut(&acts.d_act, inner);
        for (l, (blk, a)) in self.blocks.iter().zip(&acts.blocks).enumerate().rev() {
            let res_in = cut(&acts.res[l], c);
            let mid = cut(&a.mid, c);
            if let (Some((down, up)), Some(bo), Some(dd), Some(da), Some(gdd), Some(gda)) =
                (&blk.adapter, &a.block_out, &a.ad_down, &a.ad_act, &acts.d_ad_down, &acts.d_ad_act)
            {
                // res_out = bo + up(act(down(bo))): dres stays as the identity path's share.
                let (bo, dd, da) = (cut(bo, c), cut(dd, adapter), cut(da, adapter));
                let (gdd, gda) = (cut(gdd, adapter), cut(gda, adapter));
                be.fill(&gda, 0.0);
                up.bwd(be, Some(&gda), &dres, &da, n);
                be.fill(&gdd, 0.0);
                be.act_bwd(act, &gdd, &gda, &dd);
                down.bwd(be, Some(&dres), &gdd, &bo, n);
            }
            // MLP half: out = mid + fc2(act(fc1(ln2(mid)))).
            let ln2 = a.ln2.rows(n, c);
            let h = cut(&a.act, inner);
            be.fill(&d_act, 0.0);
            blk.fc2.bwd(be, Some(&d_act), &dres, &h, n);
            be.fill(&d_fc1, 0.0);
            be.act_bwd(act, &d_fc1, &d_act, &cut(&a.fc1, inner));
            be.fill(&d_ln, 0.0);
            blk.fc1.bwd(be, Some(&d_ln), &d_fc1, &ln2.out, n);
            blk.ln2.bwd(be, &dres, &d_ln, &ln2, &mid, n);
            // Attention half: mid = res_in + proj(attention(qkv(ln1(res_in)))).
            let ln1 = a.ln1.rows(n, c);
            let att = cut(&a.att, c);
            let qkv = cut(&a.qkv, 3 * c);
            be.fill(&d_att, 0.0);
            blk.proj.bwd(be, Some(&d_att), &dres, &att, n);
            be.fill(&d_qkv, 0.0);
            let saved = a.att_saved.slice(0, be.attention_saved_len(b, t, heads));
            be.attention_bwd(&d_qkv, &d_att, &qkv, &att, &saved, b, t, heads, c / heads, causal);
            be.fill(&d_ln, 0.0);
            blk.qkv.bwd(be, Some(&d_ln), &d_qkv, &ln1.out, n);
            blk.ln1.bwd(be, &dres, &d_ln, &ln1, &res_in, n);
            block_done(l);
        }
    }
}

struct VisionTower<B: Backend> {
    patch: Linear<B>,
    cls: Param<B>,
    pos: Param<B>,
    pre_ln: Norm<B>,
    encoder: Encoder<B>,
    post_ln: Norm<B>,
    proj: Linear<B>,
    image: usize,
    patch_size: usize,
}

struct TextTower<B: Backend> {
    tok: Param<B>,
    pos: Param<B>,
    encoder: Encoder<B>,
    final_ln: Norm<B>,
    proj: Linear<B>,
    vocab: usize,
    eos: i64,
}

/// Head activations shared by the two towers' shapes: pooled rows, their norm, the
/// projection and the normalised embedding, with their gradients.
struct HeadActs<B: Backend> {
    index: T<B>,
    pooled: T<B>,
    norm: NormActs<B>,
    proj: T<B>,
    l2: T<B>,
    emb: T<B>,
    d_emb: T<B>,
    d_proj: T<B>,
    d_norm: T<B>,
    d_pooled: T<B>,
}

impl<B: Backend> HeadActs<B> {
    fn new(be: &B, batch: usize, c: usize, p: usize) -> Result<Self> {
        Ok(Self {
            index: be.alloc(batch, DType::I32)?,
            pooled: be.alloc(batch * c, DType::Bf16)?,
            norm: NormActs::new(be, batch, c)?,
            proj: be.alloc(batch * p, DType::F32)?,
            l2: be.alloc(batch, DType::F32)?,
            emb: be.alloc(batch * p, DType::F32)?,
            d_emb: be.alloc(batch * p, DType::F32)?,
            d_proj: be.alloc(batch * p, DType::F32)?,
            d_norm: be.alloc(batch * c, DType::Bf16)?,
            d_pooled: be.alloc(batch * c, DType::Bf16)?,
        })
    }
}

/// Pool one row per sequence, layer-norm it, project it, L2-normalise it.
fn head_fwd<B: Backend>(be: &B, h: &HeadActs<B>, ln: &Norm<B>, proj: &Linear<B>, res: &T<B>, b: usize, t: usize) {
    let (c, p) = (proj.inp, proj.out);
    let pooled = h.pooled.slice(0, b * c);
    be.gather_rows(&pooled, &res.slice(0, b * t * c), &h.index.slice(0, b), b, t, c);
    let norm = h.norm.rows(b, c);
    ln.fwd(be, &norm, &pooled, b);
    let out = h.proj.slice(0, b * p);
    proj.fwd(be, &out, &norm.out, b);
    be.l2norm_fwd(&h.emb.slice(0, b * p), &h.l2.slice(0, b), &out, b, p);
}

/// Backward of [`head_fwd`] from `h.d_emb`; writes (not adds) the residual gradient `d_res`.
fn head_bwd<B: Backend>(be: &B, h: &HeadActs<B>, ln: &Norm<B>, proj: &Linear<B>, d_res: &T<B>, b: usize, t: usize) {
    let (c, p) = (proj.inp, proj.out);
    let d_proj = h.d_proj.slice(0, b * p);
    be.fill(&d_proj, 0.0);
    be.l2norm_bwd(&d_proj, &h.d_emb.slice(0, b * p), &h.emb.slice(0, b * p), &h.l2.slice(0, b), b, p);
    let norm = h.norm.rows(b, c);
    let d_norm = h.d_norm.slice(0, b * c);
    be.fill(&d_norm, 0.0);
    proj.bwd(be, Some(&d_norm), &d_proj, &norm.out, b);
    let d_pooled = h.d_pooled.slice(0, b * c);
    be.fill(&d_pooled, 0.0);
    ln.bwd(be, &d_pooled, &d_norm, &norm, &h.pooled.slice(0, b * c), b);
    let d_res = d_res.slice(0, b * t * c);
    be.fill(&d_res, 0.0);
    be.gather_rows_bwd(&d_res, &d_pooled, &h.index.slice(0, b), b, t, c);
}

struct VisionActs<B: Backend> {
    pixels: T<B>,
    cols: T<B>,
    patches: T<B>,
    emb: T<B>,
    pre: NormActs<B>,
    enc: EncoderActs<B>,
    head: HeadActs<B>,
    d_emb: T<B>,
    d_patches: T<B>,
    /// Gradients of the patch columns and of the input pixels: only in a frozen model, the
    /// one whose backward goes down to the pixels ([`Clip::backward_vision_to_pixels`]).
    to_pixels: Option<PixelGrads<B>>,
}

struct PixelGrads<B: Backend> {
    d_cols: T<B>,
    d_pixels: T<B>,
}

struct TextActs<B: Backend> {
    ids: T<B>,
    enc: EncoderActs<B>,
    head: HeadActs<B>,
}

/// A CLIP model on a backend, with activations for up to `capacity` pairs.
pub struct Clip<B: Backend> {
    pub config: ClipConfig,
    pub layout: Layout,
    pub backend: B,
    /// Every parameter, in `layout` order.
    pub params: T<B>,
    /// Their gradients, same layout.
    pub grads: T<B>,
    /// Which parameters train (by `layout` index).
    trainable: Vec<bool>,
    vision: VisionTower<B>,
    text: TextTower<B>,
    logit_scale: Param<B>,
    capacity: usize,
    va: VisionActs<B>,
    ta: TextActs<B>,
    grad_order: GradOrder,
}

impl<B: Backend> Clip<B> {
    /// A model with zeroed parameters (load or initialise them next) and activations for
    /// batches of up to `capacity` pairs.
    pub fn new(backend: B, config: ClipConfig, capacity: usize) -> Result<Self> {
        Self::build(backend, config, capacity, false)
    }

    /// A model whose parameters are all frozen and that holds no parameter gradients (its
    /// `grads` buffer is empty): the backward of its vision tower goes to the input pixels
    /// instead ([`Clip::backward_vision_to_pixels`]), for optimising images against a trained
    /// model. Its activations are those of [`Clip::new`] plus two pixel-sized gradients.
    pub fn new_frozen(backend: B, config: ClipConfig, capacity: usize) -> Result<Self> {
        Self::build(backend, config, capacity, true)
    }

    fn build(backend: B, config: ClipConfig, capacity: usize, frozen: bool) -> Result<Self> {
        config.validate()?;
        config.check_limits(&backend.limits())?;
        ensure!(capacity > 0, "batch capacity must be positive");
        let layout = Layout::new(&config);
        let params = backend.alloc(layout.total, DType::F32)?;
        let grads = backend.alloc(if frozen { 0 } else { layout.total }, DType::F32)?;
        let trainable = vec![!frozen; layout.specs.len()];
        let (vision, text, logit_scale) = build_towers(&config, &layout, &params, &grads, &trainable)?;
        let be = &backend;
        let vc = &config.vision_config;
        let tc = &config.text_config;
        let (cv, np, pd) = (vc.hidden_size, vc.num_patches(), config.projection_dim);
        let va = VisionActs {
            pixels: be.alloc(capacity * 3 * vc.image_size * vc.image_size, DType::F32)?,
            cols: be.alloc(capacity * 3 * vc.image_size * vc.image_size, DType::Bf16)?,
            patches: be.alloc(capacity * np * cv, DType::Bf16)?,
            emb: be.alloc(capacity * (np + 1) * cv, DType::Bf16)?,
            pre: NormActs::new(be, capacity * (np + 1), cv)?,
            enc: vision.encoder.alloc_acts(be, capacity)?,
            head: HeadActs::new(be, capacity, cv, pd)?,
            d_emb: be.alloc(capacity * (np + 1) * cv, DType::Bf16)?,
            d_patches: be.alloc(capacity * np * cv, DType::Bf16)?,
            to_pixels: if frozen {
                let px = capacity * 3 * vc.image_size * vc.image_size;
                Some(PixelGrads { d_cols: be.alloc(px, DType::Bf16)?, d_pixels: be.alloc(px, DType::F32)? })
            } else {
                None
            },
        };
        // Class-token pooling reads row 0 of every sequence.
        be.upload_i32(&va.head.index, &vec![0; capacity])?;
        let ta = TextActs {
            ids: be.alloc(capacity * tc.max_position_embeddings, DType::I32)?,
            enc: text.encoder.alloc_acts(be, capacity)?,
            head: HeadActs::new(be, capacity, tc.hidden_size, pd)?,
        };
        let grad_order = GradOrder::new(&layout, vc.num_hidden_layers, tc.num_hidden_layers);
        Ok(Self {
            config,
            layout,
            backend,
            params,
            grads,
            trainable,
            vision,
            text,
            logit_scale,
            capacity,
            va,
            ta,
            grad_order,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens per text (the position-embedding length, 77 for CLIP).
    pub fn context_len(&self) -> usize {
        self.config.text_config.max_position_embeddings
    }

    pub fn image_size(&self) -> usize {
        self.config.vision_config.image_size
    }

    pub fn trainable(&self) -> &[bool] {
        &self.trainable
    }

    /// Sets which parameters train (by layout index); frozen ones get no weight gradient.
    pub fn set_trainable(&mut self, trainable: Vec<bool>) -> Result<()> {
        ensure!(!self.is_frozen(), "a model made by Clip::new_frozen has no gradient buffer: it cannot train");
        ensure!(trainable.len() == self.layout.specs.len(), "trainable mask of the wrong length");
        let (vision, text, logit_scale) =
            build_towers(&self.config, &self.layout, &self.params, &self.grads, &trainable)?;
        self.vision = vision;
        self.text = text;
        self.logit_scale = logit_scale;
        self.trainable = trainable;
        Ok(())
    }

    /// Whether this model was made by [`Clip::new_frozen`] (no parameter gradients at all).
    pub fn is_frozen(&self) -> bool {
        self.va.to_pixels.is_some()
    }

    pub fn logit_scale(&self) -> &Param<B> {
        &self.logit_scale
    }

    /// The host-side input tensor for pixels `[capacity, 3, image, image]`: upload into
    /// (a prefix of) it, then call [`Clip::forward_vision`].
    pub fn pixel_input(&self) -> &T<B> {
        &self.va.pixels
    }

    /// The normalised image embeddings of the last vision forward (`[b, projection_dim]`).
    pub fn image_embeds(&self, b: usize) -> T<B> {
        self.va.head.emb.slice(0, b * self.config.projection_dim)
    }
    pub fn text_embeds(&self, b: usize) -> T<B> {
        self.ta.head.emb.slice(0, b * self.config.projection_dim)
    }
    /// Where the gradient of the loss w.r.t. [`Clip::image_embeds`] goes before
    /// [`Clip::backward_vision`] (overwritten by the caller, e.g. with a copy).
    pub fn image_embeds_grad(&self, b: usize) -> T<B> {
        self.va.head.d_emb.slice(0, b * self.config.projection_dim)
    }
    pub fn text_embeds_grad(&self, b: usize) -> T<B> {
        self.ta.head.d_emb.slice(0, b * self.config.projection_dim)
    }

    /// Uploads pixels `[b, 3, image, image]` (normalised) into the model's input buffer.
    pub fn upload_pixels(&self, pixels: &[f32], b: usize) -> Result<()> {
        let s = self.image_size();
        ensure!(b <= self.capacity, "batch {b} above the capacity {}", self.capacity);
        ensure!(pixels.len() == b * 3 * s * s, "pixels: {} values for {b} images of 3x{s}x{s}", pixels.len());
        self.backend.upload_f32(&self.va.pixels.slice(0, pixels.len()), pixels)
    }

    /// The vision tower on the first `b` images of the input buffer.
    pub fn forward_vision(&self, b: usize) -> Result<()> {
        ensure!(b > 0 && b <= self.capacity, "batch {b} outside 1..={}", self.capacity);
        let be = &self.backend;
        let v = &self.vision;
        let a = &self.va;
        let (img, p, c) = (v.image, v.patch_size, v.encoder.dims.c);
        let np = (img / p) * (img / p);
        let t = np + 1;
        let cols = a.cols.slice(0, b * 3 * img * img);
        be.im2col(&cols, &a.pixels.slice(0, b * 3 * img * img), b, img, p);
        let patches = a.patches.slice(0, b * np * c);
        v.patch.fwd(be, &patches, &cols, b * np);
        let emb = a.emb.slice(0, b * t * c);
        be.vision_embed_fwd(&emb, &patches, &v.cls.value, &v.pos.value, b, np, c);
        let pre = a.pre.rows(b * t, c);
        v.pre_ln.fwd(be, &pre, &emb, b * t);
        be.copy(&a.enc.res[0].slice(0, b * t * c), &pre.out);
        v.encoder.forward(be, &a.enc, b);
        head_fwd(be, &a.head, &v.post_ln, &v.proj, &a.enc.res[v.encoder.blocks.len()], b, t);
        Ok(())
    }

    /// The text tower on `b` rows of `context_len` token ids.
    pub fn forward_text(&self, ids: &[i32], b: usize) -> Result<()> {
        ensure!(b > 0 && b <= self.capacity, "batch {b} outside 1..={}", self.capacity);
        let t = self.context_len();
        ensure!(ids.len() == b * t, "{} token ids for {b} texts of {t}", ids.len());
        let vocab = self.text.vocab;
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= vocab) {
            anyhow::bail!("token id {id} (text {}, position {}) is outside the vocabulary of {vocab}", i / t, i % t);
        }
        let eos: Vec<i32> = ids.chunks(t).map(|row| eos_position(row, self.text.eos)).collect();
        let be = &self.backend;
        let x = &self.text;
        let a = &self.ta;
        let c = x.encoder.dims.c;
        be.upload_i32(&a.ids.slice(0, b * t), ids)?;
        be.upload_i32(&a.head.index.slice(0, b), &eos)?;
        let res0 = a.enc.res[0].slice(0, b * t * c);
        be.token_embed_fwd(&res0, &a.ids.slice(0, b * t), &x.tok.value, &x.pos.value, b, t, c);
        x.encoder.forward(be, &a.enc, b);
        head_fwd(be, &a.head, &x.final_ln, &x.proj, &a.enc.res[x.encoder.blocks.len()], b, t);
        Ok(())
    }

    /// Backward of the vision tower from [`Clip::image_embeds_grad`], adding into `grads`.
    pub fn backward_vision(&self, b: usize) {
        self.backward_vision_with(b, &mut |_| {});
    }

    /// [`Clip::backward_vision`], calling `ready` with each range of `grads` as soon as no op
    /// of the step writes it any more (see [`GradOrder`]), so that its sum over the ranks can
    /// start while the rest of the backward runs.
    pub fn backward_vision_with(&self, b: usize, ready: &mut dyn FnMut(Range<usize>)) {
        let be = &self.backend;
        let order = &self.grad_order;
        let v = &self.vision;
        let a = &self.va;
        let (img, p, c) = (v.image, v.patch_size, v.encoder.dims.c);
        let np = (img / p) * (img / p);
        let t = np + 1;
        head_bwd(be, &a.head, &v.post_ln, &v.proj, &a.enc.d_res, b, t);
        order.vision_head.iter().for_each(|r| ready(r.clone()));
        v.encoder.backward(be, &a.enc, b, &mut |l| ready(order.vision_blocks[l].clone()));
        let pre = a.pre.rows(b * t, c);
        let d_emb = a.d_emb.slice(0, b * t * c);
        be.fill(&d_emb, 0.0);
        v.pre_ln.bwd(be, &d_emb, &a.enc.d_res.slice(0, b * t * c), &pre, &a.emb.slice(0, b * t * c), b * t);
        let d_patches = v.patch.w.train.then(|| a.d_patches.slice(0, b * np * c));
        if let Some(d) = &d_patches {
            be.fill(d, 0.0);
        }
        be.vision_embed_bwd(d_patches.as_ref(), v.cls.grad(), v.pos.grad(), &d_emb, b, np, c);
        if let Some(d) = &d_patches {
            v.patch.bwd(be, None, d, &a.cols.slice(0, b * 3 * img * img), b * np);
        }
        ready(order.vision_embed.clone());
    }

    /// The gradient of the loss with respect to the first `b` input images, `[b, 3, image,
    /// image]` (the pixels as uploaded, i.e. after normalisation), left by
    /// [`Clip::backward_vision_to_pixels`]. Only a frozen model has it.
    pub fn pixels_grad(&self, b: usize) -> Result<T<B>> {
        let g = self.va.to_pixels.as_ref().context("only a model made by Clip::new_frozen has pixel gradients")?;
        ensure!(b > 0 && b <= self.capacity, "batch {b} outside 1..={}", self.capacity);
        let s = self.image_size();
        Ok(g.d_pixels.slice(0, b * 3 * s * s))
    }

    /// Backward of the vision tower of a frozen model ([`Clip::new_frozen`]) from
    /// [`Clip::image_embeds_grad`] down to the input pixels: overwrites
    /// [`Clip::pixels_grad`]. No parameter gradient is computed (every weight gradient output
    /// of the ops is `None`), only the activations' gradients.
    pub fn backward_vision_to_pixels(&self, b: usize) -> Result<()> {
        let g =
            self.va.to_pixels.as_ref().context("the backward to the pixels needs a model made by Clip::new_frozen")?;
        ensure!(b > 0 && b <= self.capacity, "batch {b} outside 1..={}", self.capacity);
        let be = &self.backend;
        let v = &self.vision;
        let a = &self.va;
        let (img, p, c) = (v.image, v.patch_size, v.encoder.dims.c);
        let np = (img / p) * (img / p);
        let t = np + 1;
        head_bwd(be, &a.head, &v.post_ln, &v.proj, &a.enc.d_res, b, t);
        v.encoder.backward(be, &a.enc, b, &mut |_| {});
        let pre = a.pre.rows(b * t, c);
        let d_emb = a.d_emb.slice(0, b * t * c);
        be.fill(&d_emb, 0.0);
        v.pre_ln.bwd(be, &d_emb, &a.enc.d_res.slice(0, b * t * c), &pre, &a.emb.slice(0, b * t * c), b * t);
        let d_patches = a.d_patches.slice(0, b * np * c);
        be.fill(&d_patches, 0.0);
        be.vision_embed_bwd(Some(&d_patches), None, None, &d_emb, b, np, c);
        let px = b * 3 * img * img;
        let d_cols = g.d_cols.slice(0, px);
        be.fill(&d_cols, 0.0);
        v.patch.bwd(be, Some(&d_cols), &d_patches, &a.cols.slice(0, px), b * np);
        let d_pixels = g.d_pixels.slice(0, px);
        be.fill(&d_pixels, 0.0);
        be.im2col_bwd(&d_pixels, &d_cols, b, img, p);
        Ok(())
    }

    /// Backward of the text tower from [`Clip::text_embeds_grad`], adding into `grads`.
    pub fn backward_text(&self, b: usize) {
        self.backward_text_with(b, &mut |_| {});
    }

    /// [`Clip::backward_text`], reporting finished gradient ranges as
    /// [`Clip::backward_vision_with`] does.
    pub fn backward_text_with(&self, b: usize, ready: &mut dyn FnMut(Range<usize>)) {
        let be = &self.backend;
        let order = &self.grad_order;
        let x = &self.text;
        let a = &self.ta;
        let t = self.context_len();
        let c = x.encoder.dims.c;
        head_bwd(be, &a.head, &x.final_ln, &x.proj, &a.enc.d_res, b, t);
        order.text_head.iter().for_each(|r| ready(r.clone()));
        x.encoder.backward(be, &a.enc, b, &mut |l| ready(order.text_blocks[l].clone()));
        be.token_embed_bwd(
            x.tok.grad(),
            x.pos.grad(),
            &a.enc.d_res.slice(0, b * t * c),
            &a.ids.slice(0, b * t),
            b,
            t,
            c,
        );
        ready(order.text_embed.clone());
    }

    /// The order in which a step finishes the gradient ranges.
    pub fn grad_order(&self) -> &GradOrder {
        &self.grad_order
    }

    pub fn zero_grads(&self) {
        if self.grads.is_empty() {
            return; // a frozen model: nothing to zero
        }
        self.backend.fill(&self.grads, 0.0);
    }

    /// All parameters, on the host, in `layout` order.
    pub fn params_to_host(&self) -> Result<Vec<f32>> {
        let mut v = vec![0.0; self.layout.total];
        self.backend.download_f32(&self.params, &mut v)?;
        Ok(v)
    }

    pub fn params_from_host(&self, values: &[f32]) -> Result<()> {
        self.backend.upload_f32(&self.params, values)
    }

    pub fn grads_to_host(&self) -> Result<Vec<f32>> {
        ensure!(!self.is_frozen(), "a model made by Clip::new_frozen holds no parameter gradients");
        let mut v = vec![0.0; self.layout.total];
        self.backend.download_f32(&self.grads, &mut v)?;
        Ok(v)
    }
}

/// Where `CLIPModel` pools a text: with `eos_token_id == 2` (configs from before
/// transformers 4.31, such as OpenAI's own) the position of the largest id; otherwise the
/// first occurrence of the end-of-text id, or 0 when there is none.
pub fn eos_position(row: &[i32], eos: i64) -> i32 {
    if eos == 2 {
        let mut best = 0;
        for (i, &id) in row.iter().enumerate() {
            if id > row[best] {
                best = i;
            }
        }
        best as i32
    } else {
        row.iter().position(|&id| id as i64 == eos).unwrap_or(0) as i32
    }
}

fn build_towers<B: Backend>(
    config: &ClipConfig,
    layout: &Layout,
    params: &T<B>,
    grads: &T<B>,
    trainable: &[bool],
) -> Result<(VisionTower<B>, TextTower<B>, Param<B>)> {
    // A view of one named parameter (or of `count` adjacent ones, for the packed qkv).
    let span = |first: &str, count: usize| -> Param<B> {
        let idx = layout.specs.iter().position(|s| s.name == first).expect("layout has the name");
        let specs = &layout.specs[idx..idx + count];
        let len: usize = specs.iter().map(|s| s.len).sum();
        let off = specs[0].offset;
        Param {
            value: params.slice(off, len),
            // A frozen model has no gradient buffer: its (never used) views are empty.
            grad: if grads.is_empty() { grads.clone() } else { grads.slice(off, len) },
            train: trainable[idx..idx + count].iter().any(|&t| t),
        }
    };
    let param = |name: &str| span(name, 1);
    let linear = |prefix: &str, inp: usize, out: usize, bias: bool| Linear {
        w: param(&format!("{prefix}.weight")),
        b: bias.then(|| param(&format!("{prefix}.bias"))),
        inp,
        out,
    };
    let norm = |prefix: &str, c: usize, eps: f64| Norm {
        g: param(&format!("{prefix}.weight")),
        b: param(&format!("{prefix}.bias")),
        c,
        eps: eps as f32,
    };
    let encoder = |tower: &str, c: usize, inner: usize, layers: usize, heads: usize, eps: f64, act: &str, causal| {
        let blocks = (0..layers)
            .map(|l| {
                let p = format!("{tower}.encoder.layers.{l}");
                Block {
                    ln1: norm(&format!("{p}.layer_norm1"), c, eps),
                    qkv: Linear {
                        w: span(&format!("{p}.self_attn.q_proj.weight"), 3),
                        b: Some(span(&format!("{p}.self_attn.q_proj.bias"), 3)),
                        inp: c,
                        out: 3 * c,
                    },
                    proj: linear(&format!("{p}.self_attn.out_proj"), c, c, true),
                    ln2: norm(&format!("{p}.layer_norm2"), c, eps),
                    fc1: linear(&format!("{p}.mlp.fc1"), c, inner, true),
                    fc2: linear(&format!("{p}.mlp.fc2"), inner, c, true),
                    adapter: config.adapter_dim.map(|a| {
                        (
                            linear(&format!("{p}.adapter.down_proj"), c, a, true),
                            linear(&format!("{p}.adapter.up_proj"), a, c, true),
                        )
                    }),
                }
            })
            .collect();
        Ok::<_, anyhow::Error>(Encoder {
            blocks,
            dims: Dims {
                t: 0,
                c,
                heads,
                inner,
                adapter: config.adapter_dim.unwrap_or(0),
                causal,
                act: activation(act)?,
            },
        })
    };
    let vc = &config.vision_config;
    let tc = &config.text_config;
    let pd = config.projection_dim;
    let mut venc = encoder(
        "vision_model",
        vc.hidden_size,
        vc.intermediate_size,
        vc.num_hidden_layers,
        vc.num_attention_heads,
        vc.layer_norm_eps,
        &vc.hidden_act,
        false,
    )?;
    venc.dims.t = vc.seq_len();
    let patch_in = 3 * vc.patch_size * vc.patch_size;
    let vision = VisionTower {
        patch: linear("vision_model.embeddings.patch_embedding", patch_in, vc.hidden_size, false),
        cls: param("vision_model.embeddings.class_embedding"),
        pos: param("vision_model.embeddings.position_embedding.weight"),
        pre_ln: norm("vision_model.pre_layrnorm", vc.hidden_size, vc.layer_norm_eps),
        encoder: venc,
        post_ln: norm("vision_model.post_layernorm", vc.hidden_size, vc.layer_norm_eps),
        proj: linear("visual_projection", vc.hidden_size, pd, false),
        image: vc.image_size,
        patch_size: vc.patch_size,
    };
    let mut tenc = encoder(
        "text_model",
        tc.hidden_size,
        tc.intermediate_size,
        tc.num_hidden_layers,
        tc.num_attention_heads,
        tc.layer_norm_eps,
        &tc.hidden_act,
        true,
    )?;
    tenc.dims.t = tc.max_position_embeddings;
    let text = TextTower {
        tok: param("text_model.embeddings.token_embedding.weight"),
        pos: param("text_model.embeddings.position_embedding.weight"),
        encoder: tenc,
        final_ln: norm("text_model.final_layer_norm", tc.hidden_size, tc.layer_norm_eps),
        proj: linear("text_projection", tc.hidden_size, pd, false),
        vocab: tc.vocab_size,
        eos: tc.eos_token_id,
    };
    Ok((vision, text, param("logit_scale")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_pooling_follows_transformers() {
        assert_eq!(eos_position(&[5, 9, 7, 0, 0], 7), 2);
        assert_eq!(eos_position(&[5, 9, 8, 0], 7), 0);
        // Legacy configs pool at the largest id (the end-of-text id is the largest).
        assert_eq!(eos_position(&[49406, 300, 49407, 0], 2), 2);
    }
}
