//! What the metered heap (`kernels::cpu::heap`) costs an allocation, side by side in one run:
//! the system allocator called directly, the metered one before `start_metering` (what every
//! role of the coordinator binary but `bench kernels` pays), and after it. Each variant
//! allocates and frees small blocks on every core at once, the worst case for the shared
//! counters. `cargo run --release -p kernels --example heap_cost [pairs per thread]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::Instant;

use kernels::cpu::heap;

#[global_allocator]
static HEAP: heap::Metered = heap::Metered;

/// Nanoseconds per allocate-and-free pair, every thread running `pairs` of them at once.
fn ns_per_pair(threads: usize, pairs: usize, one: fn(usize)) -> f64 {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(move || {
                for k in 0..pairs {
                    one(k);
                }
            });
        }
    });
    t0.elapsed().as_secs_f64() * 1e9 / pairs as f64
}

fn layout(k: usize) -> Layout {
    Layout::from_size_align(16 + (k & 255), 8).expect("layout")
}

fn system_pair(k: usize) {
    let layout = layout(k);
    // SAFETY: a non-zero size; the block is freed with the layout it was made with.
    unsafe {
        let p = System.alloc(layout);
        assert!(!p.is_null());
        System.dealloc(black_box(p), layout);
    }
}

/// The same through the global allocator (the metered one).
fn global_pair(k: usize) {
    let layout = layout(k);
    // SAFETY: as `system_pair`.
    unsafe {
        let p = std::alloc::alloc(layout);
        assert!(!p.is_null());
        std::alloc::dealloc(black_box(p), layout);
    }
}

fn main() {
    let pairs: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5_000_000);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Each variant paired with the system allocator in the same round (the machine's load
    // drifts between rounds); the ratio's median over 5 rounds.
    let paired = || {
        let mut ratios: Vec<(f64, f64, f64)> = (0..5)
            .map(|_| {
                let system = ns_per_pair(threads, pairs, system_pair);
                let metered = ns_per_pair(threads, pairs, global_pair);
                (metered / system, system, metered)
            })
            .collect();
        ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
        ratios[2]
    };
    let (off_ratio, off_system, off) = paired();
    assert!(heap::start_metering(), "the metered allocator is this example's global allocator");
    let (on_ratio, on_system, on) = paired();
    println!(
        "{threads} threads x {pairs} allocate+free pairs (16-271 B), ns per pair per thread, the round of \
         median ratio of 5:\n  metered, off {off:.1} against system {off_system:.1}: {off_ratio:.2}x\n  \
         metered, on {on:.1} against system {on_system:.1}: {on_ratio:.2}x"
    );
}
