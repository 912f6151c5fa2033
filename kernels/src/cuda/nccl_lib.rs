//! NCCL, opened as operators install it.
//!
//! cudarc asks the loader for `libnccl.so` (and a few versioned names, never `.so.2`), while the
//! system packages and NVIDIA's Python wheel (`nvidia-nccl-cu13`) ship `libnccl.so.2`; a
//! library loaded by full path does not answer a later request for another name. So the entry
//! points cxrclip uses are opened here, once, from the first of: `CXRCLIP_NCCL` (a file), the
//! loader's path (`libnccl.so.2`, `libnccl.so`), NVIDIA's wheels and the toolkit folders that
//! [`libs::library_dirs`] knows. Results are plain integers (a newer NCCL may return a code
//! this build does not know) and the unique id is 128 opaque bytes.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};

use super::libs;

/// `ncclComm_t`.
pub type Comm = *mut c_void;
/// `cudaStream_t` (the driver's `CUstream`).
pub type Stream = *mut c_void;

/// `ncclUniqueId`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; 128],
}

pub const FLOAT32: c_int = 7;
pub const SUM: c_int = 0;
pub const MAX: c_int = 2;
const SUCCESS: c_int = 0;
const IN_PROGRESS: c_int = 7;

type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
type CommOp = unsafe extern "C" fn(Comm) -> c_int;
type CommAsyncError = unsafe extern "C" fn(Comm, *mut c_int) -> c_int;
type AllGather = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int;
type Reduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
type Broadcast = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
type Group = unsafe extern "C" fn() -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;

/// The NCCL entry points cxrclip calls.
pub struct Nccl {
    _lib: libloading::Library,
    pub path: String,
    pub version: i32,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    comm_abort: CommOp,
    comm_destroy: CommOp,
    comm_async_error: CommAsyncError,
    all_gather: AllGather,
    reduce_scatter: Reduce,
    all_reduce: Reduce,
    broadcast: Broadcast,
    group_start: Group,
    group_end: Group,
    error_string: ErrorString,
}

static NCCL: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();

/// NCCL, opened on first use; one line saying where it was looked for when it is missing.
pub fn nccl() -> Result<&'static Nccl> {
    NCCL.get_or_init(open).as_ref().map_err(|e| anyhow!("{e}"))
}

fn candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("CXRCLIP_NCCL") {
        c.push(PathBuf::from(p));
    }
    c.push(PathBuf::from("libnccl.so.2"));
    c.push(PathBuf::from("libnccl.so"));
    for d in libs::library_dirs() {
        c.push(d.join("libnccl.so.2"));
        c.push(d.join("libnccl.so"));
    }
    c
}

fn open() -> std::result::Result<Nccl, String> {
    let mut last = String::new();
    for path in candidates() {
        // SAFETY: loading NCCL runs its initialisers, which only set up the library's state.
        match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => return bind(lib, path.display().to_string()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "NCCL not found (libnccl.so.2 on the loader's path, in NVIDIA's nvidia-nccl-cu13 wheel or the CUDA \
         toolkit; or set CXRCLIP_NCCL to the file): {last}"
    ))
}

fn bind(lib: libloading::Library, path: String) -> std::result::Result<Nccl, String> {
    // SAFETY: each symbol is looked up by its C name and given its C signature from nccl.h;
    // the library stays loaded for as long as the function pointers are (it is kept in `Nccl`).
    unsafe {
        macro_rules! sym {
            ($name:literal, $ty:ty) => {
                *lib.get::<$ty>(concat!($name, "\0").as_bytes()).map_err(|e| format!("{path}: no {}: {e}", $name))?
            };
        }
        let get_version: GetVersion = sym!("ncclGetVersion", GetVersion);
        let mut version = 0;
        if get_version(&mut version) != SUCCESS {
            return Err(format!("{path}: ncclGetVersion failed"));
        }
        Ok(Nccl {
            get_unique_id: sym!("ncclGetUniqueId", GetUniqueId),
            comm_init_rank: sym!("ncclCommInitRank", CommInitRank),
            comm_abort: sym!("ncclCommAbort", CommOp),
            comm_destroy: sym!("ncclCommDestroy", CommOp),
            comm_async_error: sym!("ncclCommGetAsyncError", CommAsyncError),
            all_gather: sym!("ncclAllGather", AllGather),
            reduce_scatter: sym!("ncclReduceScatter", Reduce),
            all_reduce: sym!("ncclAllReduce", Reduce),
            broadcast: sym!("ncclBroadcast", Broadcast),
            group_start: sym!("ncclGroupStart", Group),
            group_end: sym!("ncclGroupEnd", Group),
            error_string: sym!("ncclGetErrorString", ErrorString),
            version,
            path,
            _lib: lib,
        })
    }
}

impl Nccl {
    fn check(&self, what: &str, code: c_int) -> Result<()> {
        if code == SUCCESS || code == IN_PROGRESS {
            return Ok(());
        }
        // SAFETY: NCCL returns a static NUL-terminated string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(code)) }.to_string_lossy();
        bail!("NCCL {what} failed: {text} (code {code})")
    }

    /// A new unique id (rank 0 makes it; the others receive it through the coordinator).
    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: writes the 128-byte id.
        self.check("ncclGetUniqueId", unsafe { (self.get_unique_id)(&mut id) })?;
        Ok(id)
    }

    /// Joins the communicator of `world` ranks named by `id`; the device must be current.
    pub fn comm_init_rank(&self, world: usize, id: UniqueId, rank: usize) -> Result<Comm> {
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` is written by a successful call.
        self.check("ncclCommInitRank", unsafe { (self.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) })?;
        Ok(comm)
    }

    /// Aborts every uncompleted operation on `comm` and frees it (safe to call while another
    /// thread is blocked on the communicator's work: this is how a hung collective is freed).
    ///
    /// # Safety
    /// `comm` came from [`Nccl::comm_init_rank`] and is not used afterwards.
    pub unsafe fn comm_abort(&self, comm: Comm) -> Result<()> {
        self.check("ncclCommAbort", (self.comm_abort)(comm))
    }

    /// Frees `comm` after its work completed.
    ///
    /// # Safety
    /// As for [`Nccl::comm_abort`].
    pub unsafe fn comm_destroy(&self, comm: Comm) -> Result<()> {
        self.check("ncclCommDestroy", (self.comm_destroy)(comm))
    }

    /// An error raised asynchronously on `comm` (a peer that died, a network failure).
    ///
    /// # Safety
    /// `comm` is a live communicator.
    pub unsafe fn async_error(&self, comm: Comm) -> Result<()> {
        let mut code = SUCCESS;
        self.check("ncclCommGetAsyncError", (self.comm_async_error)(comm, &mut code))?;
        self.check("communicator", code)
    }

    /// `recv[k*n..(k+1)*n] = send of rank k`, f32.
    ///
    /// # Safety
    /// Device buffers of `n` and `world * n` f32 on the communicator's device, live until the
    /// work on `stream` completes.
    pub unsafe fn all_gather(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        n: usize,
        comm: Comm,
        s: Stream,
    ) -> Result<()> {
        self.check("ncclAllGather", (self.all_gather)(send, recv, n, FLOAT32, comm, s))
    }

    /// `recv = chunk rank of the sum over ranks of send` (`n` f32 out of `world * n`).
    ///
    /// # Safety
    /// As for [`Nccl::all_gather`], with the sizes swapped.
    pub unsafe fn reduce_scatter(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        n: usize,
        comm: Comm,
        s: Stream,
    ) -> Result<()> {
        self.check("ncclReduceScatter", (self.reduce_scatter)(send, recv, n, FLOAT32, SUM, comm, s))
    }

    /// `recv = op over ranks of send` (`n` f32; `send == recv` sums in place); `op` is
    /// [`SUM`] or [`MAX`].
    ///
    /// # Safety
    /// As for [`Nccl::all_gather`].
    pub unsafe fn all_reduce(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        n: usize,
        op: c_int,
        comm: Comm,
        s: Stream,
    ) -> Result<()> {
        self.check("ncclAllReduce", (self.all_reduce)(send, recv, n, FLOAT32, op, comm, s))
    }

    /// `recv = send of rank root` (`n` f32).
    ///
    /// # Safety
    /// As for [`Nccl::all_gather`].
    pub unsafe fn broadcast(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        n: usize,
        root: usize,
        comm: Comm,
        s: Stream,
    ) -> Result<()> {
        self.check("ncclBroadcast", (self.broadcast)(send, recv, n, FLOAT32, root as c_int, comm, s))
    }

    /// Runs `ops` between `ncclGroupStart` and `ncclGroupEnd`; the group is always closed, even
    /// when an op fails (an open group would queue every later call on this thread forever).
    pub fn group(&self, ops: impl FnOnce() -> Result<()>) -> Result<()> {
        // SAFETY: no arguments; pairs with the group end below.
        self.check("ncclGroupStart", unsafe { (self.group_start)() })?;
        let r = ops();
        // SAFETY: closes the group opened above.
        let end = self.check("ncclGroupEnd", unsafe { (self.group_end)() });
        r.and(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_nccl_is_one_line() {
        // On a machine with NCCL this loads it; without, the error is one line with a hint.
        match nccl() {
            Ok(n) => assert!(n.version > 0),
            Err(e) => {
                let s = e.to_string();
                assert!(s.contains("NCCL not found") && s.contains("CXRCLIP_NCCL") && !s.contains('\n'), "{s}");
            }
        }
    }
}
