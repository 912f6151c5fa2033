//! The device side of the CUDA backend: context, streams, the caching allocator, module and
//! function cache, kernel launches, events and the scratch buffer.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use cudarc::driver::result as drv;
use cudarc::driver::sys;
use cudarc::driver::CudaContext;

use super::{libs, nvrtc};
use crate::backend::DType;

/// A raw driver handle that may cross threads (the driver's handles are thread-safe; the
/// backend binds its context on every call).
#[derive(Clone, Copy, Debug)]
pub struct Raw<T>(pub T);
// SAFETY: CUDA driver handles (streams, modules, functions, events) may be used from any
// thread once the owning context is current there, which the backend ensures.
unsafe impl<T> Send for Raw<T> {}
unsafe impl<T> Sync for Raw<T> {}

pub fn elem_size(d: DType) -> usize {
    match d {
        DType::F32 | DType::I32 => 4,
        DType::Bf16 => 2,
    }
}

/// Bytes rounded up to the allocator's size classes: powers of two up to 1 MiB, then whole MiB.
fn size_class(bytes: usize) -> usize {
    let b = bytes.max(256);
    if b <= 1 << 20 {
        b.next_power_of_two()
    } else {
        b.div_ceil(1 << 20) << 20
    }
}

/// A caching device allocator: freed blocks go to a free list per size class and are handed
/// out again, so a training loop that frees and allocates the same shapes never reaches
/// cuMemAlloc after its first step. Memory is returned to the driver when the pool drops.
pub struct Pool {
    ctx: Arc<CudaContext>,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    free: HashMap<usize, Vec<sys::CUdeviceptr>>,
    in_use: usize,
    cached: usize,
    peak: usize,
}

impl Pool {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        Self { ctx, state: Mutex::new(PoolState::default()) }
    }

    /// A block of at least `bytes` and its size class.
    pub fn alloc(&self, bytes: usize) -> Result<(sys::CUdeviceptr, usize)> {
        let class = size_class(bytes);
        let mut st = self.state.lock().expect("allocator lock");
        let ptr = match st.free.get_mut(&class).and_then(|v| v.pop()) {
            Some(p) => {
                st.cached -= class;
                p
            }
            None => {
                self.ctx.bind_to_thread().map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
                // SAFETY: a plain device allocation in the bound context.
                match unsafe { drv::malloc_sync(class) } {
                    Ok(p) => p,
                    Err(_) => {
                        // Give the cached blocks back and try once more.
                        for (_, v) in st.free.drain() {
                            for p in v {
                                // SAFETY: cached blocks are owned by the pool and unused.
                                let _ = unsafe { drv::free_sync(p) };
                            }
                        }
                        st.cached = 0;
                        // SAFETY: as above.
                        unsafe { drv::malloc_sync(class) }
                            .map_err(|e| anyhow!("device allocation of {class} bytes failed: {e:?}"))?
                    }
                }
            }
        };
        st.in_use += class;
        st.peak = st.peak.max(st.in_use);
        Ok((ptr, class))
    }

    pub fn release(&self, ptr: sys::CUdeviceptr, class: usize) {
        let mut st = self.state.lock().expect("allocator lock");
        st.in_use -= class;
        st.cached += class;
        st.free.entry(class).or_default().push(ptr);
    }

    /// (bytes in use, bytes cached for reuse, peak bytes in use since the last reset).
    pub fn stats(&self) -> (usize, usize, usize) {
        let st = self.state.lock().expect("allocator lock");
        (st.in_use, st.cached, st.peak)
    }

    pub fn reset_peak(&self) {
        let mut st = self.state.lock().expect("allocator lock");
        st.peak = st.in_use;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        let st = self.state.get_mut().expect("allocator lock");
        for (_, v) in st.free.drain() {
            for p in v {
                // SAFETY: every cached block was allocated by this pool and is unused.
                let _ = unsafe { drv::free_sync(p) };
            }
        }
    }
}

/// Storage of one CUDA buffer: a block of the pool, returned to it on drop.
pub struct CudaStorage {
    pub(crate) ptr: sys::CUdeviceptr,
    pub(crate) class: usize,
    pub(crate) dtype: DType,
    pub(crate) pool: Arc<Pool>,
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        self.pool.release(self.ptr, self.class);
    }
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage({:?}, {} bytes)", self.dtype, self.class)
    }
}

/// Kernel arguments, each in its own 8-byte slot (little endian: a 4-byte value sits in the
/// low bytes), passed to cuLaunchKernel as an array of pointers to the slots.
#[derive(Default)]
pub struct Args {
    slots: Vec<u64>,
}

impl Args {
    pub fn new() -> Self {
        Self { slots: Vec::with_capacity(24) }
    }
    pub fn ptr(mut self, p: u64) -> Self {
        self.slots.push(p);
        self
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.slots.push(v as u32 as u64);
        self
    }
    pub fn i64(mut self, v: i64) -> Self {
        self.slots.push(v as u64);
        self
    }
    pub fn f32(mut self, v: f32) -> Self {
        self.slots.push(v.to_bits() as u64);
        self
    }
}

/// The device, its streams, the loaded modules and the scratch buffer.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Raw<sys::CUstream>,
    pub comm: Raw<sys::CUstream>,
    pub pool: Arc<Pool>,
    /// The real architecture, e.g. `sm_90`.
    pub arch: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0 (part of the kernel cache key).
    pub driver_version: i32,
    pub include: PathBuf,
    pub sm_count: u32,
    pub smem_optin: u32,
    /// Shared memory of one multiprocessor (what resident blocks share).
    pub smem_per_sm: u32,
    pub name: String,
    /// Loaded modules by module name (`attention-hd64`), with the kind of image loaded.
    modules: Mutex<HashMap<String, (Raw<sys::CUmodule>, nvrtc::Target)>>,
    funcs: Mutex<HashMap<(&'static str, &'static str), Raw<sys::CUfunction>>>,
    /// Why a module was loaded from PTX instead of a cubin (the first such reason), if one was.
    pub ptx_fallback: Mutex<Option<String>>,
    scratch: Mutex<(sys::CUdeviceptr, usize)>,
    /// The first error of an op (ops cannot return one); reported by `synchronize`.
    pub error: Mutex<Option<String>>,
}

impl Device {
    pub fn new(ordinal: usize) -> Result<Self> {
        libs::ensure_driver()?;
        drv::init().map_err(|e| anyhow!("cuInit failed: {e:?} (no usable NVIDIA GPU or driver)"))?;
        let count = drv::device::get_count().map_err(|e| anyhow!("cuDeviceGetCount: {e:?}"))?;
        if count <= 0 {
            anyhow::bail!("no CUDA device found");
        }
        if ordinal >= count as usize {
            anyhow::bail!("CUDA device {ordinal} requested, {count} present");
        }
        libs::ensure_nvrtc()?;
        let include = nvrtc::find_include_dir()?;
        let ctx =
            CudaContext::new(ordinal).map_err(|e| anyhow!("creating a CUDA context on device {ordinal}: {e:?}"))?;
        ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        // The backend orders its work itself (one compute stream), so cudarc's per-buffer
        // event tracking is not needed.
        // SAFETY: no cudarc buffers exist yet.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(|e| anyhow!("{e:?}"))?;
        let attr = |a| ctx.attribute(a).map_err(|e| anyhow!("{e:?}"));
        let sm_count = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let smem_optin = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        let smem_per_sm =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)? as u32;
        let mut driver_version = 0;
        // SAFETY: the driver is loaded and initialised; a valid out pointer.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| anyhow!("cuDriverGetVersion: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| anyhow!("{e:?}"))?;
        let comm = drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| anyhow!("{e:?}"))?;
        let pool = Arc::new(Pool::new(ctx.clone()));
        Ok(Self {
            ctx,
            stream: Raw(stream),
            comm: Raw(comm),
            pool,
            arch: nvrtc::Target::Cubin.arch((major, minor)),
            cc: (major, minor),
            driver_version,
            include,
            sm_count,
            smem_optin,
            smem_per_sm,
            name,
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            ptx_fallback: Mutex::new(None),
            scratch: Mutex::new((0, 0)),
            error: Mutex::new(None),
        })
    }

    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| anyhow!("binding the CUDA context: {e:?}"))
    }

    /// A kernel function of a family with a single variant, compiling and loading its module
    /// on first use.
    pub fn func(&self, entry: &'static str) -> Result<sys::CUfunction> {
        let fam = nvrtc::family_of(entry).ok_or_else(|| anyhow!("no kernel named {entry}"))?;
        match fam.variants {
            [v] => self.func_variant(entry, v),
            _ => Err(anyhow!("kernel {entry} has {} variants: name one", fam.variants.len())),
        }
    }

    /// A kernel function of one variant of its family, compiling and loading the module on
    /// first use.
    pub fn func_variant(&self, entry: &'static str, v: &'static nvrtc::Variant) -> Result<sys::CUfunction> {
        if let Some(f) = self.funcs.lock().expect("function cache").get(&(entry, v.name)) {
            return Ok(f.0);
        }
        let fam = nvrtc::family_of(entry).ok_or_else(|| anyhow!("no kernel named {entry}"))?;
        if !fam.variants.contains(v) {
            anyhow::bail!("kernel {entry} has no variant {:?}", v.name);
        }
        let module = {
            let mut mods = self.modules.lock().expect("module cache");
            let key = nvrtc::module_name(fam, v);
            match mods.get(&key) {
                Some(m) => m.0 .0,
                None => {
                    let (m, target) = self.load_module(fam, v)?;
                    mods.insert(key, (Raw(m), target));
                    m
                }
            }
        };
        let cname = CString::new(entry).expect("entry names hold no NUL");
        // SAFETY: the module is loaded and stays loaded for the device's life.
        let f = unsafe { drv::module::get_function(module, cname) }.map_err(|e| anyhow!("kernel {entry}: {e:?}"))?;
        if entry.starts_with("infonce_bwd") || entry == "infonce_fwd_block" {
            // These take more than the default 48 KiB of dynamic shared memory.
            // SAFETY: a valid function and attribute.
            unsafe {
                drv::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    self.smem_optin as i32,
                )
            }
            .map_err(|e| anyhow!("raising the shared-memory limit of {entry}: {e:?}"))?;
        }
        self.funcs.lock().expect("function cache").insert((entry, v.name), Raw(f));
        Ok(f)
    }

    /// Loads a module: the cubin for the device's architecture, or where compiling or loading
    /// it fails (or `CXRCLIP_KERNEL_PTX` is set), PTX that the driver compiles. The first
    /// fallback's reason is kept in `ptx_fallback`.
    fn load_module(&self, fam: &nvrtc::Family, v: &nvrtc::Variant) -> Result<(sys::CUmodule, nvrtc::Target)> {
        use nvrtc::Target;
        let load = |target: Target| -> Result<sys::CUmodule> {
            let img = nvrtc::image_cached(fam, v, target, self.cc, self.driver_version, &self.include)?;
            // SAFETY: a complete cubin, or a NUL-terminated PTX text; the context is bound. The
            // driver copies the image, so `img` may drop after the call.
            unsafe { drv::module::load_data(img.as_ptr() as *const c_void) }.map_err(|e| {
                anyhow!(
                    "loading the {} kernels ({}) for {}: {e:?}",
                    nvrtc::module_name(fam, v),
                    target.arch(self.cc),
                    self.arch
                )
            })
        };
        let why = if std::env::var_os("CXRCLIP_KERNEL_PTX").is_some() {
            "CXRCLIP_KERNEL_PTX is set".to_string()
        } else {
            match load(Target::Cubin) {
                Ok(m) => return Ok((m, Target::Cubin)),
                Err(e) => format!("{e:#}"),
            }
        };
        let m = load(Target::Ptx).with_context(|| format!("after the cubin failed: {why}"))?;
        self.ptx_fallback.lock().expect("fallback note").get_or_insert(why);
        Ok((m, Target::Ptx))
    }

    /// How many blocks of `block` threads and `smem` bytes of dynamic shared memory of an
    /// entry point fit on one multiprocessor at once (the driver's occupancy calculator:
    /// registers, shared memory, threads); at least 1.
    pub fn blocks_per_sm(&self, entry: &'static str, block: u32, smem: u32) -> Result<u32> {
        let f = self.func(entry)?;
        // SAFETY: a loaded function of this context.
        let n = unsafe { drv::occupancy::max_active_block_per_multiprocessor(f, block as i32, smem as usize) }
            .map_err(|e| anyhow!("occupancy of {entry}: {e:?}"))?;
        Ok(n.max(1) as u32)
    }

    /// Enqueues a kernel of a single-variant family on the compute stream.
    pub fn launch(&self, entry: &'static str, grid: (u32, u32, u32), block: u32, smem: u32, args: Args) -> Result<()> {
        self.bind()?;
        let f = self.func(entry)?;
        self.launch_func(f, entry, grid, block, smem, args)
    }

    /// Enqueues a kernel of one variant of its family on the compute stream.
    pub fn launch_variant(
        &self,
        entry: &'static str,
        v: &'static nvrtc::Variant,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: Args,
    ) -> Result<()> {
        self.bind()?;
        let f = self.func_variant(entry, v)?;
        self.launch_func(f, entry, grid, block, smem, args)
    }

    fn launch_func(
        &self,
        f: sys::CUfunction,
        entry: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: Args,
    ) -> Result<()> {
        let mut args = args;
        let mut ptrs: Vec<*mut c_void> = args.slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        // SAFETY: the argument slots match the kernel's parameter list (each call site is
        // written against the kernel's signature), and they outlive the call, which copies them.
        unsafe { drv::launch_kernel(f, grid, (block, 1, 1), smem, self.stream.0, &mut ptrs) }
            .map_err(|e| anyhow!("launching {entry} {grid:?}x{block}: {e:?}"))
    }

    /// Records an op's error (the first one wins) for `synchronize` to report.
    pub fn record(&self, r: Result<()>) {
        if let Err(e) = r {
            let mut slot = self.error.lock().expect("error slot");
            if slot.is_none() {
                *slot = Some(format!("{e:#}"));
            }
        }
    }

    pub fn take_error(&self) -> Result<()> {
        match self.error.lock().expect("error slot").take() {
            Some(e) => Err(anyhow!(e)),
            None => Ok(()),
        }
    }

    pub fn sync(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: a stream of this context.
        unsafe { drv::stream::synchronize(self.stream.0) }.map_err(|e| anyhow!("CUDA stream synchronize: {e:?}"))
    }

    /// A scratch region of at least `bytes`, valid until the next call (ops run in stream
    /// order, so one op's scratch is free once the next op is enqueued). Grows, with a
    /// synchronisation, only when a larger region is asked for.
    pub fn scratch(&self, bytes: usize) -> Result<sys::CUdeviceptr> {
        let mut s = self.scratch.lock().expect("scratch lock");
        if s.1 < bytes {
            self.sync()?;
            if s.1 > 0 {
                self.pool.release(s.0, s.1);
            }
            let (p, class) = self.pool.alloc(bytes.max(1 << 20))?;
            *s = (p, class);
        }
        Ok(s.0)
    }

    /// Returns the scratch region to the pool (so that a later peak-memory reading counts only
    /// what the next ops need).
    pub fn release_scratch(&self) -> Result<()> {
        let mut s = self.scratch.lock().expect("scratch lock");
        if s.1 > 0 {
            self.sync()?;
            self.pool.release(s.0, s.1);
            *s = (0, 0);
        }
        Ok(())
    }

    /// Milliseconds the work enqueued by `f` takes on the compute stream, by CUDA events.
    pub fn time_ms(&self, f: &mut dyn FnMut()) -> Result<f32> {
        self.bind()?;
        let e = |_| anyhow!("CUDA event");
        let start = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(e)?;
        let end = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(e)?;
        // SAFETY: events and stream of this context; the events are destroyed below.
        let ms = unsafe {
            drv::event::record(start, self.stream.0).map_err(e)?;
            f();
            drv::event::record(end, self.stream.0).map_err(e)?;
            drv::event::synchronize(end).map_err(e)?;
            let ms = drv::event::elapsed(start, end).map_err(e);
            let _ = drv::event::destroy(start);
            let _ = drv::event::destroy(end);
            ms?
        };
        Ok(ms)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        let _ = self.sync();
        let s = *self.scratch.get_mut().expect("scratch lock");
        if s.1 > 0 {
            self.pool.release(s.0, s.1);
        }
        for (_, (m, _)) in self.modules.get_mut().expect("module cache").drain() {
            // SAFETY: loaded by this device, no launch pending after the synchronize.
            let _ = unsafe { drv::module::unload(m.0) };
        }
        // SAFETY: streams created by this device, idle after the synchronize.
        unsafe {
            let _ = drv::stream::destroy(self.stream.0);
            let _ = drv::stream::destroy(self.comm.0);
        }
    }
}
