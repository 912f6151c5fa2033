//! The kernel sources, their NVRTC compilation and the on-disk PTX cache.
//!
//! Each family of kernels is one `.cu` file under `kernels/cuda/`, embedded in the crate with
//! `include_str!` and prefixed with `common.cuh`. A family is compiled at first use for the
//! device's compute capability (`compute_90` on Hopper) and cached on disk by a hash of the
//! source, the architecture, the options and the NVRTC version. The CUDA headers it needs
//! (`cuda_bf16.h`) are found at run time: `CXRCLIP_CUDA_INCLUDE`, the toolkit
//! (`CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`), or the `nvidia-cuda-runtime` wheel (the
//! workspace's `.cache/nvidia` that `scripts/nvidia-wheels.sh` fills, or a Python
//! environment's `nvidia/` packages).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::libs;

const COMMON: &str = include_str!("../../cuda/common.cuh");

/// One family of kernels: a `.cu` file and its entry points.
pub struct Family {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

/// Every kernel family and entry point; the backend loads functions only from this list.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "elementwise",
        source: include_str!("../../cuda/elementwise.cu"),
        entries: &[
            "fill",
            "copy_cast",
            "add",
            "accumulate",
            "scale",
            "clamp_max",
            "sum_squares_partial",
            "sum_partials_f64",
            "col_sum_partial",
            "col_sum_final",
            "broadcast_rows",
            "bce_logits_partial",
            "bce_logits_final",
            "bce_logits_bwd",
        ],
    },
    Family { name: "activation", source: include_str!("../../cuda/activation.cu"), entries: &["act_fwd", "act_bwd"] },
    Family {
        name: "layernorm",
        source: include_str!("../../cuda/layernorm.cu"),
        entries: &["layernorm_fwd", "layernorm_bwd", "l2norm_fwd", "l2norm_bwd"],
    },
    Family {
        name: "embed",
        source: include_str!("../../cuda/embed.cu"),
        entries: &[
            "im2col",
            "col2im",
            "vision_embed_fwd",
            "vision_embed_bwd_patches",
            "token_embed_fwd",
            "token_embed_bwd_wte",
            "gather_rows",
            "gather_rows_bwd",
        ],
    },
    Family {
        name: "attention",
        source: include_str!("../../cuda/attention.cu"),
        entries: &["attn_fwd", "attn_bwd_dot", "attn_bwd_dq", "attn_bwd_dkv"],
    },
    Family {
        name: "infonce",
        source: include_str!("../../cuda/infonce.cu"),
        entries: &[
            "infonce_fwd_partial",
            "infonce_bwd_rows",
            "infonce_bwd_cols",
            "infonce_fwd_finish",
            "infonce_reduce_rows",
            "infonce_finish_scale",
        ],
    },
    Family { name: "optimizer", source: include_str!("../../cuda/optimizer.cu"), entries: &["adamw"] },
    Family {
        name: "baseline",
        source: include_str!("../../cuda/baseline.cu"),
        entries: &["softmax_rows", "softmax_rows_bwd", "infonce_baseline_grad"],
    },
];

/// The number of kernel entry points over all families.
pub fn entry_count() -> usize {
    FAMILIES.iter().map(|f| f.entries.len()).sum()
}

/// The family that holds an entry point.
pub fn family_of(entry: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.entries.contains(&entry))
}

/// The full source NVRTC compiles for a family.
pub fn full_source(f: &Family) -> String {
    format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", f.name, f.source)
}

/// NVRTC options for an architecture such as `"compute_90"`.
pub fn options(arch: &str, include: &Path) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=true".into(),
        "-lineinfo".into(),
        format!("--include-path={}", include.display()),
    ]
}

/// The folder holding `cuda_bf16.h`, found as the module docs say.
pub fn find_include_dir() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("CXRCLIP_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(p) = std::env::var_os(var) {
            candidates.push(PathBuf::from(p).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    for root in libs::nvidia_package_roots() {
        for sub in ["cu13", "cuda_runtime", "cuda_nvrtc"] {
            candidates.push(root.join(sub).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/include"));
    candidates.into_iter().find(|d| d.join("cuda_bf16.h").is_file()).ok_or_else(|| {
        anyhow!(
            "no CUDA headers (cuda_bf16.h) found: set CXRCLIP_CUDA_INCLUDE, install the CUDA toolkit, \
                 or run scripts/nvidia-wheels.sh"
        )
    })
}

/// The NVRTC version, e.g. `(13, 0)`. Needs NVRTC loaded (see [`libs::ensure_nvrtc`]).
pub fn version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (the callers ensure it), and both pointers are valid.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| anyhow!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// The result of compiling one family.
pub struct Compiled {
    pub ptx: String,
    /// NVRTC's log (empty on a clean compile).
    pub log: String,
}

/// Compiles a family to PTX. Errors carry NVRTC's log.
pub fn compile(f: &Family, arch: &str, include: &Path) -> Result<Compiled> {
    libs::ensure_nvrtc()?;
    use cudarc::nvrtc::result as nv;
    let src = CString::new(full_source(f)).context("kernel source holds a NUL byte")?;
    let name = CString::new(format!("{}.cu", f.name)).expect("family names hold no NUL");
    let prog = nv::create_program(&src, Some(&name)).map_err(|e| anyhow!("nvrtcCreateProgram: {e:?}"))?;
    let opts = options(arch, include);
    // SAFETY: `prog` was just created and is destroyed exactly once below; `src` and `name`
    // outlive it.
    let outcome = unsafe { nv::compile_program(prog, &opts) };
    let log = unsafe { nv::get_program_log(prog) }.map(|l| c_chars(&l)).unwrap_or_default();
    let ptx = match outcome {
        Ok(()) => unsafe { nv::get_ptx(prog) }.map(|p| c_chars(&p)).map_err(|e| anyhow!("nvrtcGetPTX: {e:?}")),
        Err(e) => Err(anyhow!("NVRTC could not compile {}.cu for {arch} ({e:?}):\n{log}", f.name)),
    };
    // SAFETY: created above, not destroyed before.
    let _ = unsafe { nv::destroy_program(prog) };
    Ok(Compiled { ptx: ptx?, log: log.trim().to_string() })
}

fn c_chars(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// 64-bit FNV-1a: a hash that is the same in every build (the cache key must outlive binaries).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The PTX cache folder: `CXRCLIP_KERNEL_CACHE`, else `$XDG_CACHE_HOME/cxrclip/kernels`, else
/// `~/.cache/cxrclip/kernels`, else the temporary folder.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("CXRCLIP_KERNEL_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("cxrclip/kernels");
    }
    if let Some(p) = std::env::var_os("HOME") {
        return PathBuf::from(p).join(".cache/cxrclip/kernels");
    }
    std::env::temp_dir().join("cxrclip-kernels")
}

/// The PTX of a family for `arch`, from the disk cache or compiled (and then cached; a cache
/// that cannot be written is not an error).
pub fn ptx_cached(f: &Family, arch: &str, include: &Path) -> Result<String> {
    libs::ensure_nvrtc()?;
    let (major, minor) = version()?;
    let src = full_source(f);
    let opts = options(arch, Path::new("")).join(" ");
    let ver = format!("{major}.{minor}");
    let key = fnv1a(&[src.as_bytes(), arch.as_bytes(), opts.as_bytes(), ver.as_bytes()]);
    let dir = cache_dir();
    let path = dir.join(format!("{}-{arch}-{key:016x}.ptx", f.name));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        if ptx.contains(".entry") {
            return Ok(ptx);
        }
    }
    let c = compile(f, arch, include)?;
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!(".{}-{}.tmp", f.name, std::process::id()));
        if std::fs::write(&tmp, &c.ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(c.ptx)
}

/// Checks that a PTX text defines every entry point of its family.
pub fn check_entries(f: &Family, ptx: &str) -> Result<()> {
    for e in f.entries {
        let needle = format!(".entry {e}(");
        if !ptx.contains(&needle) {
            bail!("{}.cu: entry point {e} missing from the PTX", f.name);
        }
    }
    Ok(())
}
