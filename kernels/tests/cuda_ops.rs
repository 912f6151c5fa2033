//! Every CUDA op against the CPU backend (see `kernels::cuda::check`), one test per op family
//! and one for all of them. Needs a GPU:
//! `cargo test -p kernels --test cuda_ops -- --ignored --nocapture` (or `... cuda_family_embed`).

use kernels::cuda::check;
use kernels::Cuda;

fn assert_all_pass(what: &str, seed: u64, res: &[check::CheckResult]) {
    println!("{what}: seed {seed}\n{}", check::table(res));
    let failed: Vec<_> =
        res.iter().filter(|r| !r.passed).map(|r| format!("{} {} {}", r.op, r.size, r.output)).collect();
    assert!(failed.is_empty(), "{} of {} checks failed: {failed:#?}", failed.len(), res.len());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_ops_match_cpu() {
    let cuda = Cuda::new(0).expect("a CUDA GPU");
    println!("device: {}", cuda.describe());
    let (seed, res) = check::run_all(&cuda, false);
    assert_all_pass("every family", seed, &res);
}

/// One ignored test per family of `kernels::families`, at the full sizes.
macro_rules! family_tests {
    ($($test:ident => $family:literal),* $(,)?) => {$(
        #[test]
        #[ignore = "needs a CUDA GPU"]
        fn $test() {
            let cuda = Cuda::new(0).expect("a CUDA GPU");
            let (seed, res) = check::run_family(&cuda, $family, false).unwrap();
            assert_all_pass($family, seed, &res);
        }
    )*};
}

family_tests! {
    cuda_family_elementwise => "elementwise",
    cuda_family_linear => "linear",
    cuda_family_layernorm => "layernorm",
    cuda_family_l2norm => "l2norm",
    cuda_family_activation => "activation",
    cuda_family_attention => "attention",
    cuda_family_embed => "embed",
    cuda_family_infonce => "infonce",
    cuda_family_bce => "bce",
    cuda_family_adamw => "adamw",
}

/// The list above names every family.
#[test]
fn every_family_has_a_test_here() {
    let src = include_str!("cuda_ops.rs");
    for f in kernels::families::FAMILIES {
        assert!(src.contains(&format!("cuda_family_{} => \"{}\"", f.name, f.name)), "{} has no test", f.name);
    }
}
