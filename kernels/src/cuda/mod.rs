//! The CUDA backend: hand-written kernels compiled by NVRTC at first use, matrix products
//! through cuBLASLt, bf16 storage for what the model asks in bf16 with f32 accumulation, f32
//! master weights, optimiser state, statistics and losses.
//!
//! cudarc is loaded dynamically, so this module compiles and links everywhere; [`Cuda::new`]
//! checks that the driver, NVRTC and cuBLASLt can be opened before touching cudarc (which
//! panics on a missing library) and returns a one-line error on a machine without a GPU.
//!
//! **Status: written without a GPU.** Every kernel compiles with NVRTC for sm_90 and sm_80 in
//! CI (`kernels/tests/nvrtc_compile.rs`), but none of this module has yet run on a device:
//! [`check`] (run by `coordinator gpu-check` and the ignored `cuda_ops` tests) compares every
//! op with the CPU backend on the first machine with a GPU.
//!
//! Ops cannot return errors (the `Backend` signatures), so a failed launch is recorded and
//! reported by the next [`Backend::synchronize`] or download; shape mismatches panic as on the
//! CPU. Out-of-range token ids or pooling indices write NaN and are reported the same way.

pub mod bench;
mod blas;
pub mod check;
mod comm;
mod device;
pub mod libs;
pub mod nccl_lib;
pub mod nvrtc;
pub mod nvtx;
pub mod probe;

use std::ffi::CStr;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, ensure, Result};
use cudarc::driver::result as drv;

pub use device::CudaStorage;
use device::{elem_size, Args, Device};

use crate::backend::{Activation, AdamWConsts, AdamWStep, Backend, DType, InfoNceDims};
use crate::shapes::{
    self, check_adamw, check_bce, check_layernorm_bwd, check_layernorm_fwd, check_len, check_linear_bwd,
    check_linear_fwd, check_vision_embed_bwd, check_vision_embed_fwd, in_place_or_disjoint, outputs,
};
use crate::tensor::Tensor;

type T = Tensor<Cuda>;

const BLOCK: u32 = 256;

/// The token-table gradient's shapes, as `embed.cu` defines them (`TOK_SORT_CHUNK`,
/// `TOK_PIECE`, `TOK_COLS`, `JOIN_ROWS`).
const TOKEN_SORT_CHUNK: usize = 1024;
const TOKEN_PIECE: usize = 32;
const TOKEN_COLS: usize = 128;
const TOKEN_JOIN_ROWS: u32 = 8;

/// The CUDA backend on one device. See the module docs.
pub struct Cuda {
    dev: Device,
    blas: blas::Blas,
    blas_workspace: u64,
    /// Device flag set by kernels that meet an out-of-range index.
    bad: u64,
    _keep: Vec<T>,
    timing: Mutex<Timing>,
}

/// Event pairs around ops while the profiler is on, resolved into its table at the next
/// synchronisation; spent events are kept for reuse.
#[derive(Default)]
struct Timing {
    free: Vec<device::Raw<cudarc::driver::sys::CUevent>>,
    pending: Vec<(&'static CStr, device::Raw<cudarc::driver::sys::CUevent>, device::Raw<cudarc::driver::sys::CUevent>)>,
}

/// One op's NVTX range and, while the profiler is on, its start event; closed on drop.
struct OpScope<'a> {
    cuda: &'a Cuda,
    name: &'static CStr,
    start: Option<device::Raw<cudarc::driver::sys::CUevent>>,
    nvtx: bool,
}

impl Drop for OpScope<'_> {
    fn drop(&mut self) {
        if let Some(start) = self.start.take() {
            match self.cuda.record_event() {
                Some(end) => self.cuda.timing.lock().expect("timing").pending.push((self.name, start, end)),
                None => self.cuda.timing.lock().expect("timing").free.push(start),
            }
        }
        if self.nvtx {
            nvtx::pop();
        }
    }
}

/// The device pointer of a tensor's first element.
fn dptr(t: &T) -> u64 {
    t.storage().ptr + (t.offset() * elem_size(t.dtype())) as u64
}

fn is_bf(t: &T) -> i32 {
    (t.dtype() == DType::Bf16) as i32
}

fn want_f32(what: &str, t: &T) {
    assert_eq!(t.dtype(), DType::F32, "{what} must be an f32 tensor on CUDA");
}

/// Kernel arguments from tensors: every kernel takes a float tensor as its device pointer
/// followed by its storage flag (1 for bf16, 0 for f32; see `common.cuh`).
trait TensorArgs {
    /// A tensor's pointer and storage flag.
    fn t(self, t: &T) -> Self;
    /// An optional tensor's pointer and flag, `(0, 0)` when absent (kernels test for null).
    fn opt(self, t: Option<&T>) -> Self;
}

impl TensorArgs for Args {
    fn t(self, t: &T) -> Self {
        self.ptr(dptr(t)).i32(is_bf(t))
    }
    fn opt(self, t: Option<&T>) -> Self {
        self.ptr(t.map_or(0, dptr)).i32(t.map_or(0, is_bf))
    }
}

fn blocks(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32
}

pub use crate::bf16::{bf16_to_f32, f32_to_bf16};

/// The widest feature chunk the InfoNCE tile kernels hold in shared memory (`KC` in
/// `infonce.cu`): wider features are walked in chunks, and the backward runs one block per
/// chunk of output columns (grid z).
const INFONCE_CHUNK: usize = 512;

/// The chunk width in shared memory (the width padded to a multiple of 64, at most 512) and
/// the number of chunks, as `infonce.cu` computes them.
fn infonce_chunks(dim: usize) -> (usize, usize) {
    let padded = dim.div_ceil(64) * 64;
    (padded.min(INFONCE_CHUNK), padded.div_ceil(INFONCE_CHUNK))
}

/// Dynamic shared memory of the InfoNCE tile kernels for a feature dimension: a fixed and a
/// streaming tile of 64 rows of one chunk, the G tile, the column log-sum-exps, the row
/// reduction slots and the forward's column reduction slots (`Smem` in `infonce.cu`).
fn infonce_smem(dim: usize) -> u32 {
    let (width, _) = infonce_chunks(dim);
    (2 * 64 * (width + 8) * 2 + 64 * 72 * 2 + 64 * 4 + 4 * 64 * 4 + 8 * 64 * 4) as u32
}

/// How the one-pass forward groups the local row tiles: `(groups, tiles per group)`. Blocks
/// are groups x splits; the partials are `splits x local` (rows) plus `groups x global`
/// (columns), which for a fixed block count are smallest with groups / splits = local /
/// global, i.e. groups = sqrt(resident x local / global).
fn infonce_row_groups(local: usize, global: usize, resident: usize) -> (usize, usize) {
    let tiles = local.div_ceil(64).max(1);
    let want = ((resident.max(1) * local) as f64 / global.max(1) as f64).sqrt().round() as usize;
    let per = tiles.div_ceil(want.clamp(1, tiles));
    (tiles.div_ceil(per), per)
}

/// How the global columns are split across blocks: `resident` blocks fit on all
/// multiprocessors together, `blocks_per_split` blocks run per split (row tiles x chunks of
/// output columns). A block's time is taken as (column tiles it streams + 1) tile times (the +1:
/// loading its fixed tile), the grid's as that times its waves; the split with the least time
/// wins, the fewer splits on a tie (smaller partials). Returns (splits, columns per split, a
/// multiple of 64).
fn infonce_split_plan(global: usize, blocks_per_split: usize, resident: usize) -> (usize, usize) {
    let col_tiles = global.div_ceil(64).max(1);
    let (bps, resident) = (blocks_per_split.max(1), resident.max(1));
    let mut best = (usize::MAX, 1, col_tiles);
    for want in 1..=col_tiles.min(4 * resident) {
        let tiles = col_tiles.div_ceil(want);
        let splits = col_tiles.div_ceil(tiles);
        let cost = (splits * bps).div_ceil(resident) * (tiles + 1);
        if cost < best.0 {
            best = (cost, splits, tiles);
        }
    }
    (best.1, best.2 * 64)
}

impl Cuda {
    /// The backend on device `ordinal`. Fails with one line (never panics) where there is no
    /// GPU, no driver, or no NVRTC / cuBLASLt.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        let dev = Device::new(ordinal)?;
        libs::ensure_cublas()?;
        dev.bind()?;
        let blas = blas::Blas::new()?;
        let mut me =
            Cuda { dev, blas, blas_workspace: 0, bad: 0, _keep: Vec::new(), timing: Mutex::new(Timing::default()) };
        // The workspace and the index flag are ordinary pool buffers kept alive with the backend.
        let ws = me.alloc(blas::WORKSPACE_BYTES / 4, DType::F32)?;
        let bad = me.alloc(1, DType::I32)?;
        me.blas_workspace = dptr(&ws);
        me.bad = dptr(&bad);
        me._keep = vec![ws, bad];
        // Compile (or load from the disk cache) every kernel now, so the first step does not
        // pay for it and a broken toolchain shows up here.
        for f in nvrtc::FAMILIES {
            for v in f.variants {
                me.dev.func_variant(f.entries[0], v)?;
            }
        }
        Ok(me)
    }

    /// The device's name, compute architecture and multiprocessor count, and how the kernels
    /// were loaded (cubins, or PTX and why).
    pub fn describe(&self) -> String {
        let images = match self.dev.ptx_fallback.lock().expect("fallback note").as_deref() {
            None => "kernels as cubin".to_string(),
            Some(why) => format!("some kernels as PTX: {why}"),
        };
        format!(
            "{} ({}, {} SMs, driver {}, {images})",
            self.dev.name, self.dev.arch, self.dev.sm_count, self.dev.driver_version
        )
    }

    /// The raw compute and communication streams (for NCCL and for timing).
    pub fn streams(&self) -> (cudarc::driver::sys::CUstream, cudarc::driver::sys::CUstream) {
        (self.dev.stream.0, self.dev.comm.0)
    }

    /// Milliseconds of device time taken by the work `f` enqueues, measured with CUDA events.
    pub fn time_ms(&self, mut f: impl FnMut()) -> Result<f32> {
        let ms = self.dev.time_ms(&mut f)?;
        self.dev.take_error()?;
        Ok(ms)
    }

    /// (bytes in use, bytes cached, peak bytes in use) of the caching allocator.
    pub fn memory_stats(&self) -> (usize, usize, usize) {
        self.dev.pool.stats()
    }

    pub fn reset_peak_memory(&self) {
        self.dev.pool.reset_peak()
    }

    /// Opens an op's scope: an NVTX range when a profiler asked for ranges, and a start event
    /// when the per-op profiler (`crate::profile`) is on. Both checks are one atomic load.
    fn op(&self, name: &'static CStr) -> OpScope<'_> {
        let nvtx = nvtx::push(name);
        let start = if crate::profile::enabled() { self.record_event() } else { None };
        OpScope { cuda: self, name, start, nvtx }
    }

    /// An event recorded on the compute stream now (from the spent ones when there are any);
    /// `None` if the driver refused (the op then goes untimed).
    fn record_event(&self) -> Option<device::Raw<cudarc::driver::sys::CUevent>> {
        let reuse = self.timing.lock().expect("timing").free.pop();
        let ev = match reuse {
            Some(e) => e.0,
            None => drv::event::create(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT).ok()?,
        };
        // SAFETY: an event and the stream of this backend's context (bound by every op).
        match unsafe { drv::event::record(ev, self.dev.stream.0) } {
            Ok(()) => Some(device::Raw(ev)),
            Err(_) => {
                self.timing.lock().expect("timing").free.push(device::Raw(ev));
                None
            }
        }
    }

    /// After a synchronisation: the timed ops' device milliseconds into the profiler's table.
    fn resolve_timings(&self) {
        let mut t = self.timing.lock().expect("timing");
        let pending = std::mem::take(&mut t.pending);
        for (name, start, end) in pending {
            // SAFETY: both events were recorded on the stream, which has been synchronised.
            if let Ok(ms) = unsafe { drv::event::elapsed(start.0, end.0) } {
                crate::profile::record(name.to_str().unwrap_or("?"), ms as f64 / 1e3);
            }
            t.free.push(start);
            t.free.push(end);
        }
    }

    fn run(&self, r: Result<()>) {
        self.dev.record(r);
    }

    fn launch(&self, entry: &'static str, grid: (u32, u32, u32), block: u32, smem: u32, args: Args) {
        self.run(self.dev.launch(entry, grid, block, smem, args));
    }

    /// Elementwise launch over `n` elements.
    fn ew(&self, entry: &'static str, n: usize, args: Args) {
        if n == 0 {
            return;
        }
        self.launch(entry, (blocks(n).min(self.dev.sm_count * 16), 1, 1), BLOCK, 0, args);
    }

    /// `out[col] += alpha * sum_rows x[rows, cols]`, deterministic (chunked partial sums
    /// reduced in chunk order); `take` columns of the sums go to `out`.
    #[allow(clippy::too_many_arguments)]
    fn col_sums(&self, out: &T, x: u64, xbf: i32, rows: usize, cols: usize, take: usize, alpha: f32) -> Result<()> {
        let rpc = 256usize;
        let chunks = rows.div_ceil(rpc).max(1);
        let part = self.dev.scratch(chunks * cols * 4)?;
        self.dev.launch(
            "col_sum_partial",
            (cols.div_ceil(256) as u32, chunks as u32, 1),
            256,
            0,
            Args::new().ptr(part).ptr(x).i32(xbf).i64(rows as i64).i64(cols as i64).i64(rpc as i64),
        )?;
        self.dev.launch(
            "col_sum_final",
            (blocks(take), 1, 1),
            BLOCK,
            0,
            Args::new().t(out).ptr(part).i64(chunks as i64).i64(take as i64).i64(cols as i64).f32(alpha),
        )
    }

    /// A bf16 copy of `t` in scratch at byte offset `at` (for a matrix product whose other
    /// operand is bf16).
    fn as_bf16(&self, t: &T, base: u64) -> Result<u64> {
        self.dev.launch(
            "copy_cast",
            (blocks(t.len()).min(self.dev.sm_count * 16), 1, 1),
            BLOCK,
            0,
            Args::new().ptr(base).i32(1).t(t).i64(t.len() as i64),
        )?;
        Ok(base)
    }

    /// Column-major `D[m, n] = alpha op(A) op(B) + beta D`, converting an f32 operand to bf16
    /// when the other one is bf16.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        a: (&T, u64, u64, i64, bool),
        b: (&T, u64, u64, i64, bool),
        d: &T,
        ldd: i64,
        m: u64,
        n: u64,
        beta: f32,
    ) -> Result<()> {
        let mut pa = dptr(a.0);
        let mut pb = dptr(b.0);
        let (mut ta, mut tb) = (a.0.dtype(), b.0.dtype());
        // cuBLASLt multiplies f32 by f32 into f32, or bf16 by bf16 into bf16 or f32: anything
        // else runs on bf16 copies of the f32 operands (in scratch).
        let all_f32 = ta == DType::F32 && tb == DType::F32 && d.dtype() == DType::F32;
        if !all_f32 && (ta == DType::F32 || tb == DType::F32) {
            let len = |t: &T, ty| if ty == DType::F32 { t.len() } else { 0 };
            let (na, nb) = (len(a.0, ta), len(b.0, tb));
            let s = self.dev.scratch((na + nb) * 2 + 512)?;
            if ta == DType::F32 {
                pa = self.as_bf16(a.0, s)?;
                ta = DType::Bf16;
            }
            if tb == DType::F32 {
                // 256-byte aligned after A's copy.
                pb = self.as_bf16(b.0, s + ((na * 2).div_ceil(256) * 256) as u64)?;
                tb = DType::Bf16;
            }
        }
        let opa = blas::Operand { ptr: pa, dtype: ta, rows: a.1, cols: a.2, ld: a.3, trans: a.4 };
        let opb = blas::Operand { ptr: pb, dtype: tb, rows: b.1, cols: b.2, ld: b.3, trans: b.4 };
        self.blas.matmul(
            self.dev.stream.0 as *mut std::ffi::c_void,
            self.blas_workspace,
            opa,
            opb,
            (dptr(d), d.dtype(), ldd),
            m,
            n,
            1.0,
            beta,
        )
    }

    /// Checks the out-of-range index flag (a synchronising read) and clears it.
    fn check_bad(&self) -> Result<()> {
        let mut v = [0i32; 1];
        self.dev.bind()?;
        // SAFETY: `bad` is a live 4-byte device buffer; the stream is synchronised before the
        // host reads `v`.
        unsafe {
            drv::memcpy_dtoh_async(&mut v, self.bad, self.dev.stream.0).map_err(|e| anyhow!("{e:?}"))?;
        }
        self.dev.sync()?;
        if v[0] != 0 {
            // SAFETY: as above.
            unsafe { drv::memset_d8_async(self.bad, 0, 4, self.dev.stream.0) }.map_err(|e| anyhow!("{e:?}"))?;
            anyhow::bail!("a token id or pooling index was outside its range (the outputs hold NaN there)");
        }
        Ok(())
    }

    /// The masked BCE partial sums and their in-order total: the loss into `loss` when given,
    /// and the mask's sum into a scratch slot whose device address is returned (valid until
    /// the next op's scratch).
    fn bce_sums(&self, loss: Option<&T>, logits: &T, targets: &T, mask: Option<&T>) -> Result<u64> {
        let n = logits.len();
        let k = blocks(n).min(1024) as usize;
        let part = self.dev.scratch(k * 16 + 16)?;
        let wsum = part + (k * 16) as u64;
        self.dev.launch(
            "bce_logits_partial",
            (k as u32, 1, 1),
            BLOCK,
            0,
            Args::new().ptr(part).t(logits).t(targets).opt(mask).i64(n as i64),
        )?;
        let out = loss.map_or(0, dptr);
        self.dev.launch(
            "bce_logits_final",
            (1, 1, 1),
            32,
            0,
            Args::new().ptr(out).ptr(wsum).ptr(part).i32(k as i32),
        )?;
        Ok(wsum)
    }

    /// `dwte[ids[k]] += dout[k]` over `ntok` tokens of width `d`, deterministic (see
    /// `embed.cu`): sort the (id, token) keys in chunks, merge them by rank, sum each id's run
    /// per piece of the sorted list, join the runs that cross pieces. Scratch: the chunk keys,
    /// the sorted keys and two piece sums per piece.
    fn token_table_grad(&self, dwte: &T, dout: &T, ids: &T, ntok: usize, d: usize) -> Result<()> {
        if ntok == 0 {
            return Ok(());
        }
        let vocab = (dwte.len() / d) as i32;
        let chunks = ntok.div_ceil(TOKEN_SORT_CHUNK);
        let pieces = ntok.div_ceil(TOKEN_PIECE);
        let align = |bytes: usize| bytes.div_ceil(256) * 256;
        let keys_bytes = align(chunks * TOKEN_SORT_CHUNK * 8);
        let sorted_bytes = align(ntok * 8);
        let base = self.dev.scratch(keys_bytes + sorted_bytes + 2 * pieces * d * 4)?;
        let (keys, sorted, partial) = (base, base + keys_bytes as u64, base + (keys_bytes + sorted_bytes) as u64);
        self.dev.launch(
            "token_embed_bwd_sort",
            (chunks as u32, 1, 1),
            TOKEN_SORT_CHUNK as u32,
            0,
            Args::new().ptr(keys).ptr(dptr(ids)).i64(ntok as i64).i32(vocab),
        )?;
        self.dev.launch(
            "token_embed_bwd_rank",
            ((chunks * TOKEN_SORT_CHUNK).div_ceil(256) as u32, 1, 1),
            256,
            0,
            Args::new().ptr(sorted).ptr(keys).i64(ntok as i64).i32(chunks as i32),
        )?;
        self.dev.launch(
            "token_embed_bwd_pieces",
            (pieces as u32, d.div_ceil(TOKEN_COLS) as u32, 1),
            TOKEN_COLS as u32,
            0,
            Args::new().t(dwte).ptr(partial).t(dout).ptr(sorted).i64(ntok as i64).i32(d as i32).i32(vocab),
        )?;
        if pieces > 1 {
            self.dev.launch(
                "token_embed_bwd_join",
                ((pieces - 1) as u32, d.div_ceil(32) as u32, 1),
                32 * TOKEN_JOIN_ROWS,
                0,
                Args::new()
                    .t(dwte)
                    .ptr(partial)
                    .ptr(sorted)
                    .i64(ntok as i64)
                    .i32(pieces as i32)
                    .i32(d as i32)
                    .i32(vocab),
            )?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_impl(
        &self,
        out: &T,
        mean: &T,
        rstd: &T,
        inp: &T,
        res: Option<(&T, &T)>,
        gamma: &T,
        beta: &T,
        n: usize,
        c: usize,
        eps: f32,
    ) {
        check_layernorm_fwd(out, mean, rstd, inp, gamma, beta, n, c);
        want_f32("layernorm mean", mean);
        want_f32("layernorm rstd", rstd);
        let (rp, rb, xp, xb) = match res {
            Some((r, x)) => {
                check_len("add+layernorm b", r, n * c);
                check_len("add+layernorm x", x, n * c);
                // x = inp + r may be written over inp (each thread reads its element first).
                in_place_or_disjoint(x, inp, &[x, out, mean, rstd], &[r, gamma, beta]);
                (dptr(r), is_bf(r), dptr(x), is_bf(x))
            }
            None => {
                outputs(&[out, mean, rstd], &[inp, gamma, beta]);
                (0, 0, 0, 0)
            }
        };
        if n == 0 || c == 0 {
            return;
        }
        self.launch(
            "layernorm_fwd",
            (n.div_ceil(8) as u32, 1, 1),
            256,
            0,
            Args::new()
                .t(out)
                .ptr(dptr(mean))
                .ptr(dptr(rstd))
                .t(inp)
                .ptr(rp)
                .i32(rb)
                .ptr(xp)
                .i32(xb)
                .t(gamma)
                .t(beta)
                .i64(n as i64)
                .i32(c as i32)
                .f32(eps),
        );
    }
}

impl Drop for Cuda {
    /// Destroys the timing events (the device and its pool drop after this).
    fn drop(&mut self) {
        if self.dev.sync().is_err() {
            return;
        }
        let t = self.timing.get_mut().expect("timing");
        let pending = t.pending.drain(..).flat_map(|(_, a, b)| [a, b]);
        for e in t.free.drain(..).chain(pending) {
            // SAFETY: events created by this backend, idle after the synchronisation.
            let _ = unsafe { drv::event::destroy(e.0) };
        }
    }
}

impl Backend for Cuda {
    type Storage = CudaStorage;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn limits(&self) -> crate::Limits {
        crate::limits::CUDA
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<T> {
        let bytes = len * elem_size(dtype);
        let (ptr, class) = self.dev.pool.alloc(bytes)?;
        let storage = CudaStorage { ptr, class, dtype, pool: self.dev.pool.clone() };
        self.dev.bind()?;
        // SAFETY: a live block of at least `bytes` bytes, zeroed in stream order.
        unsafe { drv::memset_d8_async(ptr, 0, bytes.max(1).min(class), self.dev.stream.0) }
            .map_err(|e| anyhow!("zeroing a new buffer: {e:?}"))?;
        Ok(Tensor::from_storage(Arc::new(storage), len, dtype))
    }

    fn upload_f32(&self, dst: &T, src: &[f32]) -> Result<()> {
        ensure!(dst.len() == src.len(), "upload of {} values into a tensor of {}", src.len(), dst.len());
        self.dev.bind()?;
        // SAFETY: the destination range lies inside the tensor's block; the host buffer lives
        // until the stream is synchronised below.
        unsafe {
            match dst.dtype() {
                DType::F32 => drv::memcpy_htod_async(dptr(dst), src, self.dev.stream.0),
                DType::Bf16 => {
                    let h: Vec<u16> = src.iter().map(|&x| f32_to_bf16(x)).collect();
                    let r = drv::memcpy_htod_async(dptr(dst), &h[..], self.dev.stream.0);
                    self.dev.sync()?;
                    r
                }
                DType::I32 => anyhow::bail!("upload_f32 into an i32 tensor"),
            }
        }
        .map_err(|e| anyhow!("host-to-device copy: {e:?}"))?;
        self.dev.sync()
    }

    fn upload_i32(&self, dst: &T, src: &[i32]) -> Result<()> {
        ensure!(dst.len() == src.len(), "upload of {} ids into a tensor of {}", src.len(), dst.len());
        ensure!(dst.dtype() == DType::I32, "upload_i32 into a {:?} tensor", dst.dtype());
        self.dev.bind()?;
        // SAFETY: as `upload_f32`.
        unsafe { drv::memcpy_htod_async(dptr(dst), src, self.dev.stream.0) }
            .map_err(|e| anyhow!("host-to-device copy: {e:?}"))?;
        self.dev.sync()
    }

    fn download_f32(&self, src: &T, dst: &mut [f32]) -> Result<()> {
        ensure!(dst.len() == src.len(), "download of a tensor of {} into {} values", src.len(), dst.len());
        self.dev.take_error()?;
        self.dev.bind()?;
        // SAFETY: the source range lies inside the tensor's block; the stream is synchronised
        // before the host reads the buffer.
        unsafe {
            match src.dtype() {
                DType::F32 => {
                    drv::memcpy_dtoh_async(dst, dptr(src), self.dev.stream.0).map_err(|e| anyhow!("{e:?}"))?;
                    self.dev.sync()?;
                }
                DType::Bf16 => {
                    let mut h = vec![0u16; dst.len()];
                    drv::memcpy_dtoh_async(&mut h[..], dptr(src), self.dev.stream.0).map_err(|e| anyhow!("{e:?}"))?;
                    self.dev.sync()?;
                    for (d, &x) in dst.iter_mut().zip(&h) {
                        *d = bf16_to_f32(x);
                    }
                }
                DType::I32 => {
                    let mut h = vec![0i32; dst.len()];
                    drv::memcpy_dtoh_async(&mut h[..], dptr(src), self.dev.stream.0).map_err(|e| anyhow!("{e:?}"))?;
                    self.dev.sync()?;
                    for (d, &x) in dst.iter_mut().zip(&h) {
                        *d = x as f32;
                    }
                }
            }
        }
        self.check_bad()
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.sync()?;
        self.resolve_timings();
        self.dev.take_error()?;
        self.check_bad()
    }

    fn fill(&self, t: &T, value: f32) {
        let _op = self.op(c"fill");
        assert_ne!(t.dtype(), DType::I32, "fill of an i32 tensor");
        self.ew("fill", t.len(), Args::new().t(t).i64(t.len() as i64).f32(value));
    }

    fn copy(&self, dst: &T, src: &T) {
        let _op = self.op(c"copy");
        outputs(&[dst], &[src]);
        check_len("copy", dst, src.len());
        if dst.dtype() == DType::I32 || src.dtype() == DType::I32 {
            assert_eq!(dst.dtype(), src.dtype(), "copy between i32 and float tensors");
            let r = self.dev.bind().and_then(|_| {
                // SAFETY: both ranges lie inside their blocks and do not overlap (checked).
                unsafe { drv::memcpy_dtod_async(dptr(dst), dptr(src), src.len() * 4, self.dev.stream.0) }
                    .map_err(|e| anyhow!("device copy: {e:?}"))
            });
            self.run(r);
            return;
        }
        self.ew("copy_cast", src.len(), Args::new().t(dst).t(src).i64(src.len() as i64));
    }

    fn add(&self, out: &T, a: &T, b: &T) {
        let _op = self.op(c"add");
        check_len("add a", a, out.len());
        check_len("add b", b, out.len());
        in_place_or_disjoint(out, a, &[out], &[b]);
        self.ew("add", out.len(), Args::new().t(out).t(a).t(b).i64(out.len() as i64));
    }

    fn accumulate(&self, acc: &T, x: &T) {
        let _op = self.op(c"accumulate");
        outputs(&[acc], &[x]);
        check_len("accumulate", x, acc.len());
        self.ew("accumulate", acc.len(), Args::new().t(acc).t(x).i64(acc.len() as i64));
    }

    fn scale(&self, t: &T, s: f32) {
        let _op = self.op(c"scale");
        self.ew("scale", t.len(), Args::new().t(t).i64(t.len() as i64).f32(s));
    }

    fn sum_squares(&self, out: &T, t: &T) {
        let _op = self.op(c"sum_squares");
        outputs(&[out], &[t]);
        want_f32("sum_squares out", out);
        let n = t.len();
        let k = blocks(n).min(1024) as usize;
        let r = self.dev.scratch(k * 8).and_then(|part| {
            self.dev.launch(
                "sum_squares_partial",
                (k as u32, 1, 1),
                BLOCK,
                0,
                Args::new().ptr(part).t(t).i64(n as i64),
            )?;
            self.dev.launch("sum_partials_f64", (1, 1, 1), 32, 0, Args::new().ptr(dptr(out)).ptr(part).i32(k as i32))
        });
        self.run(r);
    }

    fn clamp_max(&self, t: &T, max: f32) {
        let _op = self.op(c"clamp_max");
        self.ew("clamp_max", t.len(), Args::new().t(t).i64(t.len() as i64).f32(max));
    }

    fn linear_fwd(&self, out: &T, inp: &T, w: &T, bias: Option<&T>, n: usize, c: usize, oc: usize) {
        let _op = self.op(c"linear_fwd");
        check_linear_fwd(out, inp, w, bias, n, c, oc);
        if n == 0 || oc == 0 {
            return;
        }
        let r = (|| {
            if let Some(b) = bias {
                self.dev.launch(
                    "broadcast_rows",
                    (blocks(n * oc).min(self.dev.sm_count * 16), 1, 1),
                    BLOCK,
                    0,
                    Args::new().t(out).t(b).i64(n as i64).i64(oc as i64),
                )?;
            }
            // Column-major: out^T[oc, n] = (w stored [c, oc])^T . (inp stored [c, n]).
            let (c, oc_, n_) = (c as u64, oc as u64, n as u64);
            self.gemm(
                (w, c, oc_, c as i64, true),
                (inp, c, n_, c as i64, false),
                out,
                oc as i64,
                oc_,
                n_,
                if bias.is_some() { 1.0 } else { 0.0 },
            )
        })();
        self.run(r);
    }

    fn linear_bwd(
        &self,
        dinp: Option<&T>,
        dw: Option<&T>,
        dbias: Option<&T>,
        dout: &T,
        inp: &T,
        w: &T,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        let _op = self.op(c"linear_bwd");
        check_linear_bwd(dinp, dw, dbias, dout, inp, w, n, c, oc);
        if n == 0 {
            return;
        }
        let (c_, oc_, n_) = (c as u64, oc as u64, n as u64);
        if let Some(di) = dinp {
            // dinp^T[c, n] += (w stored [c, oc]) . (dout stored [oc, n]).
            let r =
                self.gemm((w, c_, oc_, c as i64, false), (dout, oc_, n_, oc as i64, false), di, c as i64, c_, n_, 1.0);
            self.run(r);
        }
        if let Some(dw) = dw {
            // dw^T[c, oc] += (inp stored [c, n]) . (dout stored [oc, n])^T.
            let r =
                self.gemm((inp, c_, n_, c as i64, false), (dout, oc_, n_, oc as i64, true), dw, c as i64, c_, oc_, 1.0);
            self.run(r);
        }
        if let Some(db) = dbias {
            let r = self.col_sums(db, dptr(dout), is_bf(dout), n, oc, oc, 1.0);
            self.run(r);
        }
    }

    fn layernorm_fwd(&self, out: &T, mean: &T, rstd: &T, inp: &T, gamma: &T, beta: &T, n: usize, c: usize, eps: f32) {
        let _op = self.op(c"layernorm_fwd");
        self.layernorm_impl(out, mean, rstd, inp, None, gamma, beta, n, c, eps);
    }

    fn add_layernorm_fwd(
        &self,
        out: &T,
        x: &T,
        mean: &T,
        rstd: &T,
        a: &T,
        b: &T,
        gamma: &T,
        beta: &T,
        n: usize,
        c: usize,
        eps: f32,
    ) {
        let _op = self.op(c"add_layernorm_fwd");
        self.layernorm_impl(out, mean, rstd, a, Some((b, x)), gamma, beta, n, c, eps);
    }

    fn layernorm_bwd(
        &self,
        dinp: &T,
        dgamma: Option<&T>,
        dbeta: Option<&T>,
        dout: &T,
        inp: &T,
        gamma: &T,
        mean: &T,
        rstd: &T,
        n: usize,
        c: usize,
    ) {
        let _op = self.op(c"layernorm_bwd");
        check_layernorm_bwd(dinp, dgamma, dbeta, dout, inp, gamma, mean, rstd, n, c);
        want_f32("layernorm mean", mean);
        want_f32("layernorm rstd", rstd);
        if n == 0 || c == 0 {
            return;
        }
        let nb = n.div_ceil(32);
        let r = (|| {
            let part = self.dev.scratch(2 * nb * c * 4)?;
            let pg = if dgamma.is_some() { part } else { 0 };
            let pb = if dbeta.is_some() { part + (nb * c * 4) as u64 } else { 0 };
            self.dev.launch(
                "layernorm_bwd",
                (nb as u32, 1, 1),
                256,
                0,
                Args::new()
                    .t(dinp)
                    .ptr(pg)
                    .ptr(pb)
                    .t(dout)
                    .t(inp)
                    .t(gamma)
                    .ptr(dptr(mean))
                    .ptr(dptr(rstd))
                    .i64(n as i64)
                    .i32(c as i32),
            )?;
            for (t, p) in [(dgamma, pg), (dbeta, pb)] {
                if let Some(t) = t {
                    self.dev.launch(
                        "col_sum_final",
                        (blocks(c), 1, 1),
                        BLOCK,
                        0,
                        Args::new().t(t).ptr(p).i64(nb as i64).i64(c as i64).i64(c as i64).f32(1.0),
                    )?;
                }
            }
            Ok(())
        })();
        self.run(r);
    }

    fn l2norm_fwd(&self, out: &T, norm: &T, inp: &T, n: usize, d: usize) {
        let _op = self.op(c"l2norm_fwd");
        check_len("l2norm inp", inp, n * d);
        check_len("l2norm out", out, n * d);
        check_len("l2norm norm", norm, n);
        want_f32("l2norm norm", norm);
        outputs(&[out, norm], &[inp]);
        self.launch(
            "l2norm_fwd",
            (n.div_ceil(8).max(1) as u32, 1, 1),
            256,
            0,
            Args::new().t(out).ptr(dptr(norm)).t(inp).i64(n as i64).i32(d as i32),
        );
    }

    fn l2norm_bwd(&self, dinp: &T, dout: &T, out: &T, norm: &T, n: usize, d: usize) {
        let _op = self.op(c"l2norm_bwd");
        check_len("l2norm dinp", dinp, n * d);
        check_len("l2norm dout", dout, n * d);
        want_f32("l2norm norm", norm);
        outputs(&[dinp], &[dout, out, norm]);
        self.launch(
            "l2norm_bwd",
            (n.div_ceil(8).max(1) as u32, 1, 1),
            256,
            0,
            Args::new().t(dinp).t(dout).t(out).ptr(dptr(norm)).i64(n as i64).i32(d as i32),
        );
    }

    fn act_fwd(&self, kind: Activation, out: &T, inp: &T) {
        let _op = self.op(c"act_fwd");
        check_len("activation out", out, inp.len());
        outputs(&[out], &[inp]);
        let k = (kind == Activation::Gelu) as i32;
        self.ew("act_fwd", inp.len(), Args::new().i32(k).t(out).t(inp).ptr(0).i32(0).i64(inp.len() as i64).i64(1));
    }

    fn act_bwd(&self, kind: Activation, dinp: &T, dout: &T, inp: &T) {
        let _op = self.op(c"act_bwd");
        check_len("activation dinp", dinp, inp.len());
        check_len("activation dout", dout, inp.len());
        outputs(&[dinp], &[dout, inp]);
        let k = (kind == Activation::Gelu) as i32;
        self.ew(
            "act_bwd",
            inp.len(),
            Args::new().i32(k).t(dinp).t(dout).t(inp).ptr(0).i32(0).i64(inp.len() as i64).i64(1),
        );
    }

    fn attention_saved_len(&self, b: usize, t: usize, h: usize) -> usize {
        b * h * t
    }

    fn attention_fwd(&self, out: &T, saved: &T, qkv: &T, b: usize, t: usize, h: usize, hd: usize, causal: bool) {
        let _op = self.op(c"attention_fwd");
        let variant = attention_variant(hd);
        check_len("attention qkv", qkv, b * t * 3 * h * hd);
        check_len("attention out", out, b * t * h * hd);
        check_len("attention saved", saved, b * h * t);
        want_f32("attention saved log-sum-exps", saved);
        outputs(&[out, saved], &[qkv]);
        if b * t * h == 0 {
            return;
        }
        let r = self.dev.launch_variant(
            "attn_fwd",
            variant,
            (t.div_ceil(64) as u32, (b * h) as u32, 1),
            128,
            0,
            Args::new()
                .t(out)
                .ptr(dptr(saved))
                .t(qkv)
                .i32(b as i32)
                .i32(t as i32)
                .i32(h as i32)
                .i32(causal as i32)
                .f32(1.0 / (hd as f32).sqrt()),
        );
        self.run(r);
    }

    fn attention_bwd(
        &self,
        dqkv: &T,
        dout: &T,
        qkv: &T,
        out: &T,
        saved: &T,
        b: usize,
        t: usize,
        h: usize,
        hd: usize,
        causal: bool,
    ) {
        let _op = self.op(c"attention_bwd");
        let variant = attention_variant(hd);
        check_len("attention dqkv", dqkv, b * t * 3 * h * hd);
        check_len("attention dout", dout, b * t * h * hd);
        check_len("attention saved", saved, b * h * t);
        want_f32("attention saved log-sum-exps", saved);
        outputs(&[dqkv], &[dout, qkv, out, saved]);
        if b * t * h == 0 {
            return;
        }
        let rows = b * h * t;
        let r = (|| {
            let dsum = self.dev.scratch(rows * 4)?;
            self.dev.launch_variant(
                "attn_bwd_dot",
                variant,
                (rows.div_ceil(8) as u32, 1, 1),
                256,
                0,
                Args::new().ptr(dsum).t(dout).t(out).i32(b as i32).i32(t as i32).i32(h as i32),
            )?;
            for entry in ["attn_bwd_dq", "attn_bwd_dkv"] {
                self.dev.launch_variant(
                    entry,
                    variant,
                    (t.div_ceil(64) as u32, (b * h) as u32, 1),
                    128,
                    0,
                    Args::new()
                        .t(dqkv)
                        .t(dout)
                        .t(qkv)
                        .ptr(dptr(saved))
                        .ptr(dsum)
                        .i32(b as i32)
                        .i32(t as i32)
                        .i32(h as i32)
                        .i32(causal as i32)
                        .f32(1.0 / (hd as f32).sqrt()),
                )?;
            }
            Ok(())
        })();
        self.run(r);
    }

    fn im2col(&self, cols: &T, pixels: &T, b: usize, img: usize, p: usize) {
        let _op = self.op(c"im2col");
        assert!((img / p) * p == img, "image size {img} is not a multiple of the patch size {p}");
        check_len("im2col pixels", pixels, b * 3 * img * img);
        check_len("im2col cols", cols, b * 3 * img * img);
        outputs(&[cols], &[pixels]);
        self.ew("im2col", cols.len(), Args::new().t(cols).t(pixels).i64(b as i64).i32(img as i32).i32(p as i32));
    }

    /// One thread per column element, each adding into its own pixel (patches do not
    /// overlap: no two threads share a destination, so no atomics).
    fn im2col_bwd(&self, dpixels: &T, dcols: &T, b: usize, img: usize, p: usize) {
        let _op = self.op(c"im2col_bwd");
        assert!((img / p) * p == img, "image size {img} is not a multiple of the patch size {p}");
        check_len("im2col_bwd dpixels", dpixels, b * 3 * img * img);
        check_len("im2col_bwd dcols", dcols, b * 3 * img * img);
        outputs(&[dpixels], &[dcols]);
        self.ew("col2im", dpixels.len(), Args::new().t(dpixels).t(dcols).i64(b as i64).i32(img as i32).i32(p as i32));
    }

    fn vision_embed_fwd(&self, out: &T, patches: &T, cls: &T, pos: &T, b: usize, np: usize, d: usize) {
        let _op = self.op(c"vision_embed_fwd");
        check_vision_embed_fwd(out, patches, cls, pos, b, np, d);
        self.ew(
            "vision_embed_fwd",
            out.len(),
            Args::new().t(out).t(patches).t(cls).t(pos).i64(b as i64).i32(np as i32).i32(d as i32),
        );
    }

    fn vision_embed_bwd(
        &self,
        dpatches: Option<&T>,
        dcls: Option<&T>,
        dpos: Option<&T>,
        dout: &T,
        b: usize,
        np: usize,
        d: usize,
    ) {
        let _op = self.op(c"vision_embed_bwd");
        check_vision_embed_bwd(dpatches, dcls, dpos, dout, b, np, d);
        if let Some(dp) = dpatches {
            self.ew(
                "vision_embed_bwd_patches",
                dp.len(),
                Args::new().t(dp).t(dout).i64(b as i64).i32(np as i32).i32(d as i32),
            );
        }
        let seq = (np + 1) * d;
        // Both batch sums come from one set of column partial sums of dout viewed as [b, seq].
        if dcls.is_some() || dpos.is_some() {
            let r = (|| {
                let rpc = 256usize;
                let chunks = b.div_ceil(rpc).max(1);
                let part = self.dev.scratch(chunks * seq * 4)?;
                self.dev.launch(
                    "col_sum_partial",
                    (seq.div_ceil(256) as u32, chunks as u32, 1),
                    256,
                    0,
                    Args::new().ptr(part).t(dout).i64(b as i64).i64(seq as i64).i64(rpc as i64),
                )?;
                for (t, take) in [(dcls, d), (dpos, seq)] {
                    if let Some(t) = t {
                        self.dev.launch(
                            "col_sum_final",
                            (blocks(take), 1, 1),
                            BLOCK,
                            0,
                            Args::new().t(t).ptr(part).i64(chunks as i64).i64(take as i64).i64(seq as i64).f32(1.0),
                        )?;
                    }
                }
                Ok(())
            })();
            self.run(r);
        }
    }

    fn token_embed_fwd(&self, out: &T, ids: &T, wte: &T, wpe: &T, b: usize, t: usize, d: usize) {
        let _op = self.op(c"token_embed_fwd");
        check_len("token embed out", out, b * t * d);
        check_len("token embed ids", ids, b * t);
        assert_eq!(ids.dtype(), DType::I32, "token ids must be an i32 tensor");
        assert!(wpe.len() >= t * d, "position embedding has fewer than {t} rows");
        outputs(&[out], &[wte, wpe]);
        self.ew(
            "token_embed_fwd",
            out.len(),
            Args::new()
                .t(out)
                .ptr(dptr(ids))
                .t(wte)
                .t(wpe)
                .i64(b as i64)
                .i32(t as i32)
                .i32(d as i32)
                .i32((wte.len() / d) as i32)
                .ptr(self.bad),
        );
    }

    fn token_embed_bwd(&self, dwte: Option<&T>, dwpe: Option<&T>, dout: &T, ids: &T, b: usize, t: usize, d: usize) {
        let _op = self.op(c"token_embed_bwd");
        check_len("token embed dout", dout, b * t * d);
        check_len("token embed ids", ids, b * t);
        let outs: Vec<&T> = [dwte, dwpe].into_iter().flatten().collect();
        outputs(&outs, &[dout]);
        if let Some(e) = dwte {
            let r = self.token_table_grad(e, dout, ids, b * t, d);
            self.run(r);
        }
        if let Some(p) = dwpe {
            let r = self.col_sums(p, dptr(dout), is_bf(dout), b, t * d, t * d, 1.0);
            self.run(r);
        }
    }

    fn gather_rows(&self, out: &T, inp: &T, index: &T, b: usize, t: usize, d: usize) {
        let _op = self.op(c"gather_rows");
        check_len("gather out", out, b * d);
        check_len("gather inp", inp, b * t * d);
        check_len("gather index", index, b);
        assert_eq!(index.dtype(), DType::I32, "gather index must be an i32 tensor");
        outputs(&[out], &[inp]);
        self.ew(
            "gather_rows",
            out.len(),
            Args::new().t(out).t(inp).ptr(dptr(index)).i64(b as i64).i32(t as i32).i32(d as i32).ptr(self.bad),
        );
    }

    fn gather_rows_bwd(&self, dinp: &T, dout: &T, index: &T, b: usize, t: usize, d: usize) {
        let _op = self.op(c"gather_rows_bwd");
        check_len("gather dinp", dinp, b * t * d);
        check_len("gather dout", dout, b * d);
        outputs(&[dinp], &[dout]);
        self.ew(
            "gather_rows_bwd",
            dout.len(),
            Args::new().t(dinp).t(dout).ptr(dptr(index)).i64(b as i64).i32(t as i32).i32(d as i32),
        );
    }

    fn infonce_block_fwd(
        &self,
        row_lse: &T,
        pos: &T,
        col_max: &T,
        col_sum: &T,
        img: &T,
        all_txt: &T,
        logit_scale: &T,
        dims: InfoNceDims,
    ) {
        let _op = self.op(c"infonce_block_fwd");
        check_infonce(&dims, img, all_txt);
        check_len("infonce row_lse", row_lse, dims.local);
        check_len("infonce pos", pos, dims.local);
        check_len("infonce col_max", col_max, dims.global);
        check_len("infonce col_sum", col_sum, dims.global);
        for (w, t) in [
            ("row_lse", row_lse),
            ("pos", pos),
            ("col_max", col_max),
            ("col_sum", col_sum),
            ("logit_scale", logit_scale),
        ] {
            want_f32(&format!("infonce {w}"), t);
        }
        outputs(&[row_lse, pos, col_max, col_sum], &[img, all_txt, logit_scale]);
        let InfoNceDims { local, global, dim, offset } = dims;
        let r = (|| {
            let smem = self.infonce_smem_checked(dim)?;
            // One pass: the images fixed in row groups, the texts streamed in splits; each
            // logit feeds its row's and its column's statistics.
            let (groups, rtiles) = infonce_row_groups(local, global, self.infonce_resident("infonce_fwd_block", smem));
            let (rsplits, rchunk) = self.infonce_splits("infonce_fwd_block", groups * 64, global, 1, smem);
            let csplits = groups;
            let (rl, cl) = (rsplits * local, csplits * global);
            let base = self.dev.scratch((2 * rl + 2 * cl) * 4)?;
            let (rpm, rpl) = (base, base + (rl * 4) as u64);
            let (cpm, cpl) = (base + (2 * rl * 4) as u64, base + ((2 * rl + cl) * 4) as u64);
            self.dev.launch(
                "infonce_fwd_block",
                (groups as u32, rsplits as u32, 1),
                256,
                smem,
                Args::new()
                    .t(img)
                    .i64(local as i64)
                    .t(all_txt)
                    .i64(global as i64)
                    .i32(dim as i32)
                    .i64(rchunk as i64)
                    .i32(rtiles as i32)
                    .i64(offset as i64)
                    .ptr(dptr(logit_scale))
                    .ptr(rpm)
                    .ptr(rpl)
                    .ptr(cpm)
                    .ptr(cpl)
                    .ptr(dptr(pos)),
            )?;
            self.dev.launch(
                "infonce_block_fwd_finish",
                (blocks(local + global).min(self.dev.sm_count * 16), 1, 1),
                BLOCK,
                0,
                Args::new()
                    .ptr(dptr(row_lse))
                    .ptr(dptr(col_max))
                    .ptr(dptr(col_sum))
                    .ptr(rpm)
                    .ptr(rpl)
                    .i64(local as i64)
                    .i32(rsplits as i32)
                    .ptr(cpm)
                    .ptr(cpl)
                    .i64(global as i64)
                    .i32(csplits as i32),
            )
        })();
        self.run(r);
    }

    fn infonce_col_rescale(&self, col_sum: &T, col_max: &T, global_max: &T) {
        let _op = self.op(c"infonce_col_rescale");
        let n = col_sum.len();
        check_len("infonce col_max", col_max, n);
        check_len("infonce global_max", global_max, n);
        for (w, t) in [("col_sum", col_sum), ("col_max", col_max), ("global_max", global_max)] {
            want_f32(&format!("infonce {w}"), t);
        }
        outputs(&[col_sum], &[col_max, global_max]);
        self.ew(
            "infonce_col_rescale",
            n,
            Args::new().ptr(dptr(col_sum)).ptr(dptr(col_max)).ptr(dptr(global_max)).i64(n as i64),
        );
    }

    fn infonce_block_loss(
        &self,
        loss: &T,
        col_lse: &T,
        row_lse: &T,
        pos: &T,
        global_max: &T,
        col_sum: &T,
        dims: InfoNceDims,
    ) {
        let _op = self.op(c"infonce_block_loss");
        let InfoNceDims { local, global, offset, .. } = dims;
        assert!(local > 0 && offset + local <= global, "infonce: rows {dims:?} outside the global batch");
        check_len("infonce loss", loss, 1);
        for (w, t, n) in [
            ("col_lse", col_lse, global),
            ("row_lse", row_lse, local),
            ("pos", pos, local),
            ("global_max", global_max, global),
            ("col_sum", col_sum, global),
        ] {
            check_len(&format!("infonce {w}"), t, n);
            want_f32(&format!("infonce {w}"), t);
        }
        want_f32("infonce loss", loss);
        outputs(&[loss, col_lse], &[row_lse, pos, global_max, col_sum]);
        self.ew(
            "infonce_col_lse",
            global,
            Args::new().ptr(dptr(col_lse)).ptr(dptr(global_max)).ptr(dptr(col_sum)).i64(global as i64),
        );
        self.launch(
            "infonce_block_loss",
            (1, 1, 1),
            256,
            0,
            Args::new()
                .ptr(dptr(loss))
                .ptr(dptr(row_lse))
                .ptr(dptr(pos))
                .ptr(dptr(global_max))
                .ptr(dptr(col_sum))
                .i64(local as i64)
                .i64(offset as i64)
                .f32(1.0 / (2.0 * global as f32)),
        );
    }

    fn infonce_block_bwd(
        &self,
        d_img: &T,
        d_all_txt: &T,
        d_logit_scale: Option<&T>,
        dloss: f32,
        img: &T,
        all_txt: &T,
        logit_scale: &T,
        row_lse: &T,
        col_lse: &T,
        dims: InfoNceDims,
    ) {
        let _op = self.op(c"infonce_block_bwd");
        check_infonce(&dims, img, all_txt);
        check_infonce(&dims, d_img, d_all_txt);
        check_len("infonce row_lse", row_lse, dims.local);
        check_len("infonce col_lse", col_lse, dims.global);
        for (w, t) in [("row_lse", row_lse), ("col_lse", col_lse), ("logit_scale", logit_scale)] {
            want_f32(&format!("infonce {w}"), t);
        }
        if let Some(t) = d_logit_scale {
            want_f32("infonce d_logit_scale", t);
        }
        let mut outs = vec![d_img, d_all_txt];
        outs.extend(d_logit_scale);
        outputs(&outs, &[img, all_txt, logit_scale, row_lse, col_lse]);
        let InfoNceDims { local, global, dim, offset } = dims;
        let row_tiles = local.div_ceil(64);
        let coef = dloss / (2.0 * global as f32);
        let nz = infonce_chunks(dim).1 as u32;
        let r = (|| {
            let smem = self.infonce_smem_checked(dim)?;
            let (splits, chunk) = self.infonce_splits("infonce_bwd_rows", local, global, nz as usize, smem);
            let part_d_len = splits * local * dim;
            let nds = splits * row_tiles;
            let base = self.dev.scratch((part_d_len + nds) * 4)?;
            let part_ds = base + (part_d_len * 4) as u64;
            // The images' gradient: images fixed, texts streamed in splits.
            self.dev.launch(
                "infonce_bwd_rows",
                (row_tiles as u32, splits as u32, nz),
                256,
                smem,
                Args::new()
                    .t(img)
                    .i64(local as i64)
                    .t(all_txt)
                    .i64(global as i64)
                    .i32(dim as i32)
                    .i64(chunk as i64)
                    .i64(offset as i64)
                    .ptr(dptr(row_lse))
                    .ptr(dptr(col_lse))
                    .ptr(dptr(logit_scale))
                    .f32(coef)
                    .ptr(base)
                    .ptr(part_ds),
            )?;
            self.dev.launch(
                "infonce_reduce_rows",
                (blocks(local * dim).min(self.dev.sm_count * 16), 1, 1),
                BLOCK,
                0,
                Args::new().t(d_img).ptr(base).i32(splits as i32).i64((local * dim) as i64).ptr(dptr(logit_scale)),
            )?;
            // The texts' gradient: texts fixed, all images streamed (the same logits again).
            self.dev.launch(
                "infonce_bwd_cols",
                (global.div_ceil(64) as u32, 1, nz),
                256,
                smem,
                Args::new()
                    .t(all_txt)
                    .i64(global as i64)
                    .t(img)
                    .i64(local as i64)
                    .i32(dim as i32)
                    .i64(offset as i64)
                    .ptr(dptr(col_lse))
                    .ptr(dptr(row_lse))
                    .ptr(dptr(logit_scale))
                    .f32(coef)
                    .t(d_all_txt),
            )?;
            if let Some(t) = d_logit_scale {
                self.dev.launch(
                    "infonce_finish_scale",
                    (1, 1, 1),
                    32,
                    0,
                    Args::new().ptr(dptr(t)).ptr(part_ds).i64(nds as i64),
                )?;
            }
            Ok(())
        })();
        self.run(r);
    }

    fn bce_with_logits_fwd(&self, loss: &T, logits: &T, targets: &T, mask: Option<&T>) {
        let _op = self.op(c"bce_with_logits_fwd");
        check_bce(logits, targets, mask);
        check_len("bce loss", loss, 1);
        want_f32("bce loss", loss);
        let mut ins = vec![logits, targets];
        ins.extend(mask);
        outputs(&[loss], &ins);
        if logits.is_empty() {
            self.fill(loss, 0.0);
            return;
        }
        let r = self.bce_sums(Some(loss), logits, targets, mask);
        self.run(r.map(|_| ()));
    }

    fn bce_with_logits_bwd(&self, dlogits: &T, logits: &T, targets: &T, mask: Option<&T>, dloss: f32) {
        let _op = self.op(c"bce_with_logits_bwd");
        check_bce(logits, targets, mask);
        check_len("bce dlogits", dlogits, logits.len());
        let mut ins = vec![logits, targets];
        ins.extend(mask);
        outputs(&[dlogits], &ins);
        let n = logits.len();
        if n == 0 {
            return;
        }
        let r = (|| {
            // With a mask, the kernel reads the denominator (the mask's sum) from the device.
            let wsum = if mask.is_some() { self.bce_sums(None, logits, targets, mask)? } else { 0 };
            self.dev.launch(
                "bce_logits_bwd",
                (blocks(n).min(self.dev.sm_count * 16), 1, 1),
                BLOCK,
                0,
                Args::new().t(dlogits).t(logits).t(targets).opt(mask).ptr(wsum).i64(n as i64).f32(dloss),
            )
        })();
        self.run(r);
    }

    fn adamw_with_bf16_copy(&self, param: &T, grad: &T, m: &T, v: &T, copy: Option<&T>, hp: AdamWStep) {
        let _op = self.op(c"adamw");
        let n = param.len();
        want_f32("adamw param", param);
        want_f32("adamw m", m);
        want_f32("adamw v", v);
        check_adamw(param, grad, m, v, copy);
        if let Some(c) = copy {
            assert_eq!(c.dtype(), DType::Bf16, "adamw copy must be a bf16 tensor");
        }
        let AdamWConsts { decay, step_size, inv_sqrt_bc2 } = AdamWConsts::new(hp);
        self.ew(
            "adamw",
            n,
            Args::new()
                .ptr(dptr(param))
                .t(grad)
                .ptr(dptr(m))
                .ptr(dptr(v))
                .ptr(copy.map(dptr).unwrap_or(0))
                .i64(n as i64)
                .f32(hp.beta1)
                .f32(hp.beta2)
                .f32(hp.eps)
                .f32(decay)
                .f32(step_size)
                .f32(inv_sqrt_bc2),
        );
    }
}

impl Cuda {
    /// The split of the global columns for an InfoNCE tile kernel (`entry`, with `nz` chunks
    /// of output columns and `smem` bytes of shared memory per block): as many blocks as the
    /// device holds at once, from the driver's occupancy calculator (registers, shared memory;
    /// at width 512 the tiles take 140 KB, one block per multiprocessor). Where the calculator
    /// fails, from shared memory alone.
    fn infonce_splits(&self, entry: &'static str, local: usize, global: usize, nz: usize, smem: u32) -> (usize, usize) {
        infonce_split_plan(global, local.div_ceil(64).max(1) * nz, self.infonce_resident(entry, smem))
    }

    /// Blocks of an InfoNCE kernel that fit on the device at once.
    fn infonce_resident(&self, entry: &'static str, smem: u32) -> usize {
        let per_sm =
            self.dev.blocks_per_sm(entry, 256, smem).unwrap_or_else(|_| (self.dev.smem_per_sm / (smem + 1024)).max(1))
                as usize;
        per_sm * self.dev.sm_count as usize
    }

    /// The InfoNCE kernels' shared memory for `dim`, or an error naming the device's limit.
    fn infonce_smem_checked(&self, dim: usize) -> Result<u32> {
        let smem = infonce_smem(dim);
        ensure!(
            smem <= self.dev.smem_optin,
            "the InfoNCE kernels need {} KB of shared memory per block at width {dim}, this device allows {} KB",
            smem / 1024,
            self.dev.smem_optin / 1024
        );
        Ok(smem)
    }
}

/// The attention module of a head dimension; panics with the limit's one line when there is
/// none (ops cannot return errors; the coordinator checks the limits before a run starts).
fn attention_variant(hd: usize) -> &'static nvrtc::Variant {
    if let Err(e) = crate::limits::CUDA.check_head_dim("attention", hd) {
        panic!("{e}");
    }
    nvrtc::attention_variant(hd).expect("limits::CUDA lists only compiled head dimensions")
}

/// The shared InfoNCE checks plus the CUDA kernels' limit on the feature dimension (see
/// `limits::CUDA`: any width since the kernels walk wide features in chunks).
fn check_infonce(dims: &InfoNceDims, img: &T, all_txt: &T) {
    shapes::check_infonce(dims, img, all_txt);
    if let Err(e) = crate::limits::CUDA.check_infonce_dim(dims.dim) {
        panic!("{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infonce_chunks_pad_and_split_the_width() {
        assert_eq!(infonce_chunks(1), (64, 1));
        assert_eq!(infonce_chunks(96), (128, 1));
        assert_eq!(infonce_chunks(512), (512, 1));
        assert_eq!(infonce_chunks(513), (512, 2));
        assert_eq!(infonce_chunks(768), (512, 2));
        assert_eq!(infonce_chunks(1000), (512, 2));
        assert_eq!(infonce_chunks(1024), (512, 2));
        assert_eq!(infonce_chunks(1025), (512, 3));
        // 142 KB at width 512 (and at every wider one): one block per Hopper multiprocessor.
        assert_eq!(infonce_smem(512), 145_664);
        assert_eq!(infonce_smem(4096), infonce_smem(512));
        assert_eq!(infonce_smem(64), 2 * 64 * 72 * 2 + 64 * 72 * 2 + 64 * 4 + 4 * 64 * 4 + 8 * 64 * 4);
    }

    #[test]
    fn infonce_splits_fill_the_device_once() {
        // H100, width 512 (one resident block per SM), 4 row tiles, 64 column tiles: 32 splits
        // of 2 tiles, 128 blocks in one wave on 132 SMs (two per SM would fit 64 splits).
        assert_eq!(infonce_split_plan(4096, 4, 132), (32, 128));
        assert_eq!(infonce_split_plan(4096, 4, 264), (64, 64));
        // The bench's 2048 local rows (32 row tiles) x 16384 columns: 4 splits, 128 blocks,
        // one wave; 5 splits would spill 28 blocks into a second wave.
        assert_eq!(infonce_split_plan(16_384, 32, 132), (4, 4096));
        // Every split holds a multiple of 64 columns and together they cover all of them.
        for (global, bps, resident) in [(37, 1, 132), (1000, 3, 528), (4096, 64, 132), (130, 2, 1), (262_144, 32, 132)]
        {
            let (splits, chunk) = infonce_split_plan(global, bps, resident);
            assert_eq!(chunk % 64, 0);
            assert!(splits * chunk >= global && (splits - 1) * chunk < global, "{global} {bps} {resident}");
        }
    }

    #[test]
    fn infonce_row_groups_balance_the_partials() {
        // 8 ranks of 8,192 against 65,536 on 132 SMs: 4 groups of 32 row tiles (then ~33
        // splits): partials of 33 x 8,192 rows and 4 x 65,536 columns, both ~2 MB.
        assert_eq!(infonce_row_groups(8192, 65_536, 132), (4, 32));
        assert_eq!(infonce_row_groups(2048, 16_384, 132), (4, 8));
        assert_eq!(infonce_row_groups(64, 64, 132), (1, 1));
        assert_eq!(infonce_row_groups(100, 300, 16), (2, 1));
        // One rank holding the whole batch: more groups, never more than its row tiles.
        assert_eq!(infonce_row_groups(4096, 4096, 132), (11, 6));
        for (local, global, resident) in
            [(1, 1, 1), (37, 37, 132), (1000, 7, 528), (70_000, 3, 132), (5, 1_000_000, 132)]
        {
            let (groups, per) = infonce_row_groups(local, global, resident);
            let tiles = local.div_ceil(64);
            assert!(groups * per >= tiles && (groups - 1) * per < tiles, "{local} {global} {resident}");
        }
    }
}
