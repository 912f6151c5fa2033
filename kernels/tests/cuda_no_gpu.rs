//! Without a GPU (or without a driver), creating the CUDA backend is a one-line error, never
//! a panic. On a machine with a GPU it succeeds, and this test checks only that.

use kernels::Cuda;

#[test]
fn cuda_new_is_an_error_or_a_backend_never_a_panic() {
    match Cuda::new(0) {
        Ok(c) => println!("CUDA backend on {}", c.describe()),
        Err(e) => {
            let msg = format!("{e:#}");
            println!("no CUDA backend: {msg}");
            assert!(!msg.is_empty() && !msg.contains('\n'), "the error is one line: {msg:?}");
        }
    }
    // A device ordinal far past any machine's count is an error either way.
    assert!(Cuda::new(1 << 20).is_err());
}
