//! Inputs for the tests of this crate and the ones above it (a seed from the environment, a
//! random batch a config's tokenizer settings accept), so each test file does not carry its own.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::ClipConfig;

/// A fresh seed, or `$var`'s value to replay a failure; printed either way.
pub fn seed(var: &str) -> u64 {
    let s = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
    eprintln!("seed {s} (rerun with {var}={s})");
    s
}

/// `b` random pairs for `c`: pixels in [-1.5, 1.5) (`[b, 3, s, s]`), and texts of 3 tokens to
/// the full context, each `bos ... eos` with ids below the special ones, zero-padded.
pub fn random_batch(rng: &mut ChaCha8Rng, c: &ClipConfig, b: usize) -> (Vec<f32>, Vec<i32>) {
    let s = c.vision_config.image_size;
    let t = c.text_config.max_position_embeddings;
    let (bos, eos) = (c.text_config.bos_token_id as i32, c.text_config.eos_token_id as i32);
    let pixels = (0..b * 3 * s * s).map(|_| rng.random_range(-1.5..1.5)).collect();
    let mut ids = vec![0i32; b * t];
    for r in 0..b {
        let len = rng.random_range(3..=t);
        ids[r * t] = bos;
        for k in 1..len - 1 {
            ids[r * t + k] = rng.random_range(1..bos.min(eos));
        }
        ids[r * t + len - 1] = eos;
    }
    (pixels, ids)
}
