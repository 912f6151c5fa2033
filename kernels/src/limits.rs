//! What a backend can run, known before a buffer is allocated or a worker started.
//!
//! The CPU ops take any size; the CUDA kernels are written for fixed tile shapes. The
//! coordinator checks a model against the chosen device's limits when it plans a run, so that
//! an unsupported model is refused with one line naming the limit instead of a worker
//! panicking at its first forward. The CUDA ops assert the same limits (one source of truth).

use crate::backend::DType;

/// The shapes and storage types a backend's ops accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The backend's name (`"cpu"`, `"cuda"`).
    pub backend: &'static str,
    /// Attention head dimensions the kernels take; `None`: any.
    pub attention_head_dims: Option<&'static [usize]>,
    /// The InfoNCE feature width (the projection dimension) must be a multiple of this ...
    pub infonce_dim_multiple: usize,
    /// ... and at most this; `None`: no bound.
    pub infonce_max_dim: Option<usize>,
    /// Storage types of activations and matrix-unit weights.
    pub dtypes: &'static [DType],
}

impl Limits {
    /// `Err` with one line naming the limit when `head_dim` (of `tower`) is not supported.
    pub fn check_head_dim(&self, tower: &str, head_dim: usize) -> Result<(), String> {
        match self.attention_head_dims {
            Some(dims) if !dims.contains(&head_dim) => Err(format!(
                "the {} attention kernels take head dimension {} (the {tower} tower has {head_dim}: hidden_size / \
                 num_attention_heads)",
                self.backend,
                list(dims)
            )),
            _ => Ok(()),
        }
    }

    /// `Err` with one line naming the limit when the InfoNCE kernels cannot take `dim`.
    pub fn check_infonce_dim(&self, dim: usize) -> Result<(), String> {
        let multiple = self.infonce_dim_multiple.max(1);
        let fits = dim > 0 && dim.is_multiple_of(multiple) && self.infonce_max_dim.is_none_or(|m| dim <= m);
        if fits {
            return Ok(());
        }
        let bound = self.infonce_max_dim.map(|m| format!(" up to {m}")).unwrap_or_default();
        let shape = match (multiple > 1, bound.is_empty()) {
            (true, _) => format!("a multiple of {multiple}{bound}"),
            (false, true) => "at least 1".to_string(),
            (false, false) => format!("1{bound}"),
        };
        Err(format!(
            "the {} InfoNCE kernels take a feature width (projection_dim) of {shape} (got {dim})",
            self.backend
        ))
    }
}

fn list(dims: &[usize]) -> String {
    let s: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    match s.len() {
        0 => "none".into(),
        1 => s[0].clone(),
        n => format!("{} or {}", s[..n - 1].join(", "), s[n - 1]),
    }
}

/// The CPU backend: any shape, f32 storage (a `Bf16` request is served in f32).
pub const CPU: Limits = Limits {
    backend: "cpu",
    attention_head_dims: None,
    infonce_dim_multiple: 1,
    infonce_max_dim: None,
    dtypes: &[DType::F32, DType::I32],
};

/// The CUDA kernels: attention for head dimensions 32, 64 and 128 (`kernels/cuda/attention.cu`,
/// one module each), InfoNCE at any width (`infonce.cu` pads to a multiple of 64 and walks
/// widths beyond 512 in chunks).
pub const CUDA: Limits = Limits {
    backend: "cuda",
    attention_head_dims: Some(&[32, 64, 128]),
    infonce_dim_multiple: 1,
    infonce_max_dim: None,
    dtypes: &[DType::F32, DType::Bf16, DType::I32],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_takes_any_shape() {
        assert!(CPU.check_head_dim("vision", 7).is_ok());
        assert!(CPU.check_infonce_dim(3).is_ok());
        assert!(CPU.check_infonce_dim(0).is_err());
    }

    #[test]
    fn cuda_names_the_limit() {
        for &hd in CUDA.attention_head_dims.unwrap() {
            assert!(CUDA.check_head_dim("text", hd).is_ok());
        }
        let e = CUDA.check_head_dim("text", 33).unwrap_err();
        assert!(e.contains("head dimension 32, 64 or 128") && e.contains("text tower has 33"), "{e}");
        assert!(!e.contains('\n'));
        for dim in [1, 96, 512, 768, 1000, 1024, 4096] {
            assert!(CUDA.check_infonce_dim(dim).is_ok(), "{dim}");
        }
        let e = CUDA.check_infonce_dim(0).unwrap_err();
        assert!(e.contains("projection_dim") && e.contains("got 0"), "{e}");
    }
}
