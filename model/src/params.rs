//! The parameter layout: every tensor of a CLIP model, by its Hugging Face name, at an
//! offset in one flat buffer (llm.c's way: one allocation for the weights, one for the
//! gradients, one per optimiser moment; per-layer tensors are views).
//!
//! Within a block, the q, k and v projection weights are adjacent (and so are their biases),
//! so that the three projections run as one matrix product with a packed `[3C, C]` weight.

use std::collections::HashMap;
use std::ops::Range;

use crate::config::ClipConfig;

/// How a parameter starts in a model trained from scratch (as `CLIPModel._init_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Const(f32),
    Normal(f32),
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// The Hugging Face tensor name.
    pub name: String,
    /// The Hugging Face shape (a 0-d tensor has an empty shape).
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// Whether AdamW decays it: weights of linear layers and the patch convolution, not
    /// biases, norms, embeddings or the logit scale.
    pub decay: bool,
    pub init: Init,
    /// A cxrclip extension unknown to `transformers` (the adapters).
    pub extension: bool,
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub specs: Vec<ParamSpec>,
    pub total: usize,
    index: HashMap<String, usize>,
}

struct Builder {
    specs: Vec<ParamSpec>,
    total: usize,
}

impl Builder {
    fn push(&mut self, name: String, shape: &[usize], decay: bool, init: Init) {
        let len = shape.iter().product::<usize>();
        self.specs.push(ParamSpec {
            extension: name.contains(".adapter."),
            name,
            shape: shape.to_vec(),
            offset: self.total,
            len,
            decay,
            init,
        });
        self.total += len;
    }

    /// One encoder block of `width` with an MLP of `inner` (and an adapter of `adapter`).
    fn block(&mut self, p: &str, width: usize, inner: usize, layers: usize, factor: f64, adapter: Option<usize>) {
        let in_std = ((width as f64).powf(-0.5) * (2.0 * layers as f64).powf(-0.5) * factor) as f32;
        let out_std = ((width as f64).powf(-0.5) * factor) as f32;
        let fc_std = ((2.0 * width as f64).powf(-0.5) * factor) as f32;
        let (c, i) = (width, inner);
        self.push(format!("{p}.layer_norm1.weight"), &[c], false, Init::Ones);
        self.push(format!("{p}.layer_norm1.bias"), &[c], false, Init::Zeros);
        for w in ["q", "k", "v"] {
            self.push(format!("{p}.self_attn.{w}_proj.weight"), &[c, c], true, Init::Normal(in_std));
        }
        for w in ["q", "k", "v"] {
            self.push(format!("{p}.self_attn.{w}_proj.bias"), &[c], false, Init::Zeros);
        }
        self.push(format!("{p}.self_attn.out_proj.weight"), &[c, c], true, Init::Normal(out_std));
        self.push(format!("{p}.self_attn.out_proj.bias"), &[c], false, Init::Zeros);
        self.push(format!("{p}.layer_norm2.weight"), &[c], false, Init::Ones);
        self.push(format!("{p}.layer_norm2.bias"), &[c], false, Init::Zeros);
        self.push(format!("{p}.mlp.fc1.weight"), &[i, c], true, Init::Normal(fc_std));
        self.push(format!("{p}.mlp.fc1.bias"), &[i], false, Init::Zeros);
        self.push(format!("{p}.mlp.fc2.weight"), &[c, i], true, Init::Normal(in_std));
        self.push(format!("{p}.mlp.fc2.bias"), &[c], false, Init::Zeros);
        if let Some(a) = adapter {
            // The up projection starts at zero: a fresh adapter is the identity.
            self.push(format!("{p}.adapter.down_proj.weight"), &[a, c], true, Init::Normal(out_std));
            self.push(format!("{p}.adapter.down_proj.bias"), &[a], false, Init::Zeros);
            self.push(format!("{p}.adapter.up_proj.weight"), &[c, a], true, Init::Zeros);
            self.push(format!("{p}.adapter.up_proj.bias"), &[c], false, Init::Zeros);
        }
    }
}

impl Layout {
    pub fn new(cfg: &ClipConfig) -> Self {
        let mut b = Builder { specs: Vec::new(), total: 0 };
        let v = &cfg.vision_config;
        let t = &cfg.text_config;
        let vf = v.initializer_factor;
        let tf = t.initializer_factor;

        let (cv, p) = (v.hidden_size, v.patch_size);
        b.push(
            "vision_model.embeddings.class_embedding".into(),
            &[cv],
            false,
            Init::Normal(((cv as f64).powf(-0.5) * vf) as f32),
        );
        b.push(
            "vision_model.embeddings.patch_embedding.weight".into(),
            &[cv, 3, p, p],
            true,
            Init::Normal((v.initializer_range * vf) as f32),
        );
        b.push(
            "vision_model.embeddings.position_embedding.weight".into(),
            &[v.seq_len(), cv],
            false,
            Init::Normal((v.initializer_range * vf) as f32),
        );
        b.push("vision_model.pre_layrnorm.weight".into(), &[cv], false, Init::Ones);
        b.push("vision_model.pre_layrnorm.bias".into(), &[cv], false, Init::Zeros);
        for l in 0..v.num_hidden_layers {
            let prefix = format!("vision_model.encoder.layers.{l}");
            b.block(&prefix, cv, v.intermediate_size, v.num_hidden_layers, vf, cfg.adapter_dim);
        }
        b.push("vision_model.post_layernorm.weight".into(), &[cv], false, Init::Ones);
        b.push("vision_model.post_layernorm.bias".into(), &[cv], false, Init::Zeros);

        let ct = t.hidden_size;
        b.push(
            "text_model.embeddings.token_embedding.weight".into(),
            &[t.vocab_size, ct],
            false,
            Init::Normal((0.02 * tf) as f32),
        );
        b.push(
            "text_model.embeddings.position_embedding.weight".into(),
            &[t.max_position_embeddings, ct],
            false,
            Init::Normal((0.02 * tf) as f32),
        );
        for l in 0..t.num_hidden_layers {
            let prefix = format!("text_model.encoder.layers.{l}");
            b.block(&prefix, ct, t.intermediate_size, t.num_hidden_layers, tf, cfg.adapter_dim);
        }
        b.push("text_model.final_layer_norm.weight".into(), &[ct], false, Init::Ones);
        b.push("text_model.final_layer_norm.bias".into(), &[ct], false, Init::Zeros);

        let pd = cfg.projection_dim;
        b.push("visual_projection.weight".into(), &[pd, cv], true, Init::Normal(((cv as f64).powf(-0.5) * vf) as f32));
        b.push("text_projection.weight".into(), &[pd, ct], true, Init::Normal(((ct as f64).powf(-0.5) * tf) as f32));
        b.push("logit_scale".into(), &[], false, Init::Const(cfg.logit_scale_init_value as f32));

        let index = b.specs.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Layout { specs: b.specs, total: b.total, index }
    }

    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.index.get(name).map(|&i| &self.specs[i])
    }

    /// The spec of `name`; the layout is built from the config, so a miss is a bug.
    pub fn spec(&self, name: &str) -> &ParamSpec {
        self.get(name).unwrap_or_else(|| panic!("no parameter {name} in the layout"))
    }

    /// The range of the flat buffer that `name` occupies.
    pub fn range(&self, name: &str) -> Range<usize> {
        let s = self.spec(name);
        s.offset..s.offset + s.len
    }

    /// The one contiguous range of every parameter whose name starts with `prefix` (a block's
    /// tensors are pushed together, so this is the block).
    pub fn span(&self, prefix: &str) -> Range<usize> {
        let mut hit = self.specs.iter().filter(|s| s.name.starts_with(prefix));
        let first = hit.next().unwrap_or_else(|| panic!("no parameter starts with {prefix}"));
        let (start, mut end, mut len) = (first.offset, first.offset + first.len, first.len);
        for s in hit {
            end = end.max(s.offset + s.len);
            len += s.len;
        }
        assert_eq!(len, end - start, "the parameters under {prefix} are not contiguous");
        start..end
    }
}

/// The ranges of the flat gradient buffer in the order a training step finishes them: the
/// logit scale (by the loss), the vision head, the vision blocks last to first, the vision
/// embeddings, then the same for the text tower. Each range is written by nothing after it
/// is reported, so a data-parallel runtime may start summing it over the ranks while the rest
/// of the backward runs. Together the ranges cover the buffer exactly once.
#[derive(Clone, Debug)]
pub struct GradOrder {
    pub logit_scale: Range<usize>,
    pub vision_head: Vec<Range<usize>>,
    /// By block index (backward reports them from the last).
    pub vision_blocks: Vec<Range<usize>>,
    pub vision_embed: Range<usize>,
    pub text_head: Vec<Range<usize>>,
    pub text_blocks: Vec<Range<usize>>,
    pub text_embed: Range<usize>,
}

impl GradOrder {
    pub fn new(layout: &Layout, vision_layers: usize, text_layers: usize) -> Self {
        let blocks = |tower: &str, n: usize| -> Vec<Range<usize>> {
            (0..n).map(|l| layout.span(&format!("{tower}_model.encoder.layers.{l}."))).collect()
        };
        let embed_start = layout.range("vision_model.embeddings.class_embedding").start;
        let embed_end = layout.range("vision_model.pre_layrnorm.bias").end;
        Self {
            logit_scale: layout.range("logit_scale"),
            vision_head: vec![layout.span("vision_model.post_layernorm."), layout.range("visual_projection.weight")],
            vision_blocks: blocks("vision", vision_layers),
            vision_embed: embed_start..embed_end,
            text_head: vec![layout.span("text_model.final_layer_norm."), layout.range("text_projection.weight")],
            text_blocks: blocks("text", text_layers),
            text_embed: layout.span("text_model.embeddings."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b32_has_the_published_parameter_count() {
        let c: ClipConfig = serde_json::from_str("{}").unwrap();
        let l = Layout::new(&c);
        // openai/clip-vit-base-patch32: 151,277,313 parameters.
        assert_eq!(l.total, 151_277_313);
    }

    #[test]
    fn qkv_are_packed() {
        let c = ClipConfig::small(32, 8, 16, 1, 2);
        let l = Layout::new(&c);
        let q = l.spec("text_model.encoder.layers.0.self_attn.q_proj.weight");
        let k = l.spec("text_model.encoder.layers.0.self_attn.k_proj.weight");
        let v = l.spec("text_model.encoder.layers.0.self_attn.v_proj.weight");
        assert_eq!(k.offset, q.offset + q.len);
        assert_eq!(v.offset, k.offset + k.len);
        let qb = l.spec("text_model.encoder.layers.0.self_attn.q_proj.bias");
        let vb = l.spec("text_model.encoder.layers.0.self_attn.v_proj.bias");
        assert_eq!(vb.offset, qb.offset + 2 * qb.len);
    }
}
