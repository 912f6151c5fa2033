//! NVTX ranges around the CUDA backend's ops, so that Nsight Systems and Nsight Compute show
//! every op of a training step by name (`nsys profile`, `ncu --nvtx`).
//!
//! No NVTX library is linked: the first op looks for one at run time, and only when a
//! profiler asked for ranges (the tools set `NVTX_INJECTION64_PATH` in the profiled process)
//! or `CXRCLIP_NVTX=1` is set; `CXRCLIP_NVTX=0` turns ranges off. It opens
//! `CXRCLIP_NVTX_LIB` if given, else `libnvtx3interop.so.1` (the CUDA 13 `nvidia-nvtx` wheel,
//! which PyTorch environments carry) or `libnvToolsExt.so.1` (CUDA 12 wheels, older toolkits)
//! from NVIDIA's Python packages, the toolkit or the loader's path. Those libraries implement
//! NVTX's injection protocol: they hand each range to the profiler's injection library.
//! Without a profiler, or without a library, an op pays one atomic load; nothing panics.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

use super::libs;

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}
const RTLD_NOW: c_int = 2;

type PushFn = unsafe extern "C" fn(*const c_char) -> c_int;
type PopFn = unsafe extern "C" fn() -> c_int;

struct Nvtx {
    push: PushFn,
    pop: PopFn,
}

static NVTX: OnceLock<Option<Nvtx>> = OnceLock::new();

/// The library names tried, in order.
pub const LIBRARIES: [&str; 3] = ["libnvtx3interop.so.1", "libnvToolsExt.so.1", "libnvToolsExt.so"];

/// Whether ranges are wanted in this process (a profiler's injection path, or the switch).
fn wanted() -> bool {
    match std::env::var("CXRCLIP_NVTX").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => std::env::var_os("NVTX_INJECTION64_PATH").is_some(),
    }
}

/// Opens `path` (a file, or a bare name for the loader) and finds the two entry points.
fn open(path: &str) -> Option<Nvtx> {
    let c = CString::new(path).ok()?;
    // SAFETY: dlopen of a shared library by name; a null handle means it was not found.
    let h = unsafe { dlopen(c.as_ptr(), RTLD_NOW) };
    if h.is_null() {
        return None;
    }
    // SAFETY: symbols looked up in a live handle by NUL-terminated names.
    let (push, pop) = unsafe { (dlsym(h, c"nvtxRangePushA".as_ptr()), dlsym(h, c"nvtxRangePop".as_ptr())) };
    if push.is_null() || pop.is_null() {
        return None;
    }
    // SAFETY: NVTX's C API: `int nvtxRangePushA(const char*)` and `int nvtxRangePop(void)`.
    unsafe {
        Some(Nvtx {
            push: std::mem::transmute::<*mut c_void, PushFn>(push),
            pop: std::mem::transmute::<*mut c_void, PopFn>(pop),
        })
    }
}

/// Where an NVTX library may be: the explicit path, then each known name in NVIDIA's folders,
/// then each name for the loader's own search.
pub fn candidates() -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("CXRCLIP_NVTX_LIB") {
        out.push(PathBuf::from(p).to_string_lossy().into_owned());
    }
    for dir in libs::library_dirs() {
        for name in LIBRARIES {
            let p = dir.join(name);
            if p.is_file() {
                out.push(p.to_string_lossy().into_owned());
            }
        }
    }
    out.extend(LIBRARIES.iter().map(|s| s.to_string()));
    out
}

/// The first NVTX library that opens and has the range entry points (for reports; opening it
/// turns nothing on).
pub fn library() -> Option<String> {
    candidates().into_iter().find(|p| open(p).is_some())
}

fn load() -> Option<Nvtx> {
    if !wanted() {
        return None;
    }
    for path in candidates() {
        if let Some(n) = open(&path) {
            eprintln!("nvtx: op ranges through {path}");
            return Some(n);
        }
    }
    eprintln!(
        "nvtx: ranges were asked for but no NVTX library was found (tried {}); ops run without",
        LIBRARIES.join(", ")
    );
    None
}

/// Opens a range named `name` when ranges are on; returns whether one was opened (then
/// [`pop`] must close it).
pub fn push(name: &CStr) -> bool {
    match NVTX.get_or_init(load) {
        Some(n) => {
            // SAFETY: a NUL-terminated name; the library copies it.
            unsafe { (n.push)(name.as_ptr()) };
            true
        }
        None => false,
    }
}

pub fn pop() {
    if let Some(Some(n)) = NVTX.get() {
        // SAFETY: closes the range the matching `push` opened on this thread.
        unsafe { (n.pop)() };
    }
}

/// Whether ranges are on (loads the library on first call if they are wanted).
pub fn active() -> bool {
    NVTX.get_or_init(load).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the library present (the nvidia-nvtx wheel, or `CXRCLIP_NVTX_LIB`) its entry
    /// points open and close a range without a profiler attached; absent, nothing is found
    /// and nothing panics.
    #[test]
    fn ranges_without_a_profiler() {
        match candidates().iter().find_map(|p| open(p).map(|n| (p.clone(), n))) {
            Some((path, n)) => {
                // SAFETY: as in `push` / `pop`.
                unsafe {
                    (n.push)(c"cxrclip test range".as_ptr());
                    (n.pop)();
                }
                println!("nvtx library {path}: push and pop ran");
            }
            None => println!("no NVTX library here (tried {:?})", candidates()),
        }
    }
}
