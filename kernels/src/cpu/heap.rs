//! A metered heap: a global allocator over the system's that counts the bytes in use and their
//! peak, so that a bench can report an op's own peak heap use (`bench kernels --device cpu`'s
//! `peak_bytes`). A binary opts in with
//! `#[global_allocator] static HEAP: kernels::cpu::heap::Metered = kernels::cpu::heap::Metered;`
//! (the coordinator does), and counts only once a bench calls [`start_metering`]: until then an
//! allocation costs one relaxed load of a flag no thread writes (so the coordinator's other
//! roles, the workers' loaders above all, pay nothing measurable: `cargo run --release -p
//! kernels --example heap_cost` times both), after it two shared atomic updates. Elsewhere
//! every figure reads 0 and [`start_metering`] returns false.
//!
//! Bytes allocated before metering began and freed after it drive the count below its start,
//! so the counters are signed and a bench reads differences.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

static METERING: AtomicBool = AtomicBool::new(false);
static CURRENT: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, metered.
pub struct Metered;

fn grew(bytes: usize) {
    if METERING.load(Relaxed) {
        INSTALLED.store(true, Relaxed);
        let bytes = bytes as isize;
        let now = CURRENT.fetch_add(bytes, Relaxed) + bytes;
        PEAK.fetch_max(now, Relaxed);
    }
}

fn shrank(bytes: usize) {
    if METERING.load(Relaxed) {
        CURRENT.fetch_sub(bytes as isize, Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters only add
// and subtract the sizes the caller passes.
unsafe impl GlobalAlloc for Metered {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as `alloc`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

/// Starts counting (for the rest of the process); returns whether this process allocates
/// through [`Metered`], i.e. whether the figures mean anything.
pub fn start_metering() -> bool {
    METERING.store(true, Relaxed);
    // One allocation, so that an installed meter has seen one.
    drop(std::hint::black_box(Box::new(0u64)));
    installed()
}

/// Whether this process allocates through [`Metered`] (known once metering has started).
pub fn installed() -> bool {
    INSTALLED.load(Relaxed)
}

/// The heap bytes in use now, counted from when metering started (it can be negative).
pub fn current() -> isize {
    CURRENT.load(Relaxed)
}

/// The largest [`current`] since the last [`reset_peak`].
pub fn peak() -> isize {
    PEAK.load(Relaxed)
}

/// Starts a new peak from the bytes in use now.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Relaxed), Relaxed);
}
