//! Op tests: every CPU op against a plain f64 reference on fresh random inputs, and every
//! gradient against central finite differences of that reference.
//!
//! Each test prints its seed (shown by the harness when the test fails); rerun a failure
//! with `KERNELS_SEED=<seed> cargo test -p kernels --test ops <name>`.

mod common;

// One module per op family of `kernels::families`, then the Backend shim and timings.
mod activation;
mod adamw;
mod attention;
mod bce;
mod elementwise;
mod embed;
mod infonce;
mod l2norm;
mod layernorm;
mod linear;
mod perf;
mod shim;
