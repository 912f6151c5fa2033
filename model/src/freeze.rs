//! Choosing which parameters train, by Hugging Face name patterns (`*` matches any run of
//! characters).

use anyhow::{ensure, Result};
use kernels::Backend;

use crate::clip::Clip;

/// Whether `name` matches `pattern`, where `*` stands for any (possibly empty) substring.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The published adapter setup: adapters and layer norms train, everything else is frozen.
pub const ADAPTERS_AND_NORMS: &[&str] = &["*.adapter.*", "*layer_norm*", "*layrnorm*", "*layernorm*"];

impl<B: Backend> Clip<B> {
    /// Freezes every parameter matching one of `patterns` (others keep their state).
    /// A pattern that matches nothing is an error: it is almost always a typo.
    pub fn freeze(&mut self, patterns: &[&str]) -> Result<usize> {
        self.set_by_patterns(patterns, false)
    }

    /// Trains exactly the parameters matching one of `patterns`; freezes the rest.
    pub fn train_only(&mut self, patterns: &[&str]) -> Result<usize> {
        let mut mask = vec![false; self.layout.specs.len()];
        let mut used = vec![false; patterns.len()];
        for (m, spec) in mask.iter_mut().zip(&self.layout.specs) {
            for (u, p) in used.iter_mut().zip(patterns) {
                if glob_match(p, &spec.name) {
                    *m = true;
                    *u = true;
                }
            }
        }
        if let Some(i) = used.iter().position(|u| !u) {
            anyhow::bail!("the pattern {:?} matches no parameter", patterns[i]);
        }
        let count = mask.iter().filter(|&&m| m).count();
        self.set_trainable(mask)?;
        Ok(count)
    }

    fn set_by_patterns(&mut self, patterns: &[&str], train: bool) -> Result<usize> {
        let mut mask = self.trainable().to_vec();
        let mut changed = 0;
        for p in patterns {
            let hits: Vec<usize> =
                self.layout.specs.iter().enumerate().filter(|(_, s)| glob_match(p, &s.name)).map(|(i, _)| i).collect();
            ensure!(!hits.is_empty(), "the pattern {p:?} matches no parameter");
            for i in hits {
                mask[i] = train;
                changed += 1;
            }
        }
        self.set_trainable(mask)?;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*.adapter.*", "text_model.encoder.layers.0.adapter.up_proj.weight"));
        assert!(glob_match("logit_scale", "logit_scale"));
        assert!(!glob_match("logit", "logit_scale"));
        assert!(glob_match("vision_model.*", "vision_model.pre_layrnorm.bias"));
        assert!(glob_match("*bias", "a.bias"));
        assert!(!glob_match("*bias", "a.bias.x"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXcYb"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
