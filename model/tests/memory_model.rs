//! `model::memory` against the CPU backend's real allocations: a model built for a capacity of
//! k pairs allocates exactly what the account says, parameters, gradients and AdamW's moments
//! included (counted by the metered heap).

use kernels::cpu::heap;
use kernels::Cpu;
use model::memory::{activation_bytes, parameter_state_bytes, CPU};
use model::optim::{AdamW, AdamWConfig};
use model::{Clip, ClipConfig};

#[global_allocator]
static HEAP: heap::Metered = heap::Metered;

/// Heap bytes a model of `capacity` pairs and its optimiser hold, measured.
fn measured(config: &ClipConfig, capacity: usize) -> isize {
    let before = heap::current();
    let clip = Clip::new(Cpu, config.clone(), capacity).expect("model");
    let opt = AdamW::new(&clip, AdamWConfig::default()).expect("optimiser");
    let held = heap::current() - before;
    drop((opt, clip));
    held
}

#[test]
fn the_memory_account_matches_the_cpu_backends_allocations() {
    assert!(heap::start_metering());
    let mut with_adapters = ClipConfig::small(32, 8, 64, 2, 2);
    with_adapters.adapter_dim = Some(16);
    for config in [ClipConfig::small(32, 8, 64, 2, 2), ClipConfig::small(48, 16, 96, 3, 3), with_adapters] {
        let p = parameter_state_bytes(&config);
        let fixed = (p.weights + p.gradients + p.optimizer) as isize;
        for capacity in [1, 3] {
            let want = fixed + activation_bytes(&config, capacity, CPU) as isize;
            let got = measured(&config, capacity);
            // Small bookkeeping beside the tensors (views, the layout's tables, AdamW's norm
            // scalar): at most 1% of the total and 256 KiB.
            let slack = (want / 100).min(256 << 10);
            assert!((got - want).abs() <= slack, "capacity {capacity}: measured {got} B, the account says {want} B");
        }
        // Per pair: the bookkeeping does not depend on the capacity, so what is left is the
        // heap use of other threads meanwhile (the harness's, a few hundred bytes).
        let per_pair = measured(&config, 3) - measured(&config, 1);
        let want = (activation_bytes(&config, 3, CPU) - activation_bytes(&config, 1, CPU)) as isize;
        assert!((per_pair - want).abs() <= 4096, "per 2 pairs: measured {per_pair} B, the account says {want} B");
    }
}
