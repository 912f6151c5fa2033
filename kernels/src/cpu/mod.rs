//! The CPU backend: f32 throughout, `gemm` for matrix products, rayon for the rest.
//!
//! Ops run synchronously on the calling thread (parallel inside), so "enqueued in order"
//! holds trivially. Each op lives in a module of slice functions (`linear`, `attention`, ...)
//! that is also the reference the CUDA kernels are tested against; this file only maps
//! tensor handles to slices and checks lengths and aliasing.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod bce;
pub mod elementwise;
pub mod embed;
pub mod fastexp;
pub mod heap;
pub mod infonce;
pub mod l2norm;
pub mod lanes;
pub mod layernorm;
pub mod linear;

use std::cell::UnsafeCell;
use std::sync::Arc;

use anyhow::{ensure, Result};

use crate::backend::{Activation, AdamWStep, Backend, DType, InfoNceDims};
use crate::profile;
use crate::shapes::{
    check_adamw, check_bce, check_infonce, check_layernorm_bwd, check_layernorm_fwd, check_len, check_linear_bwd,
    check_linear_fwd, check_vision_embed_bwd, check_vision_embed_fwd, in_place_or_disjoint, outputs,
};
use crate::tensor::Tensor;

/// Host memory of one CPU buffer. Access goes through raw slices handed out by the
/// backend, which checks that an op's outputs never overlap its inputs.
pub enum CpuStorage {
    F32(UnsafeCell<Vec<f32>>),
    I32(UnsafeCell<Vec<i32>>),
}

// SAFETY: the backend runs ops one at a time and never hands out a mutable slice that
// overlaps another slice of the same op (checked in `outputs`); the rayon workers inside an
// op write disjoint chunks.
unsafe impl Sync for CpuStorage {}
unsafe impl Send for CpuStorage {}

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

type T = Tensor<Cpu>;

fn f32s(t: &T) -> &[f32] {
    match &**t.storage() {
        // SAFETY: see `CpuStorage`; outputs of the running op are checked disjoint from `t`.
        CpuStorage::F32(v) => unsafe { &(&*v.get())[t.offset()..t.offset() + t.len()] },
        CpuStorage::I32(_) => panic!("expected an f32 tensor, got i32"),
    }
}

#[allow(clippy::mut_from_ref)]
fn f32s_mut(t: &T) -> &mut [f32] {
    match &**t.storage() {
        // SAFETY: the caller checked with `outputs` that no other live slice overlaps `t`.
        CpuStorage::F32(v) => unsafe { &mut (&mut *v.get())[t.offset()..t.offset() + t.len()] },
        CpuStorage::I32(_) => panic!("expected an f32 tensor, got i32"),
    }
}

fn i32s(t: &T) -> &[i32] {
    match &**t.storage() {
        // SAFETY: as `f32s`.
        CpuStorage::I32(v) => unsafe { &(&*v.get())[t.offset()..t.offset() + t.len()] },
        CpuStorage::F32(_) => panic!("expected an i32 tensor, got f32"),
    }
}

fn opt_mut(t: Option<&T>) -> Option<&mut [f32]> {
    t.map(f32s_mut)
}

impl Backend for Cpu {
    type Storage = CpuStorage;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn limits(&self) -> crate::Limits {
        crate::limits::CPU
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<T> {
        let storage = match dtype {
            DType::F32 | DType::Bf16 => CpuStorage::F32(UnsafeCell::new(vec![0.0; len])),
            DType::I32 => CpuStorage::I32(UnsafeCell::new(vec![0; len])),
        };
        // The CPU computes in f32 whatever storage was asked for.
        let dtype = if dtype == DType::Bf16 { DType::F32 } else { dtype };
        Ok(Tensor::from_storage(Arc::new(storage), len, dtype))
    }

    fn upload_f32(&self, dst: &T, src: &[f32]) -> Result<()> {
        ensure!(dst.len() == src.len(), "upload of {} values into a tensor of {}", src.len(), dst.len());
        f32s_mut(dst).copy_from_slice(src);
        Ok(())
    }

    fn upload_i32(&self, dst: &T, src: &[i32]) -> Result<()> {
        ensure!(dst.len() == src.len(), "upload of {} ids into a tensor of {}", src.len(), dst.len());
        match &**dst.storage() {
            // SAFETY: no op is running (ops are synchronous on this thread).
            CpuStorage::I32(v) => unsafe {
                (&mut *v.get())[dst.offset()..dst.offset() + dst.len()].copy_from_slice(src)
            },
            CpuStorage::F32(_) => anyhow::bail!("upload_i32 into an f32 tensor"),
        }
        Ok(())
    }

    fn download_f32(&self, src: &T, dst: &mut [f32]) -> Result<()> {
        ensure!(dst.len() == src.len(), "download of a tensor of {} into {} values", src.len(), dst.len());
        dst.copy_from_slice(f32s(src));
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn fill(&self, t: &T, value: f32) {
        let _p = profile::scope("fill");
        elementwise::fill(f32s_mut(t), value);
    }

    fn copy(&self, dst: &T, src: &T) {
        let _p = profile::scope("copy");
        outputs(&[dst], &[src]);
        check_len("copy", dst, src.len());
        elementwise::copy(f32s_mut(dst), f32s(src));
    }

    fn add(&self, out: &T, a: &T, b: &T) {
        let _p = profile::scope("add");
        check_len("add a", a, out.len());
        check_len("add b", b, out.len());
        if in_place_or_disjoint(out, a, &[out], &[b]) {
            elementwise::accumulate(f32s_mut(out), f32s(b));
        } else {
            elementwise::add(f32s_mut(out), f32s(a), f32s(b));
        }
    }

    fn accumulate(&self, acc: &T, x: &T) {
        let _p = profile::scope("accumulate");
        outputs(&[acc], &[x]);
        check_len("accumulate", x, acc.len());
        elementwise::accumulate(f32s_mut(acc), f32s(x));
    }

    fn scale(&self, t: &T, s: f32) {
        let _p = profile::scope("scale");
        elementwise::scale(f32s_mut(t), s);
    }

    fn sum_squares(&self, out: &T, t: &T) {
        let _p = profile::scope("sum_squares");
        outputs(&[out], &[t]);
        f32s_mut(out)[0] += elementwise::sum_squares(f32s(t)) as f32;
    }

    fn clamp_max(&self, t: &T, max: f32) {
        let _p = profile::scope("clamp_max");
        for x in f32s_mut(t) {
            *x = x.min(max);
        }
    }

    fn linear_fwd(&self, out: &T, inp: &T, w: &T, bias: Option<&T>, n: usize, c: usize, oc: usize) {
        let _p = profile::scope("linear_fwd");
        check_linear_fwd(out, inp, w, bias, n, c, oc);
        linear::fwd(f32s_mut(out), f32s(inp), f32s(w), bias.map(f32s), n, c, oc);
    }

    fn linear_bwd(
        &self,
        dinp: Option<&T>,
        dw: Option<&T>,
        dbias: Option<&T>,
        dout: &T,
        inp: &T,
        w: &T,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        let _p = profile::scope("linear_bwd");
        check_linear_bwd(dinp, dw, dbias, dout, inp, w, n, c, oc);
        linear::bwd(opt_mut(dinp), opt_mut(dw), opt_mut(dbias), f32s(dout), f32s(inp), f32s(w), n, c, oc);
    }

    fn layernorm_fwd(&self, out: &T, mean: &T, rstd: &T, inp: &T, gamma: &T, beta: &T, n: usize, c: usize, eps: f32) {
        let _p = profile::scope("layernorm_fwd");
        check_layernorm_fwd(out, mean, rstd, inp, gamma, beta, n, c);
        outputs(&[out, mean, rstd], &[inp, gamma, beta]);
        layernorm::fwd(f32s_mut(out), f32s_mut(mean), f32s_mut(rstd), f32s(inp), f32s(gamma), f32s(beta), n, c, eps);
    }

    fn add_layernorm_fwd(
        &self,
        out: &T,
        x: &T,
        mean: &T,
        rstd: &T,
        a: &T,
        b: &T,
        gamma: &T,
        beta: &T,
        n: usize,
        c: usize,
        eps: f32,
    ) {
        let _p = profile::scope("add_layernorm_fwd");
        check_layernorm_fwd(out, mean, rstd, x, gamma, beta, n, c);
        check_len("add+layernorm a", a, n * c);
        check_len("add+layernorm b", b, n * c);
        let in_place = in_place_or_disjoint(x, a, &[x, out, mean, rstd], &[b, gamma, beta]);
        let a = (!in_place).then(|| f32s(a));
        let (g, be) = (f32s(gamma), f32s(beta));
        layernorm::add_fwd(f32s_mut(out), f32s_mut(x), f32s_mut(mean), f32s_mut(rstd), a, f32s(b), g, be, n, c, eps);
    }

    fn layernorm_bwd(
        &self,
        dinp: &T,
        dgamma: Option<&T>,
        dbeta: Option<&T>,
        dout: &T,
        inp: &T,
        gamma: &T,
        mean: &T,
        rstd: &T,
        n: usize,
        c: usize,
    ) {
        let _p = profile::scope("layernorm_bwd");
        check_layernorm_bwd(dinp, dgamma, dbeta, dout, inp, gamma, mean, rstd, n, c);
        layernorm::bwd(
            f32s_mut(dinp),
            opt_mut(dgamma),
            opt_mut(dbeta),
            f32s(dout),
            f32s(inp),
            f32s(gamma),
            f32s(mean),
            f32s(rstd),
            n,
            c,
        );
    }

    fn l2norm_fwd(&self, out: &T, norm: &T, inp: &T, n: usize, d: usize) {
        let _p = profile::scope("l2norm_fwd");
        check_len("l2norm inp", inp, n * d);
        check_len("l2norm out", out, n * d);
        check_len("l2norm norm", norm, n);
        outputs(&[out, norm], &[inp]);
        l2norm::fwd(f32s_mut(out), f32s_mut(norm), f32s(inp), n, d);
    }

    fn l2norm_bwd(&self, dinp: &T, dout: &T, out: &T, norm: &T, n: usize, d: usize) {
        let _p = profile::scope("l2norm_bwd");
        check_len("l2norm dinp", dinp, n * d);
        check_len("l2norm dout", dout, n * d);
        outputs(&[dinp], &[dout, out, norm]);
        l2norm::bwd(f32s_mut(dinp), f32s(dout), f32s(out), f32s(norm), n, d);
    }

    fn act_fwd(&self, kind: Activation, out: &T, inp: &T) {
        let _p = profile::scope("act_fwd");
        check_len("activation out", out, inp.len());
        outputs(&[out], &[inp]);
        activation::fwd(kind, f32s_mut(out), f32s(inp));
    }

    fn act_bwd(&self, kind: Activation, dinp: &T, dout: &T, inp: &T) {
        let _p = profile::scope("act_bwd");
        check_len("activation dinp", dinp, inp.len());
        check_len("activation dout", dout, inp.len());
        outputs(&[dinp], &[dout, inp]);
        activation::bwd(kind, f32s_mut(dinp), f32s(dout), f32s(inp));
    }

    fn attention_saved_len(&self, b: usize, t: usize, h: usize) -> usize {
        b * h * t * t
    }

    fn attention_fwd(&self, out: &T, saved: &T, qkv: &T, b: usize, t: usize, h: usize, hd: usize, causal: bool) {
        let _p = profile::scope("attention_fwd");
        check_len("attention qkv", qkv, b * t * 3 * h * hd);
        check_len("attention out", out, b * t * h * hd);
        check_len("attention saved", saved, self.attention_saved_len(b, t, h));
        outputs(&[out, saved], &[qkv]);
        attention::fwd(f32s_mut(out), f32s_mut(saved), f32s(qkv), b, t, h, hd, causal);
    }

    fn attention_bwd(
        &self,
        dqkv: &T,
        dout: &T,
        qkv: &T,
        out: &T,
        saved: &T,
        b: usize,
        t: usize,
        h: usize,
        hd: usize,
        causal: bool,
    ) {
        let _p = profile::scope("attention_bwd");
        check_len("attention dqkv", dqkv, b * t * 3 * h * hd);
        check_len("attention dout", dout, b * t * h * hd);
        outputs(&[dqkv], &[dout, qkv, out, saved]);
        attention::bwd(f32s_mut(dqkv), f32s(dout), f32s(qkv), f32s(out), f32s(saved), b, t, h, hd, causal);
    }

    fn im2col(&self, cols: &T, pixels: &T, b: usize, img: usize, p: usize) {
        let _p = profile::scope("im2col");
        assert!(img.is_multiple_of(p), "image size {img} is not a multiple of the patch size {p}");
        check_len("im2col pixels", pixels, b * 3 * img * img);
        check_len("im2col cols", cols, b * 3 * img * img);
        outputs(&[cols], &[pixels]);
        embed::im2col(f32s_mut(cols), f32s(pixels), b, img, p);
    }

    fn im2col_bwd(&self, dpixels: &T, dcols: &T, b: usize, img: usize, p: usize) {
        let _p = profile::scope("im2col_bwd");
        assert!(img.is_multiple_of(p), "image size {img} is not a multiple of the patch size {p}");
        check_len("im2col_bwd dpixels", dpixels, b * 3 * img * img);
        check_len("im2col_bwd dcols", dcols, b * 3 * img * img);
        outputs(&[dpixels], &[dcols]);
        embed::im2col_bwd(f32s_mut(dpixels), f32s(dcols), b, img, p);
    }

    fn vision_embed_fwd(&self, out: &T, patches: &T, cls: &T, pos: &T, b: usize, np: usize, d: usize) {
        let _p = profile::scope("vision_embed_fwd");
        check_vision_embed_fwd(out, patches, cls, pos, b, np, d);
        embed::vision_fwd(f32s_mut(out), f32s(patches), f32s(cls), f32s(pos), b, np, d);
    }

    fn vision_embed_bwd(
        &self,
        dpatches: Option<&T>,
        dcls: Option<&T>,
        dpos: Option<&T>,
        dout: &T,
        b: usize,
        np: usize,
        d: usize,
    ) {
        let _p = profile::scope("vision_embed_bwd");
        check_vision_embed_bwd(dpatches, dcls, dpos, dout, b, np, d);
        embed::vision_bwd(opt_mut(dpatches), opt_mut(dcls), opt_mut(dpos), f32s(dout), b, np, d);
    }

    fn token_embed_fwd(&self, out: &T, ids: &T, wte: &T, wpe: &T, b: usize, t: usize, d: usize) {
        let _p = profile::scope("token_embed_fwd");
        check_len("token embed out", out, b * t * d);
        check_len("token embed ids", ids, b * t);
        assert!(wpe.len() >= t * d, "position embedding has fewer than {t} rows");
        outputs(&[out], &[wte, wpe]);
        embed::token_fwd(f32s_mut(out), i32s(ids), f32s(wte), f32s(wpe), b, t, d);
    }

    fn token_embed_bwd(&self, dwte: Option<&T>, dwpe: Option<&T>, dout: &T, ids: &T, b: usize, t: usize, d: usize) {
        let _p = profile::scope("token_embed_bwd");
        check_len("token embed dout", dout, b * t * d);
        check_len("token embed ids", ids, b * t);
        let outs: Vec<&T> = [dwte, dwpe].into_iter().flatten().collect();
        outputs(&outs, &[dout]);
        embed::token_bwd(opt_mut(dwte), opt_mut(dwpe), f32s(dout), i32s(ids), b, t, d);
    }

    fn gather_rows(&self, out: &T, inp: &T, index: &T, b: usize, t: usize, d: usize) {
        let _p = profile::scope("gather_rows");
        check_len("gather out", out, b * d);
        check_len("gather inp", inp, b * t * d);
        check_len("gather index", index, b);
        outputs(&[out], &[inp]);
        embed::gather_rows(f32s_mut(out), f32s(inp), i32s(index), b, t, d);
    }

    fn gather_rows_bwd(&self, dinp: &T, dout: &T, index: &T, b: usize, t: usize, d: usize) {
        let _p = profile::scope("gather_rows_bwd");
        check_len("gather dinp", dinp, b * t * d);
        check_len("gather dout", dout, b * d);
        outputs(&[dinp], &[dout]);
        embed::gather_rows_bwd(f32s_mut(dinp), f32s(dout), i32s(index), b, t, d);
    }

    fn infonce_block_fwd(
        &self,
        row_lse: &T,
        pos: &T,
        col_max: &T,
        col_sum: &T,
        img: &T,
        all_txt: &T,
        logit_scale: &T,
        dims: InfoNceDims,
    ) {
        let _p = profile::scope("infonce_block_fwd");
        check_infonce(&dims, img, all_txt);
        check_len("infonce row_lse", row_lse, dims.local);
        check_len("infonce pos", pos, dims.local);
        check_len("infonce col_max", col_max, dims.global);
        check_len("infonce col_sum", col_sum, dims.global);
        check_len("infonce logit_scale", logit_scale, 1);
        outputs(&[row_lse, pos, col_max, col_sum], &[img, all_txt, logit_scale]);
        infonce::block_fwd(
            f32s_mut(row_lse),
            f32s_mut(pos),
            f32s_mut(col_max),
            f32s_mut(col_sum),
            f32s(img),
            f32s(all_txt),
            f32s(logit_scale)[0],
            dims,
        );
    }

    fn infonce_col_rescale(&self, col_sum: &T, col_max: &T, global_max: &T) {
        let _p = profile::scope("infonce_col_rescale");
        check_len("infonce col_max", col_max, col_sum.len());
        check_len("infonce global_max", global_max, col_sum.len());
        outputs(&[col_sum], &[col_max, global_max]);
        infonce::col_rescale(f32s_mut(col_sum), f32s(col_max), f32s(global_max));
    }

    fn infonce_block_loss(
        &self,
        loss: &T,
        col_lse: &T,
        row_lse: &T,
        pos: &T,
        global_max: &T,
        col_sum: &T,
        dims: InfoNceDims,
    ) {
        let _p = profile::scope("infonce_block_loss");
        check_len("infonce loss", loss, 1);
        for (w, t, n) in [
            ("col_lse", col_lse, dims.global),
            ("row_lse", row_lse, dims.local),
            ("pos", pos, dims.local),
            ("global_max", global_max, dims.global),
            ("col_sum", col_sum, dims.global),
        ] {
            check_len(&format!("infonce {w}"), t, n);
        }
        assert!(dims.offset + dims.local <= dims.global, "infonce: rows {dims:?} beyond the global batch");
        outputs(&[loss, col_lse], &[row_lse, pos, global_max, col_sum]);
        let l = infonce::block_loss(f32s_mut(col_lse), f32s(row_lse), f32s(pos), f32s(global_max), f32s(col_sum), dims);
        f32s_mut(loss)[0] = l;
    }

    fn infonce_block_bwd(
        &self,
        d_img: &T,
        d_all_txt: &T,
        d_logit_scale: Option<&T>,
        dloss: f32,
        img: &T,
        all_txt: &T,
        logit_scale: &T,
        row_lse: &T,
        col_lse: &T,
        dims: InfoNceDims,
    ) {
        let _p = profile::scope("infonce_block_bwd");
        check_infonce(&dims, img, all_txt);
        check_infonce(&dims, d_img, d_all_txt);
        check_len("infonce row_lse", row_lse, dims.local);
        check_len("infonce col_lse", col_lse, dims.global);
        let mut outs = vec![d_img, d_all_txt];
        outs.extend(d_logit_scale);
        outputs(&outs, &[img, all_txt, logit_scale, row_lse, col_lse]);
        let d_scale = infonce::block_bwd(
            f32s_mut(d_img),
            f32s_mut(d_all_txt),
            dloss,
            f32s(img),
            f32s(all_txt),
            f32s(logit_scale)[0],
            f32s(row_lse),
            f32s(col_lse),
            dims,
        );
        if let Some(t) = d_logit_scale {
            f32s_mut(t)[0] += d_scale;
        }
    }

    fn bce_with_logits_fwd(&self, loss: &T, logits: &T, targets: &T, mask: Option<&T>) {
        let _p = profile::scope("bce_with_logits_fwd");
        check_bce(logits, targets, mask);
        check_len("bce loss", loss, 1);
        let mut ins = vec![logits, targets];
        ins.extend(mask);
        outputs(&[loss], &ins);
        f32s_mut(loss)[0] = bce::fwd(f32s(logits), f32s(targets), mask.map(f32s));
    }

    fn bce_with_logits_bwd(&self, dlogits: &T, logits: &T, targets: &T, mask: Option<&T>, dloss: f32) {
        let _p = profile::scope("bce_with_logits_bwd");
        check_bce(logits, targets, mask);
        check_len("bce dlogits", dlogits, logits.len());
        let mut ins = vec![logits, targets];
        ins.extend(mask);
        outputs(&[dlogits], &ins);
        bce::bwd(f32s_mut(dlogits), f32s(logits), f32s(targets), mask.map(f32s), dloss);
    }

    fn adamw_with_bf16_copy(&self, param: &T, grad: &T, m: &T, v: &T, copy: Option<&T>, hp: AdamWStep) {
        let _p = profile::scope("adamw");
        check_adamw(param, grad, m, v, copy);
        adamw::step_with_copy(f32s_mut(param), f32s(grad), f32s_mut(m), f32s_mut(v), opt_mut(copy), hp);
    }
}
