//! The argument asserts every backend runs on an op's tensors (not `cuda::check`, which
//! compares CUDA ops with the CPU): lengths against the shapes an op is given, and that no
//! output overlaps an input or another output (what makes the CPU backend's raw slices sound,
//! and what a CUDA kernel assumes of its pointers).

use crate::backend::{Backend, InfoNceDims};
use crate::tensor::Tensor;

pub fn check_len<B: Backend>(what: &str, t: &Tensor<B>, want: usize) {
    assert_eq!(t.len(), want, "{what}: tensor of {} elements where the shape needs {want}", t.len());
}

/// Asserts that no output overlaps an input or another output.
pub fn outputs<B: Backend>(outs: &[&Tensor<B>], ins: &[&Tensor<B>]) {
    for (i, o) in outs.iter().enumerate() {
        for x in ins {
            assert!(!o.overlaps(x), "op output {o:?} overlaps input {x:?}");
        }
        for o2 in &outs[i + 1..] {
            assert!(!o.overlaps(o2), "op outputs {o:?} and {o2:?} overlap");
        }
    }
}

/// One rank's InfoNCE block: its image rows against the gathered text columns.
pub fn check_infonce<B: Backend>(dims: &InfoNceDims, img: &Tensor<B>, all_txt: &Tensor<B>) {
    assert!(
        dims.local > 0 && dims.offset + dims.local <= dims.global,
        "infonce: local rows {}+{} outside 1..={} global",
        dims.offset,
        dims.local,
        dims.global
    );
    check_len("infonce img", img, dims.local * dims.dim);
    check_len("infonce all_txt", all_txt, dims.global * dims.dim);
}

/// The lengths of a layer norm's forward tensors: `inp` and `out` of `n * c`, `mean` and
/// `rstd` of `n`, `gamma` and `beta` of `c`.
#[allow(clippy::too_many_arguments)]
pub fn check_layernorm_fwd<B: Backend>(
    out: &Tensor<B>,
    mean: &Tensor<B>,
    rstd: &Tensor<B>,
    inp: &Tensor<B>,
    gamma: &Tensor<B>,
    beta: &Tensor<B>,
    n: usize,
    c: usize,
) {
    check_len("layernorm inp", inp, n * c);
    check_len("layernorm out", out, n * c);
    check_len("layernorm mean", mean, n);
    check_len("layernorm rstd", rstd, n);
    check_len("layernorm gamma", gamma, c);
    check_len("layernorm beta", beta, c);
}

/// The lengths of a layer norm's backward tensors (the statistics as in the forward).
#[allow(clippy::too_many_arguments)]
pub fn check_layernorm_bwd<B: Backend>(
    dinp: &Tensor<B>,
    dgamma: Option<&Tensor<B>>,
    dbeta: Option<&Tensor<B>>,
    dout: &Tensor<B>,
    inp: &Tensor<B>,
    gamma: &Tensor<B>,
    mean: &Tensor<B>,
    rstd: &Tensor<B>,
    n: usize,
    c: usize,
) {
    check_len("layernorm dinp", dinp, n * c);
    check_len("layernorm dout", dout, n * c);
    check_len("layernorm inp", inp, n * c);
    check_len("layernorm mean", mean, n);
    check_len("layernorm rstd", rstd, n);
    check_len("layernorm gamma", gamma, c);
    dgamma.inspect(|t| check_len("layernorm dgamma", t, c));
    dbeta.inspect(|t| check_len("layernorm dbeta", t, c));
    let outs: Vec<&Tensor<B>> = [Some(dinp), dgamma, dbeta].into_iter().flatten().collect();
    outputs(&outs, &[dout, inp, gamma, mean, rstd]);
}

/// Aliasing of an op whose first output `out` may be its first input `a` itself (an update
/// in place, as `add` and `add_layernorm_fwd` allow) but must not overlap anything else:
/// checks `outs` (which hold `out`) against `ins` (which do not hold `a`) and `a`. Returns
/// whether the op runs in place.
pub fn in_place_or_disjoint<B: Backend>(
    out: &Tensor<B>,
    a: &Tensor<B>,
    outs: &[&Tensor<B>],
    ins: &[&Tensor<B>],
) -> bool {
    let in_place = out.overlaps(a);
    if in_place {
        assert!(
            out.offset() == a.offset() && out.len() == a.len(),
            "op output {out:?} partially overlaps its input {a:?}"
        );
        outputs(outs, ins);
    } else {
        let mut all: Vec<&Tensor<B>> = ins.to_vec();
        all.push(a);
        outputs(outs, &all);
    }
    in_place
}

/// The tensors of the BCE-with-logits loss: targets and mask as long as the logits.
pub fn check_bce<B: Backend>(logits: &Tensor<B>, targets: &Tensor<B>, mask: Option<&Tensor<B>>) {
    check_len("bce targets", targets, logits.len());
    mask.inspect(|m| check_len("bce mask", m, logits.len()));
}

/// The tensors of an AdamW update: gradient, moments and the optional bf16 copy as long as
/// the parameters; the parameters, moments and copy are outputs, the gradient an input.
pub fn check_adamw<B: Backend>(
    param: &Tensor<B>,
    grad: &Tensor<B>,
    m: &Tensor<B>,
    v: &Tensor<B>,
    copy: Option<&Tensor<B>>,
) {
    let n = param.len();
    check_len("adamw grad", grad, n);
    check_len("adamw m", m, n);
    check_len("adamw v", v, n);
    copy.inspect(|c| check_len("adamw bf16 copy", c, n));
    let mut outs = vec![param, m, v];
    outs.extend(copy);
    outputs(&outs, &[grad]);
}

/// `out[n, oc] = inp[n, c] . w[oc, c]^T + bias[oc]`: lengths and aliasing.
#[allow(clippy::too_many_arguments)]
pub fn check_linear_fwd<B: Backend>(
    out: &Tensor<B>,
    inp: &Tensor<B>,
    w: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    n: usize,
    c: usize,
    oc: usize,
) {
    check_len("linear inp", inp, n * c);
    check_len("linear w", w, oc * c);
    check_len("linear out", out, n * oc);
    bias.inspect(|b| check_len("linear bias", b, oc));
    let mut ins = vec![inp, w];
    ins.extend(bias);
    outputs(&[out], &ins);
}

/// The linear backward's gradients (each optional) against the forward's shapes.
#[allow(clippy::too_many_arguments)]
pub fn check_linear_bwd<B: Backend>(
    dinp: Option<&Tensor<B>>,
    dw: Option<&Tensor<B>>,
    dbias: Option<&Tensor<B>>,
    dout: &Tensor<B>,
    inp: &Tensor<B>,
    w: &Tensor<B>,
    n: usize,
    c: usize,
    oc: usize,
) {
    check_len("linear dout", dout, n * oc);
    check_len("linear inp", inp, n * c);
    check_len("linear w", w, oc * c);
    dinp.inspect(|t| check_len("linear dinp", t, n * c));
    dw.inspect(|t| check_len("linear dw", t, oc * c));
    dbias.inspect(|t| check_len("linear dbias", t, oc));
    let outs: Vec<&Tensor<B>> = [dinp, dw, dbias].into_iter().flatten().collect();
    outputs(&outs, &[dout, inp, w]);
}

/// The vision embedding: `b` sequences of a class token and `np` patches of width `d`.
pub fn check_vision_embed_fwd<B: Backend>(
    out: &Tensor<B>,
    patches: &Tensor<B>,
    cls: &Tensor<B>,
    pos: &Tensor<B>,
    b: usize,
    np: usize,
    d: usize,
) {
    check_len("vision embed out", out, b * (np + 1) * d);
    check_len("vision embed patches", patches, b * np * d);
    check_len("vision embed cls", cls, d);
    check_len("vision embed pos", pos, (np + 1) * d);
    outputs(&[out], &[patches, cls, pos]);
}

pub fn check_vision_embed_bwd<B: Backend>(
    dpatches: Option<&Tensor<B>>,
    dcls: Option<&Tensor<B>>,
    dpos: Option<&Tensor<B>>,
    dout: &Tensor<B>,
    b: usize,
    np: usize,
    d: usize,
) {
    check_len("vision embed dout", dout, b * (np + 1) * d);
    dpatches.inspect(|t| check_len("vision embed dpatches", t, b * np * d));
    dcls.inspect(|t| check_len("vision embed dcls", t, d));
    dpos.inspect(|t| check_len("vision embed dpos", t, (np + 1) * d));
    let outs: Vec<&Tensor<B>> = [dpatches, dcls, dpos].into_iter().flatten().collect();
    outputs(&outs, &[dout]);
}
