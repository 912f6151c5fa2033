//! Every CUDA op against the CPU backend (see `kernels::cuda::check`). Needs a GPU:
//! `cargo test -p kernels --test cuda_ops -- --ignored --nocapture`.

use kernels::cuda::check;
use kernels::Cuda;

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_ops_match_cpu() {
    let cuda = Cuda::new(0).expect("a CUDA GPU");
    println!("device: {}", cuda.describe());
    let (seed, res) = check::run_all(&cuda, false);
    println!("seed {seed}\n{}", check::table(&res));
    let failed: Vec<_> =
        res.iter().filter(|r| !r.passed).map(|r| format!("{} {} {}", r.op, r.size, r.output)).collect();
    assert!(failed.is_empty(), "{} of {} checks failed: {failed:#?}", failed.len(), res.len());
}
