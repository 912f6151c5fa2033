//! Kernel benchmarks (filled in below).
