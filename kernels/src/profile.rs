//! Optional per-op timing of either backend ("where does the step's time go?").
//!
//! Off by default (one relaxed atomic load per op); `enable()` turns it on, `take()` returns
//! and clears the table. The CPU backend is synchronous, so wall time per call is the op's.
//! The CUDA backend fills the same table with device times measured by CUDA events around
//! each op (resolved at its next synchronisation), so one switch serves both backends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<&'static str, (u64, f64)>> = Mutex::new(BTreeMap::new());

pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether timing is on (the CUDA backend reads it to time its ops with events).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Adds `seconds` to `op`'s row (the CUDA backend's event timings arrive here).
pub fn record(op: &'static str, seconds: f64) {
    let mut t = TABLE.lock().expect("profile table");
    let e = t.entry(op).or_insert((0, 0.0));
    e.0 += 1;
    e.1 += seconds;
}

/// `(op, calls, seconds)` since the last `take`, sorted by time, largest first.
pub fn take() -> Vec<(&'static str, u64, f64)> {
    let mut t = TABLE.lock().expect("profile table");
    let mut rows: Vec<_> = t.iter().map(|(k, (n, s))| (*k, *n, *s)).collect();
    t.clear();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    rows
}

pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
}

pub fn scope(name: &'static str) -> Scope {
    Scope { name, start: ENABLED.load(Ordering::Relaxed).then(Instant::now) }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            record(self.name, s.elapsed().as_secs_f64());
        }
    }
}
