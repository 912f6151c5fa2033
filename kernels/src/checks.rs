//! Argument checks shared by every backend: lengths against the shapes an op is given, and
//! that no output overlaps an input or another output (what makes the CPU backend's raw
//! slices sound, and what a CUDA kernel assumes of its pointers).

use crate::backend::{Backend, InfoNceDims};
use crate::tensor::Tensor;

pub fn check_len<B: Backend>(what: &str, t: &Tensor<B>, want: usize) {
    assert_eq!(t.len(), want, "{what}: tensor of {} elements where the shape needs {want}", t.len());
}

/// Asserts that no output overlaps an input or another output.
pub fn outputs<B: Backend>(outs: &[&Tensor<B>], ins: &[&Tensor<B>]) {
    for (i, o) in outs.iter().enumerate() {
        for x in ins {
            assert!(!o.overlaps(x), "op output {o:?} overlaps input {x:?}");
        }
        for o2 in &outs[i + 1..] {
            assert!(!o.overlaps(o2), "op outputs {o:?} and {o2:?} overlap");
        }
    }
}

/// The rows of one rank's InfoNCE share against the gathered columns.
pub fn check_infonce<B: Backend>(
    dims: &InfoNceDims,
    img: &Tensor<B>,
    txt: &Tensor<B>,
    all_img: &Tensor<B>,
    all_txt: &Tensor<B>,
) {
    assert!(
        dims.offset + dims.local <= dims.global,
        "infonce: local rows {}+{} beyond {} global",
        dims.offset,
        dims.local,
        dims.global
    );
    check_len("infonce img", img, dims.local * dims.dim);
    check_len("infonce txt", txt, dims.local * dims.dim);
    check_len("infonce all_img", all_img, dims.global * dims.dim);
    check_len("infonce all_txt", all_txt, dims.global * dims.dim);
}
