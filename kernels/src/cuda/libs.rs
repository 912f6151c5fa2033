//! Finding NVIDIA's shared libraries before cudarc touches them.
//!
//! cudarc opens its libraries by name on first use and panics when one is missing, so every
//! entry into it is guarded by a presence check here. A library that is not on the loader's
//! path but sits in a known folder (the workspace's `.cache/nvidia` filled by
//! `scripts/nvidia-wheels.sh`, a Python environment's `nvidia/` packages, the toolkit) is
//! opened once by its full path with `RTLD_GLOBAL`: the loader then answers cudarc's later
//! request for the same soname with the library already loaded.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
}
const RTLD_NOW: c_int = 2;
const RTLD_GLOBAL: c_int = 0x100;

/// Folders named `nvidia` that hold NVIDIA's Python packages (`cu13/`, `cuda_nvrtc/`, ...).
pub fn nvidia_package_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(p) = std::env::var_os("CXRCLIP_NVIDIA_ROOT") {
        roots.push(PathBuf::from(p));
    }
    // The workspace's cache, found from the crate (tests, cargo runs) or from the binary.
    roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/nvidia/nvidia"));
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(4) {
            roots.push(up.join(".cache/nvidia/nvidia"));
        }
    }
    let mut prefixes: Vec<PathBuf> =
        ["/usr/local/lib", "/usr/lib", "/opt/conda/lib", "/usr/local/lib64"].iter().map(PathBuf::from).collect();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var) {
            prefixes.push(PathBuf::from(p).join("lib"));
        }
    }
    if let Some(h) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(h).join(".local/lib"));
    }
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(&prefix) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            if !name.to_string_lossy().starts_with("python3") {
                continue;
            }
            for sp in ["site-packages", "dist-packages"] {
                roots.push(e.path().join(sp).join("nvidia"));
            }
        }
    }
    roots.retain(|r| r.is_dir());
    roots
}

/// Folders that may hold NVIDIA's shared libraries.
pub fn library_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for root in nvidia_package_roots() {
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                dirs.push(e.path().join("lib"));
            }
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(p) = std::env::var_os(var) {
            dirs.push(PathBuf::from(&p).join("lib64"));
            dirs.push(PathBuf::from(p).join("lib"));
        }
    }
    for d in ["/usr/local/cuda/lib64", "/usr/local/cuda/lib", "/usr/lib/x86_64-linux-gnu", "/usr/local/nvidia/lib64"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// The first file named one of `names` in [`library_dirs`].
pub fn find_library(names: &[&str]) -> Option<PathBuf> {
    for d in library_dirs() {
        for n in names {
            let p = d.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn preload(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: a NUL-terminated path; the handle is kept open for the life of the process.
    !unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) }.is_null()
}

/// Makes a library loadable by cudarc: `present` is cudarc's check, `files` the file names
/// to look for (the ones cudarc also tries, so the loaded soname matches).
fn ensure(what: &str, present: fn() -> bool, files: &[&str], hint: &str) -> Result<()> {
    if present() {
        return Ok(());
    }
    if let Some(p) = find_library(files) {
        // NVRTC opens its builtins library by name at compile time: load it from the same folder.
        if what == "NVRTC" {
            if let Some(dir) = p.parent() {
                if let Ok(entries) = std::fs::read_dir(dir) {
                    for e in entries.flatten() {
                        let n = e.file_name().to_string_lossy().into_owned();
                        if n.starts_with("libnvrtc-builtins.so") && !n.contains("alt") {
                            preload(&e.path());
                        }
                    }
                }
            }
        }
        if preload(&p) && present() {
            return Ok(());
        }
    }
    bail!("{what} not found ({}); {hint}", files.join(", "))
}

fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}
fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}
fn cublas_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}
fn cublaslt_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}

/// NVRTC (13.x), needed to compile the kernels.
pub fn ensure_nvrtc() -> Result<()> {
    ensure(
        "NVRTC",
        nvrtc_present,
        &["libnvrtc.so.13", "libnvrtc.so"],
        "run scripts/nvidia-wheels.sh or put the CUDA 13 toolkit's lib64 on LD_LIBRARY_PATH",
    )
}

/// The CUDA driver library (`libcuda.so`), present only where an NVIDIA driver is installed.
pub fn ensure_driver() -> Result<()> {
    ensure(
        "the CUDA driver (libcuda)",
        driver_present,
        &["libcuda.so.1", "libcuda.so"],
        "this machine has no NVIDIA driver",
    )
}

/// cuBLAS and cuBLASLt.
pub fn ensure_cublas() -> Result<()> {
    ensure(
        "cuBLAS",
        cublas_present,
        &["libcublas.so.13", "libcublas.so"],
        "install the CUDA 13 toolkit or the nvidia-cublas wheel",
    )?;
    ensure(
        "cuBLASLt",
        cublaslt_present,
        &["libcublasLt.so.13", "libcublasLt.so"],
        "install the CUDA 13 toolkit or the nvidia-cublas wheel",
    )
}

/// One line per library: found or not, for `coordinator gpu-check`.
pub fn report() -> Vec<(&'static str, Result<()>)> {
    vec![
        ("libcuda", ensure_driver()),
        ("nvrtc", ensure_nvrtc()),
        ("cublas/cublasLt", ensure_cublas()),
        ("nccl", super::nccl_lib::nccl().map(drop)),
    ]
}
