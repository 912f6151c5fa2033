//! The kernel sources, their NVRTC compilation and the on-disk kernel cache.
//!
//! Each family of kernels is one `.cu` file under `kernels/cuda/`, embedded in the crate with
//! `include_str!` and prefixed with `common.cuh`. A family has one or more compile-time
//! variants (the attention kernels one per head dimension, `-DHD=32` ...), each its own module.
//! A variant is compiled at first use to a cubin for the device's real architecture (`sm_90` on
//! Hopper), loaded without any JIT by the driver; where that fails (an NVRTC that does not know
//! the architecture, a driver that refuses the cubin), to PTX for the virtual architecture
//! (`compute_90`), which the driver JIT-compiles. Both are cached on disk by a hash of the
//! source, the variant's definitions, the architecture, the options, the NVRTC version and the
//! driver version. The CUDA headers it needs (`cuda_bf16.h`) are found at run time:
//! `CXRCLIP_CUDA_INCLUDE`, the toolkit (`CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`), or the
//! `nvidia-cuda-runtime` wheel (the workspace's `.cache/nvidia` that `scripts/nvidia-wheels.sh`
//! fills, or a Python environment's `nvidia/` packages).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::libs;

const COMMON: &str = include_str!("../../cuda/common.cuh");

/// One compile-time variant of a family: a name (empty for a family's only variant) and the
/// macro definitions NVRTC gets (`-D...`).
#[derive(Debug, PartialEq, Eq)]
pub struct Variant {
    pub name: &'static str,
    pub defines: &'static [&'static str],
}

/// The single variant of a family without compile-time parameters.
const PLAIN: &[Variant] = &[Variant { name: "", defines: &[] }];

/// The attention head dimensions, one module each (`attention.cu` takes `HD` as a macro);
/// `limits::CUDA` lists the same ones (a test keeps the two equal).
pub const ATTENTION_HEAD_DIMS: [usize; 3] = [32, 64, 128];
const ATTENTION_VARIANTS: &[Variant] = &[
    Variant { name: "hd32", defines: &["HD=32"] },
    Variant { name: "hd64", defines: &["HD=64"] },
    Variant { name: "hd128", defines: &["HD=128"] },
];

/// The attention variant of a head dimension, `None` when there is none.
pub fn attention_variant(head_dim: usize) -> Option<&'static Variant> {
    ATTENTION_HEAD_DIMS.iter().position(|&d| d == head_dim).map(|i| &ATTENTION_VARIANTS[i])
}

/// One family of kernels: a `.cu` file, its entry points and its compile-time variants.
pub struct Family {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
    pub variants: &'static [Variant],
}

/// Every kernel family and entry point; the backend loads functions only from this list. The
/// names are those of `crate::families` (one `.cu` file per op family), plus the bench's
/// unfused `baseline`.
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
        ],
        variants: PLAIN,
    },
    Family {
        name: "activation",
        source: include_str!("../../cuda/activation.cu"),
        entries: &["act_fwd", "act_bwd"],
        variants: PLAIN,
    },
    Family {
        name: "layernorm",
        source: include_str!("../../cuda/layernorm.cu"),
        entries: &["layernorm_fwd", "layernorm_bwd"],
        variants: PLAIN,
    },
    Family {
        name: "l2norm",
        source: include_str!("../../cuda/l2norm.cu"),
        entries: &["l2norm_fwd", "l2norm_bwd"],
        variants: PLAIN,
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
            "token_embed_bwd_sort",
            "token_embed_bwd_rank",
            "token_embed_bwd_pieces",
            "token_embed_bwd_join",
            "gather_rows",
            "gather_rows_bwd",
        ],
        variants: PLAIN,
    },
    Family {
        name: "attention",
        source: include_str!("../../cuda/attention.cu"),
        entries: &["attn_fwd", "attn_bwd_dot", "attn_bwd_dq", "attn_bwd_dkv"],
        variants: ATTENTION_VARIANTS,
    },
    Family {
        name: "infonce",
        source: include_str!("../../cuda/infonce.cu"),
        entries: &[
            "infonce_fwd_block",
            "infonce_bwd_rows",
            "infonce_bwd_cols",
            "infonce_block_fwd_finish",
            "infonce_col_rescale",
            "infonce_col_lse",
            "infonce_block_loss",
            "infonce_reduce_rows",
            "infonce_finish_scale",
        ],
        variants: PLAIN,
    },
    Family {
        name: "bce",
        source: include_str!("../../cuda/bce.cu"),
        entries: &["bce_logits_partial", "bce_logits_final", "bce_logits_bwd"],
        variants: PLAIN,
    },
    Family { name: "adamw", source: include_str!("../../cuda/adamw.cu"), entries: &["adamw"], variants: PLAIN },
    Family {
        name: "baseline",
        source: include_str!("../../cuda/baseline.cu"),
        entries: &["softmax_rows", "softmax_rows_bwd", "infonce_baseline_grad"],
        variants: PLAIN,
    },
];

/// The number of kernel entry points over all families (each counted once).
pub fn entry_count() -> usize {
    FAMILIES.iter().map(|f| f.entries.len()).sum()
}

/// The number of compiled modules: one per variant of each family.
pub fn variant_count() -> usize {
    FAMILIES.iter().map(|f| f.variants.len()).sum()
}

/// The number of kernels over every variant (what a device loads in all).
pub fn kernel_count() -> usize {
    FAMILIES.iter().map(|f| f.entries.len() * f.variants.len()).sum()
}

/// The family that holds an entry point.
pub fn family_of(entry: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.entries.contains(&entry))
}

/// A family's name with its variant's (`attention-hd64`), for file names and messages.
pub fn module_name(f: &Family, v: &Variant) -> String {
    if v.name.is_empty() {
        f.name.to_string()
    } else {
        format!("{}-{}", f.name, v.name)
    }
}

/// The full source NVRTC compiles for a family.
pub fn full_source(f: &Family) -> String {
    format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", f.name, f.source)
}

/// What NVRTC is asked for: a cubin for a real architecture (`sm_90`), loaded as it is, or
/// PTX for a virtual one (`compute_90`), compiled by the driver at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cubin,
    Ptx,
}

impl Target {
    /// The NVRTC architecture name of compute capability `major.minor` for this target.
    pub fn arch(self, (major, minor): (i32, i32)) -> String {
        match self {
            Target::Cubin => format!("sm_{major}{minor}"),
            Target::Ptx => format!("compute_{major}{minor}"),
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Target::Cubin => "cubin",
            Target::Ptx => "ptx",
        }
    }
}

/// NVRTC options for an architecture such as `"sm_90"` or `"compute_90"` and a variant.
pub fn options(arch: &str, include: &Path, v: &Variant) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--fmad=true".into(),
        "-lineinfo".into(),
        format!("--include-path={}", include.display()),
    ];
    o.extend(v.defines.iter().map(|d| format!("-D{d}")));
    o
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

/// The result of compiling one variant of a family.
pub struct Compiled {
    pub target: Target,
    /// The cubin (ELF) or the PTX text, as the driver loads it.
    pub image: Vec<u8>,
    /// NVRTC's log (empty on a clean compile; ptxas' resource report when `extra` asked for it).
    pub log: String,
}

impl Compiled {
    /// The PTX text (`None` for a cubin).
    pub fn ptx(&self) -> Option<&str> {
        match self.target {
            Target::Ptx => std::str::from_utf8(&self.image).ok(),
            Target::Cubin => None,
        }
    }
}

/// Compiles a variant of a family for compute capability `cc`, to a cubin or to PTX, with
/// `extra` NVRTC options after the usual ones. Errors carry NVRTC's log.
pub fn compile_with(
    f: &Family,
    v: &Variant,
    target: Target,
    cc: (i32, i32),
    include: &Path,
    extra: &[&str],
) -> Result<Compiled> {
    libs::ensure_nvrtc()?;
    use cudarc::nvrtc::result as nv;
    let arch = target.arch(cc);
    let module = module_name(f, v);
    let src = CString::new(full_source(f)).context("kernel source holds a NUL byte")?;
    let name = CString::new(format!("{}.cu", f.name)).expect("family names hold no NUL");
    let prog = nv::create_program(&src, Some(&name)).map_err(|e| anyhow!("nvrtcCreateProgram: {e:?}"))?;
    let mut opts = options(&arch, include, v);
    opts.extend(extra.iter().map(|s| s.to_string()));
    // SAFETY: `prog` was just created and is destroyed exactly once below; `src` and `name`
    // outlive it.
    let outcome = unsafe { nv::compile_program(prog, &opts) };
    let log = unsafe { nv::get_program_log(prog) }.map(|l| c_chars(&l)).unwrap_or_default();
    let image = match outcome {
        Ok(()) => match target {
            // SAFETY: a compiled program.
            Target::Ptx => unsafe { nv::get_ptx(prog) }
                .map(|p| c_chars(&p).into_bytes())
                .map_err(|e| anyhow!("nvrtcGetPTX ({module}, {arch}): {e:?}")),
            // SAFETY: as above.
            Target::Cubin => unsafe { cubin(prog) }.map_err(|e| anyhow!("nvrtcGetCUBIN ({module}, {arch}): {e}")),
        },
        Err(e) => Err(anyhow!("NVRTC could not compile {module} for {arch} ({e:?}):\n{log}")),
    };
    // SAFETY: created above, not destroyed before.
    let _ = unsafe { nv::destroy_program(prog) };
    Ok(Compiled { target, image: image?, log: log.trim().to_string() })
}

/// [`compile_with`] without extra options.
pub fn compile(f: &Family, v: &Variant, target: Target, cc: (i32, i32), include: &Path) -> Result<Compiled> {
    compile_with(f, v, target, cc, include, &[])
}

/// The cubin of a compiled program.
///
/// # Safety
/// `prog` must be a live program compiled for a real architecture.
unsafe fn cubin(prog: cudarc::nvrtc::sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::sys;
    let mut size = 0usize;
    // SAFETY: the caller's contract; `size` is a valid out pointer.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| format!("{e:?}"))?;
    if size == 0 {
        return Err("empty cubin (compiled for a virtual architecture?)".into());
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds the `size` bytes NVRTC reported.
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char) }
        .result()
        .map_err(|e| format!("{e:?}"))?;
    Ok(buf)
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

/// The kernel cache folder: `CXRCLIP_KERNEL_CACHE`, else `$XDG_CACHE_HOME/cxrclip/kernels`,
/// else `~/.cache/cxrclip/kernels`, else the temporary folder.
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

/// The cache file of a compiled variant: the key hashes everything the image depends on.
pub fn cache_path(f: &Family, v: &Variant, target: Target, cc: (i32, i32), nvrtc: (i32, i32), driver: i32) -> PathBuf {
    let src = full_source(f);
    let arch = target.arch(cc);
    let opts = options(&arch, Path::new(""), v).join(" ");
    let versions = format!("nvrtc {}.{} driver {driver}", nvrtc.0, nvrtc.1);
    let key = fnv1a(&[src.as_bytes(), arch.as_bytes(), opts.as_bytes(), versions.as_bytes()]);
    cache_dir().join(format!("{}-{arch}-{key:016x}.{}", module_name(f, v), target.extension()))
}

/// The image of a variant for `target` and compute capability `cc` (the device's, whose
/// driver reports `driver` from `cuDriverGetVersion`), from the disk cache or compiled (and then
/// cached; a cache that cannot be written is not an error). A PTX image ends in a NUL byte, as
/// the driver's module loader wants it.
pub fn image_cached(
    f: &Family,
    v: &Variant,
    target: Target,
    cc: (i32, i32),
    driver: i32,
    include: &Path,
) -> Result<Vec<u8>> {
    libs::ensure_nvrtc()?;
    let path = cache_path(f, v, target, cc, version()?, driver);
    if let Ok(img) = std::fs::read(&path) {
        if check_entries(f, target, &img).is_ok() {
            return Ok(with_nul(target, img));
        }
    }
    let c = compile(f, v, target, cc, include)?;
    check_entries(f, target, &c.image)?;
    if let Some(dir) = path.parent() {
        if std::fs::create_dir_all(dir).is_ok() {
            let tmp = dir.join(format!(".{}-{}.tmp", module_name(f, v), std::process::id()));
            if std::fs::write(&tmp, &c.image).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }
    Ok(with_nul(target, c.image))
}

fn with_nul(target: Target, mut img: Vec<u8>) -> Vec<u8> {
    if target == Target::Ptx && img.last() != Some(&0) {
        img.push(0);
    }
    img
}

/// Checks that a compiled image defines every entry point of its family: `.entry NAME(` in
/// PTX, the symbol name (NUL-delimited in the ELF string table) in a cubin.
pub fn check_entries(f: &Family, target: Target, image: &[u8]) -> Result<()> {
    for e in f.entries {
        let needle = match target {
            Target::Ptx => format!(".entry {e}("),
            Target::Cubin => format!("\0{e}\0"),
        };
        if !image.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            bail!("{}.cu: entry point {e} missing from the {}", f.name, target.extension());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_variants_match_the_cuda_limits() {
        let dims = crate::limits::CUDA.attention_head_dims.expect("CUDA lists its head dimensions");
        assert_eq!(dims, &ATTENTION_HEAD_DIMS[..]);
        for &d in dims {
            let v = attention_variant(d).unwrap();
            assert_eq!(v.defines, &[format!("HD={d}").as_str()][..]);
        }
        assert!(attention_variant(48).is_none());
    }

    #[test]
    fn cache_key_depends_on_variant_target_and_driver() {
        let f = family_of("attn_fwd").unwrap();
        let (v32, v64) = (attention_variant(32).unwrap(), attention_variant(64).unwrap());
        let p = |v, t, d| cache_path(f, v, t, (9, 0), (13, 0), d);
        let base = p(v64, Target::Cubin, 13000);
        assert_ne!(base, p(v32, Target::Cubin, 13000));
        assert_ne!(base, p(v64, Target::Ptx, 13000));
        assert_ne!(base, p(v64, Target::Cubin, 13010));
        assert_eq!(base, p(v64, Target::Cubin, 13000));
        let name = base.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("attention-hd64-sm_90-") && name.ends_with(".cubin"), "{name}");
    }
}
