//! Binary cross-entropy with logits, the label fine-tuning loss: a (masked) mean over every
//! logit of `max(x, 0) - x y + log(1 + exp(-|x|))`, as `torch.nn.BCEWithLogitsLoss`, which
//! never forms `sigmoid(x)` and so stays finite for any logit. Sums in f64.

/// The weight of element `i` (1 without a mask) and their total (`n` without a mask).
fn weights(mask: Option<&[f32]>, n: usize) -> f64 {
    mask.map_or(n as f64, |m| m.iter().map(|&w| w as f64).sum())
}

/// `sum_i w_i l_i / sum_i w_i` with `w = mask` (all ones without one); 0 when no element
/// counts (every mask entry 0), so that a batch whose labels are all ignored adds nothing.
pub fn fwd(logits: &[f32], targets: &[f32], mask: Option<&[f32]>) -> f32 {
    let total = weights(mask, logits.len());
    if total == 0.0 {
        return 0.0;
    }
    let mut s = 0.0f64;
    for (i, (&x, &y)) in logits.iter().zip(targets).enumerate() {
        let w = mask.map_or(1.0, |m| m[i] as f64);
        if w != 0.0 {
            let (x, y) = (x as f64, y as f64);
            s += w * (x.max(0.0) - x * y + (-x.abs()).exp().ln_1p());
        }
    }
    (s / total) as f32
}

/// `dlogits += dloss * w_i (sigmoid(x_i) - y_i) / sum w` (nothing when no element counts).
pub fn bwd(dlogits: &mut [f32], logits: &[f32], targets: &[f32], mask: Option<&[f32]>, dloss: f32) {
    let total = weights(mask, logits.len());
    if total == 0.0 {
        return;
    }
    let c = (dloss as f64 / total) as f32;
    for (i, ((d, &x), &y)) in dlogits.iter_mut().zip(logits).zip(targets).enumerate() {
        let w = mask.map_or(1.0, |m| m[i]);
        if w != 0.0 {
            // sigmoid without overflow for large |x|.
            let s = if x >= 0.0 { 1.0 / (1.0 + (-x).exp()) } else { x.exp() / (1.0 + x.exp()) };
            *d += c * w * (s - y);
        }
    }
}
