//! Host-side helpers of the contrastive loss (the loss itself is [`crate::step::InfoNceLoss`]).

/// `logits_per_image[i, j] = exp(logit_scale) * img_i . txt_j` on the host, for reports and
/// the forward/backward command (training never materialises it).
pub fn logits_per_image(img: &[f32], txt: &[f32], b: usize, d: usize, logit_scale: f32) -> Vec<f32> {
    let s = logit_scale.exp();
    let mut out = vec![0.0; b * b];
    for i in 0..b {
        for j in 0..b {
            let dot: f64 = (0..d).map(|k| img[i * d + k] as f64 * txt[j * d + k] as f64).sum();
            out[i * b + j] = (s as f64 * dot) as f32;
        }
    }
    out
}
