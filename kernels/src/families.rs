//! The op families, one name each across the crate: the CPU module `src/cpu/NAME.rs` (the
//! reference), the CUDA source `cuda/NAME.cu` (an NVRTC family of the same name, except
//! `linear`, which is cuBLASLt), the GPU check and the bench harness of that name
//! (`coordinator gpu-check --op NAME`, `coordinator bench kernels --op NAME`) and the op tests
//! `tests/ops/NAME.rs`. Both commands take their names from [`FAMILIES`]; tests below keep the
//! files, the NVRTC list and the harnesses in step with it.

use anyhow::{bail, Result};

/// How a family runs on CUDA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaImpl {
    /// Hand-written kernels in `cuda/NAME.cu`, compiled by NVRTC.
    Nvrtc,
    /// cuBLASLt matrix products (plus elementwise kernels for the bias).
    Cublas,
}

/// One op family.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    /// The `Backend` ops it holds.
    pub ops: &'static str,
    pub cuda: CudaImpl,
}

/// Every op family, in the order `gpu-check` and `bench kernels` run them.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "elementwise",
        ops: "fill, copy (f32 <-> bf16), add, accumulate, scale, clamp_max, sum_squares",
        cuda: CudaImpl::Nvrtc,
    },
    Family { name: "linear", ops: "linear_fwd, linear_bwd", cuda: CudaImpl::Cublas },
    Family {
        name: "layernorm",
        ops: "layernorm_fwd/bwd, add_layernorm_fwd/bwd (residual add fused)",
        cuda: CudaImpl::Nvrtc,
    },
    Family { name: "l2norm", ops: "l2norm_fwd, l2norm_bwd", cuda: CudaImpl::Nvrtc },
    Family { name: "activation", ops: "act_fwd, act_bwd (QuickGELU, GELU)", cuda: CudaImpl::Nvrtc },
    Family { name: "attention", ops: "attention_fwd, attention_bwd", cuda: CudaImpl::Nvrtc },
    Family {
        name: "embed",
        ops: "im2col(_bwd), vision_embed_fwd/bwd, token_embed_fwd/bwd, gather_rows(_bwd)",
        cuda: CudaImpl::Nvrtc,
    },
    Family {
        name: "infonce",
        ops: "infonce_block_fwd, infonce_col_rescale, infonce_block_loss, infonce_block_bwd",
        cuda: CudaImpl::Nvrtc,
    },
    Family { name: "bce", ops: "bce_with_logits_fwd, bce_with_logits_bwd", cuda: CudaImpl::Nvrtc },
    Family { name: "adamw", ops: "adamw, adamw_with_bf16_copy", cuda: CudaImpl::Nvrtc },
];

/// The NVRTC module that is not an op family: the unfused kernels the bench times the fused
/// ones against (softmax over stored scores, the materialised InfoNCE gradient).
pub const BENCH_ONLY_MODULE: &str = "baseline";

/// The family names, comma-separated (for messages).
pub fn names() -> String {
    FAMILIES.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
}

/// The family called `name`, or one line listing the families.
pub fn find(name: &str) -> Result<&'static Family> {
    match FAMILIES.iter().find(|f| f.name == name) {
        Some(f) => Ok(f),
        None => bail!("unknown op family {name:?}; families: {}", names()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::nvrtc;
    use std::path::Path;

    #[test]
    fn every_family_has_its_cpu_module_cuda_source_and_op_tests() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in FAMILIES {
            let cpu = root.join("src/cpu").join(format!("{}.rs", f.name));
            assert!(cpu.is_file(), "{} has no CPU module {}", f.name, cpu.display());
            let ops = root.join("tests/ops").join(format!("{}.rs", f.name));
            assert!(ops.is_file(), "{} has no op tests {}", f.name, ops.display());
            let cu = root.join("cuda").join(format!("{}.cu", f.name));
            let in_nvrtc = nvrtc::FAMILIES.iter().any(|n| n.name == f.name);
            match f.cuda {
                CudaImpl::Nvrtc => {
                    assert!(cu.is_file(), "{} has no CUDA source {}", f.name, cu.display());
                    assert!(in_nvrtc, "{} is missing from nvrtc::FAMILIES", f.name);
                }
                CudaImpl::Cublas => assert!(!cu.exists() && !in_nvrtc, "{} is cuBLASLt", f.name),
            }
        }
    }

    #[test]
    fn every_nvrtc_module_is_a_family_or_the_bench_baselines() {
        for m in nvrtc::FAMILIES {
            assert!(m.name == BENCH_ONLY_MODULE || find(m.name).is_ok(), "NVRTC module {} is no op family", m.name);
        }
    }

    #[test]
    fn an_unknown_name_lists_the_families() {
        assert_eq!(find("l2norm").unwrap().name, "l2norm");
        let e = find("act").unwrap_err().to_string();
        assert_eq!(e.lines().count(), 1);
        for f in FAMILIES {
            assert!(e.contains(f.name), "{e}");
        }
    }
}
