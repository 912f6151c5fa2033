//! What a [`Clip`](crate::Clip) holds in memory, from its config alone: the parameters, their
//! gradients and AdamW's moments (f32 each), and the activations [`Clip::new`](crate::Clip::new)
//! allocates for a batch capacity, tensor by tensor as it allocates them. For the estimator of
//! a cluster run (`coordinator estimate`), where building the model would need the memory it
//! is asked about. `tests/memory_model.rs` holds this account to the CPU backend's real
//! allocations, so a change to one without the other fails.

use crate::config::ClipConfig;
use crate::params::Layout;

/// Bytes per element of each storage a backend uses, and its attention's saved state.
#[derive(Clone, Copy, Debug)]
pub struct Storage {
    /// Activations the model asks for as bf16 (the CPU keeps them in f32).
    pub bf16: usize,
    /// Values of attention's saved state for `(batch, tokens, heads)`
    /// (`Backend::attention_saved_len`: the CPU keeps the probabilities, CUDA a log-sum-exp
    /// per row).
    pub attention_saved: fn(usize, usize, usize) -> usize,
}

/// The CUDA backend's storage.
pub const CUDA: Storage = Storage { bf16: 2, attention_saved: |b, t, h| b * h * t };
/// The CPU backend's storage.
pub const CPU: Storage = Storage { bf16: 4, attention_saved: |b, t, h| b * h * t * t };

/// The model's parameter count (every parameter of the layout, trainable or not).
pub fn parameters(config: &ClipConfig) -> usize {
    Layout::new(config).total
}

/// Bytes of the parameters, their gradients and AdamW's two moments (f32 each).
pub fn parameter_state_bytes(config: &ClipConfig) -> ParameterBytes {
    let p = parameters(config) * 4;
    ParameterBytes { weights: p, gradients: p, optimizer: 2 * p }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterBytes {
    pub weights: usize,
    pub gradients: usize,
    pub optimizer: usize,
}

/// Bytes of the activations and backward scratch a model of `capacity` pairs allocates.
pub fn activation_bytes(config: &ClipConfig, capacity: usize, s: Storage) -> usize {
    let (f32b, i32b, bf) = (4, 4, s.bf16);
    let vc = &config.vision_config;
    let tc = &config.text_config;
    let pd = config.projection_dim;
    let (cv, np) = (vc.hidden_size, vc.num_patches());
    let pixels = capacity * 3 * vc.image_size * vc.image_size;
    let norm = |n: usize, c: usize| n * c * bf + 2 * n * f32b;
    let head = |b: usize, c: usize| {
        b * i32b + b * c * bf + norm(b, c) + 3 * b * pd * f32b + b * f32b + b * pd * f32b + 2 * b * c * bf
    };
    let adapter = config.adapter_dim.unwrap_or(0);
    let encoder = |t: usize, c: usize, heads: usize, inner: usize, layers: usize| {
        let n = capacity * t;
        let with_adapter = if adapter > 0 { 1 } else { 0 };
        let block = norm(n, c)
            + n * 3 * c * bf
            + (s.attention_saved)(capacity, t, heads) * f32b
            + 2 * n * c * bf
            + norm(n, c)
            + 2 * n * inner * bf
            + with_adapter * (n * c + 2 * n * adapter) * bf;
        let res = (layers + 1) * n * c * bf;
        let scratch = (3 * n * c + n * 3 * c + 2 * n * inner + with_adapter * 2 * n * adapter) * bf;
        layers * block + res + scratch
    };
    let t_vis = np + 1;
    let vision = pixels * f32b
        + pixels * bf
        + capacity * np * cv * bf
        + capacity * t_vis * cv * bf
        + norm(capacity * t_vis, cv)
        + encoder(t_vis, cv, vc.num_attention_heads, vc.intermediate_size, vc.num_hidden_layers)
        + head(capacity, cv)
        + capacity * t_vis * cv * bf
        + capacity * np * cv * bf;
    let t_txt = tc.max_position_embeddings;
    let text = capacity * t_txt * i32b
        + encoder(t_txt, tc.hidden_size, tc.num_attention_heads, tc.intermediate_size, tc.num_hidden_layers)
        + head(capacity, tc.hidden_size);
    vision + text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_grow_linearly_with_the_capacity_on_cuda() {
        let c = ClipConfig::small(64, 8, 128, 2, 4);
        let (one, two, four) =
            (activation_bytes(&c, 1, CUDA), activation_bytes(&c, 2, CUDA), activation_bytes(&c, 4, CUDA));
        assert!(one > 0 && two == 2 * one && four == 4 * one, "{one} {two} {four}");
        // The CPU keeps bf16 in f32 and the attention probabilities whole: more per pair.
        assert!(activation_bytes(&c, 1, CPU) > one);
    }
}
