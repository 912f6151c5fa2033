//! The backend contract: buffers, transfers and every op the CLIP towers need.
//!
//! Conventions, shared by every implementation:
//! - tensors are row-major; dimensions are given explicitly and checked against lengths;
//! - linear weights are `[out, in]` (the Hugging Face layout);
//! - forward ops overwrite their outputs; backward ops **add** into gradient outputs
//!   (`Option` gradient outputs are skipped when `None`, e.g. for frozen weights);
//! - an output never overlaps an input of the same op (implementations may assert it).

use anyhow::Result;

use crate::tensor::Tensor;

/// Storage type of a buffer. `Bf16` is a request the CPU backend serves in f32: on CUDA,
/// activations and matrix-unit copies of weights live in bf16, master weights in f32.
/// Statistics that ops save for their backward (layer-norm mean and 1/std, the attention
/// state, InfoNCE log-sum-exps, L2 norms), the loss and the logit scale are always `F32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    I32,
}

/// The MLP activation of a tower (`hidden_act` in the Hugging Face config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// The exact GELU, `x * Phi(x)` with the error function (`"gelu"` in transformers).
    Gelu,
}

/// Sizes of one rank's share of the distributed InfoNCE loss.
///
/// The rank holds `local` rows of image (and text) features; the gathered text features of
/// all ranks hold `global` rows, and this rank's rows start at row `offset` of them, so the
/// positive pair of local image `i` is global text column `offset + i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InfoNceDims {
    pub local: usize,
    pub global: usize,
    pub dim: usize,
    pub offset: usize,
}

/// Hyper-parameters of one AdamW update (decoupled weight decay, bias-corrected moments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for the bias corrections.
    pub step: u64,
}

pub trait Backend: Sized + 'static {
    /// The buffer a [`Tensor`] handle points into.
    type Storage;

    fn name(&self) -> &'static str;

    /// The shapes and storage types this backend's ops accept.
    fn limits(&self) -> crate::Limits;

    // ---------------------------------------------------------------- memory and transfers

    /// A new zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize, dtype: DType) -> Result<Tensor<Self>>;
    fn upload_f32(&self, dst: &Tensor<Self>, src: &[f32]) -> Result<()>;
    fn upload_i32(&self, dst: &Tensor<Self>, src: &[i32]) -> Result<()>;
    /// Waits for every enqueued op touching `src`, then copies it to the host.
    fn download_f32(&self, src: &Tensor<Self>, dst: &mut [f32]) -> Result<()>;
    /// Waits for every enqueued op.
    fn synchronize(&self) -> Result<()>;

    // ---------------------------------------------------------------- elementwise

    fn fill(&self, t: &Tensor<Self>, value: f32);
    fn copy(&self, dst: &Tensor<Self>, src: &Tensor<Self>);
    /// `out = a + b` (the residual add). `out` may be `a` itself.
    fn add(&self, out: &Tensor<Self>, a: &Tensor<Self>, b: &Tensor<Self>);
    /// `acc += x`.
    fn accumulate(&self, acc: &Tensor<Self>, x: &Tensor<Self>);
    /// `t *= s`.
    fn scale(&self, t: &Tensor<Self>, s: f32);
    /// `out[0] += sum(t^2)`, in f32 with a wide accumulator.
    fn sum_squares(&self, out: &Tensor<Self>, t: &Tensor<Self>);
    /// `t = min(t, max)` elementwise (the logit-scale clamp).
    fn clamp_max(&self, t: &Tensor<Self>, max: f32);

    // ---------------------------------------------------------------- linear layers

    /// `out[n, oc] = inp[n, c] . w[oc, c]^T + bias[oc]`.
    #[allow(clippy::too_many_arguments)]
    fn linear_fwd(
        &self,
        out: &Tensor<Self>,
        inp: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        n: usize,
        c: usize,
        oc: usize,
    );
    /// `dinp += dout . w`, `dw += dout^T . inp`, `dbias += sum_rows(dout)`.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        dinp: Option<&Tensor<Self>>,
        dw: Option<&Tensor<Self>>,
        dbias: Option<&Tensor<Self>>,
        dout: &Tensor<Self>,
        inp: &Tensor<Self>,
        w: &Tensor<Self>,
        n: usize,
        c: usize,
        oc: usize,
    );

    // ---------------------------------------------------------------- normalisation

    /// Layer norm over the last dimension `c` of `n` rows; saves `mean[n]` and `rstd[n]`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_fwd(
        &self,
        out: &Tensor<Self>,
        mean: &Tensor<Self>,
        rstd: &Tensor<Self>,
        inp: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        n: usize,
        c: usize,
        eps: f32,
    );
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &self,
        dinp: &Tensor<Self>,
        dgamma: Option<&Tensor<Self>>,
        dbeta: Option<&Tensor<Self>>,
        dout: &Tensor<Self>,
        inp: &Tensor<Self>,
        gamma: &Tensor<Self>,
        mean: &Tensor<Self>,
        rstd: &Tensor<Self>,
        n: usize,
        c: usize,
    );
    /// Layer norm fused with the residual add before it (pre-LN blocks: `x = x + attn;
    /// h = ln2(x)`): writes `x = a + b`, then `out = LN(x)` over rows of `c`, saving `mean[n]`
    /// and `rstd[n]` as [`Backend::layernorm_fwd`] does. `x` is the layer norm's input that the
    /// backward reads (on CUDA it is stored in `x`'s dtype and normalised as stored). `x` may
    /// be `a` itself (the residual add in place); no other output may overlap an input.
    #[allow(clippy::too_many_arguments)]
    fn add_layernorm_fwd(
        &self,
        out: &Tensor<Self>,
        x: &Tensor<Self>,
        mean: &Tensor<Self>,
        rstd: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        n: usize,
        c: usize,
        eps: f32,
    );
    /// Backward of [`Backend::add_layernorm_fwd`]. A sum hands its gradient unchanged to both
    /// addends, so the residual stream needs one gradient buffer: `dx` holds, on entry, the
    /// gradient that the other readers of `x` added into it, and receives the layer norm's
    /// input gradient, added as every backward does; it is then the gradient of `a` and of
    /// `b` alike. `dgamma` and `dbeta` as in [`Backend::layernorm_bwd`], which this is.
    #[allow(clippy::too_many_arguments)]
    fn add_layernorm_bwd(
        &self,
        dx: &Tensor<Self>,
        dgamma: Option<&Tensor<Self>>,
        dbeta: Option<&Tensor<Self>>,
        dout: &Tensor<Self>,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        mean: &Tensor<Self>,
        rstd: &Tensor<Self>,
        n: usize,
        c: usize,
    ) {
        self.layernorm_bwd(dx, dgamma, dbeta, dout, x, gamma, mean, rstd, n, c);
    }
    /// `out[i] = inp[i] / ||inp[i]||_2` for `n` rows of `d`; saves `norm[n]`.
    fn l2norm_fwd(&self, out: &Tensor<Self>, norm: &Tensor<Self>, inp: &Tensor<Self>, n: usize, d: usize);
    /// Uses the forward's output `out` and `norm`.
    #[allow(clippy::too_many_arguments)]
    fn l2norm_bwd(
        &self,
        dinp: &Tensor<Self>,
        dout: &Tensor<Self>,
        out: &Tensor<Self>,
        norm: &Tensor<Self>,
        n: usize,
        d: usize,
    );

    // ---------------------------------------------------------------- activations

    fn act_fwd(&self, kind: Activation, out: &Tensor<Self>, inp: &Tensor<Self>);
    fn act_bwd(&self, kind: Activation, dinp: &Tensor<Self>, dout: &Tensor<Self>, inp: &Tensor<Self>);

    // ---------------------------------------------------------------- attention

    /// Elements of the per-layer state the attention forward saves for its backward
    /// (the CPU keeps the probabilities, `b*h*t*t`; a flash kernel keeps `b*h*t` log-sum-exps).
    fn attention_saved_len(&self, b: usize, t: usize, h: usize) -> usize;
    /// Multi-head attention on packed projections: `qkv[b, t, 3*h*hd]` holds q, k and v (each
    /// `[h, hd]` per token, in that order), `out[b, t, h*hd]`; scores scaled by `hd^-0.5`,
    /// softmax in f32 with the row maximum subtracted, optionally causal.
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(
        &self,
        out: &Tensor<Self>,
        saved: &Tensor<Self>,
        qkv: &Tensor<Self>,
        b: usize,
        t: usize,
        h: usize,
        hd: usize,
        causal: bool,
    );
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dqkv: &Tensor<Self>,
        dout: &Tensor<Self>,
        qkv: &Tensor<Self>,
        out: &Tensor<Self>,
        saved: &Tensor<Self>,
        b: usize,
        t: usize,
        h: usize,
        hd: usize,
        causal: bool,
    );

    // ---------------------------------------------------------------- embeddings and pooling

    /// Patch extraction for a convolution with stride = kernel = `p`:
    /// `cols[b, (img/p)^2, 3*p*p]` from `pixels[b, 3, img, img]`, columns ordered
    /// (channel, row, col) to match a `[hidden, 3, p, p]` weight read as `[hidden, 3*p*p]`.
    fn im2col(&self, cols: &Tensor<Self>, pixels: &Tensor<Self>, b: usize, img: usize, p: usize);
    /// The backward of [`Backend::im2col`]: `dpixels[b, 3, img, img] += col2im(dcols)`, the
    /// gradient of the patch columns scattered back onto the pixels they were read from (the
    /// gradient of an image with respect to its pixels, e.g. for optimising an input).
    fn im2col_bwd(&self, dpixels: &Tensor<Self>, dcols: &Tensor<Self>, b: usize, img: usize, p: usize);
    /// `out[b, 0] = cls + pos[0]`, `out[b, 1 + i] = patches[b, i] + pos[1 + i]`.
    #[allow(clippy::too_many_arguments)]
    fn vision_embed_fwd(
        &self,
        out: &Tensor<Self>,
        patches: &Tensor<Self>,
        cls: &Tensor<Self>,
        pos: &Tensor<Self>,
        b: usize,
        np: usize,
        d: usize,
    );
    #[allow(clippy::too_many_arguments)]
    fn vision_embed_bwd(
        &self,
        dpatches: Option<&Tensor<Self>>,
        dcls: Option<&Tensor<Self>>,
        dpos: Option<&Tensor<Self>>,
        dout: &Tensor<Self>,
        b: usize,
        np: usize,
        d: usize,
    );
    /// `out[b, t] = wte[ids[b, t]] + wpe[t]` (`ids` is an `I32` tensor).
    #[allow(clippy::too_many_arguments)]
    fn token_embed_fwd(
        &self,
        out: &Tensor<Self>,
        ids: &Tensor<Self>,
        wte: &Tensor<Self>,
        wpe: &Tensor<Self>,
        b: usize,
        t: usize,
        d: usize,
    );
    #[allow(clippy::too_many_arguments)]
    fn token_embed_bwd(
        &self,
        dwte: Option<&Tensor<Self>>,
        dwpe: Option<&Tensor<Self>>,
        dout: &Tensor<Self>,
        ids: &Tensor<Self>,
        b: usize,
        t: usize,
        d: usize,
    );
    /// `out[i] = inp[i, index[i]]` for `b` sequences of `t` rows of `d` (`index` is `I32`):
    /// class-token pooling (index 0) and end-of-text pooling.
    #[allow(clippy::too_many_arguments)]
    fn gather_rows(&self, out: &Tensor<Self>, inp: &Tensor<Self>, index: &Tensor<Self>, b: usize, t: usize, d: usize);
    #[allow(clippy::too_many_arguments)]
    fn gather_rows_bwd(
        &self,
        dinp: &Tensor<Self>,
        dout: &Tensor<Self>,
        index: &Tensor<Self>,
        b: usize,
        t: usize,
        d: usize,
    );

    // ---------------------------------------------------------------- the contrastive loss

    /// The forward of this rank's similarity block `S = s * img . all_txt^T` (`local x
    /// global`, `s = exp(logit_scale[0])`), never held whole. Row i of `S` is local image i
    /// against every text; column j is text j against this rank's images only. Writes the row
    /// log-sum-exps `row_lse[local]` (complete), the positive logits `pos[local]`
    /// (`S[i, offset + i]`), and per column the maximum over the local rows `col_max[global]`
    /// and the sum `col_sum[global]` of `exp(S_ij - col_max_j)` over them: the caller combines
    /// the column statistics across ranks (all-reduce the maxima into `global_max`,
    /// [`Backend::infonce_col_rescale`], all-reduce the sums), then
    /// [`Backend::infonce_block_loss`].
    #[allow(clippy::too_many_arguments)]
    fn infonce_block_fwd(
        &self,
        row_lse: &Tensor<Self>,
        pos: &Tensor<Self>,
        col_max: &Tensor<Self>,
        col_sum: &Tensor<Self>,
        img: &Tensor<Self>,
        all_txt: &Tensor<Self>,
        logit_scale: &Tensor<Self>,
        dims: InfoNceDims,
    );
    /// `col_sum[j] *= exp(col_max[j] - global_max[j])` in place (`global[j]` the maximum over
    /// the ranks of their `col_max[j]`): the local column sums on the common scale, ready to
    /// be summed over the ranks.
    fn infonce_col_rescale(&self, col_sum: &Tensor<Self>, col_max: &Tensor<Self>, global_max: &Tensor<Self>);
    /// From the column statistics combined over the ranks (`global_max`, and `col_sum` summed
    /// after [`Backend::infonce_col_rescale`]): writes the column log-sum-exps
    /// `col_lse[j] = global_max[j] + ln(col_sum[j])` (`global`) and this rank's share of the
    /// symmetric loss,
    /// `loss[0] = sum_i (row_lse_i - pos_i + col_lse_{offset+i} - pos_i) / (2 * global)`,
    /// so that the global mean loss of both directions is the sum over ranks.
    #[allow(clippy::too_many_arguments)]
    fn infonce_block_loss(
        &self,
        loss: &Tensor<Self>,
        col_lse: &Tensor<Self>,
        row_lse: &Tensor<Self>,
        pos: &Tensor<Self>,
        global_max: &Tensor<Self>,
        col_sum: &Tensor<Self>,
        dims: InfoNceDims,
    );
    /// Gradients of `dloss * loss` (summed over ranks), recomputing each tile of the block
    /// once for both directions: with
    /// `G_ij = dloss * (exp(S_ij - row_lse_i) + exp(S_ij - col_lse_j) - 2 [j == offset + i])
    /// / (2 * global)`, adds `s G . all_txt` into `d_img[local, dim]`, `s G^T . img` into
    /// `d_all_txt[global, dim]` (which the caller reduce-scatters to the texts' owners) and
    /// `sum G_ij S_ij` into `d_logit_scale[0]`.
    #[allow(clippy::too_many_arguments)]
    fn infonce_block_bwd(
        &self,
        d_img: &Tensor<Self>,
        d_all_txt: &Tensor<Self>,
        d_logit_scale: Option<&Tensor<Self>>,
        dloss: f32,
        img: &Tensor<Self>,
        all_txt: &Tensor<Self>,
        logit_scale: &Tensor<Self>,
        row_lse: &Tensor<Self>,
        col_lse: &Tensor<Self>,
        dims: InfoNceDims,
    );

    // ---------------------------------------------------------------- the label loss

    /// Binary cross-entropy with logits (the label fine-tuning loss, as
    /// `torch.nn.BCEWithLogitsLoss`): `loss[0] = sum_i w_i l_i / sum_i w_i` with
    /// `l_i = max(x_i, 0) - x_i y_i + log(1 + exp(-|x_i|))` over every element of `logits`,
    /// targets `y` in [0, 1], and `w = mask` (1 or 0: a 0 leaves an element out of the mean,
    /// the `ignore` label policy) or all ones without a mask. 0 when no element counts.
    fn bce_with_logits_fwd(
        &self,
        loss: &Tensor<Self>,
        logits: &Tensor<Self>,
        targets: &Tensor<Self>,
        mask: Option<&Tensor<Self>>,
    );
    /// `dlogits += dloss * w_i (sigmoid(x_i) - y_i) / sum_i w_i` (nothing when no element counts).
    fn bce_with_logits_bwd(
        &self,
        dlogits: &Tensor<Self>,
        logits: &Tensor<Self>,
        targets: &Tensor<Self>,
        mask: Option<&Tensor<Self>>,
        dloss: f32,
    );

    // ---------------------------------------------------------------- optimiser

    /// One AdamW update of `param` in place (moments `m`, `v` updated too):
    /// `param -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * param)`.
    fn adamw(&self, param: &Tensor<Self>, grad: &Tensor<Self>, m: &Tensor<Self>, v: &Tensor<Self>, hp: AdamWStep) {
        self.adamw_with_bf16_copy(param, grad, m, v, None, hp);
    }
    /// [`Backend::adamw`] that also writes the updated weights, rounded to nearest even bf16,
    /// into `copy` (a `Bf16` tensor as long as `param`): in the same pass over the f32 master
    /// weights, the copy that the matrix units read. The CPU stores bf16 tensors in f32, so
    /// its copy holds the f32 values the weights round to.
    fn adamw_with_bf16_copy(
        &self,
        param: &Tensor<Self>,
        grad: &Tensor<Self>,
        m: &Tensor<Self>,
        v: &Tensor<Self>,
        copy: Option<&Tensor<Self>>,
        hp: AdamWStep,
    );
}

/// The per-step constants of an AdamW update, computed once on the host (the bias
/// corrections in f64: `beta2^t` for `t` in the tens of thousands is where f32 drifts).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConsts {
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_sqrt_bc2: f32,
}

impl AdamWConsts {
    pub fn new(hp: AdamWStep) -> Self {
        assert!(hp.step >= 1, "AdamW step numbers start at 1 (got 0)");
        let t = hp.step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
        Self {
            decay: 1.0 - hp.lr * hp.weight_decay,
            step_size: (hp.lr as f64 / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
        }
    }
}
