//! Compute backends for cxrclip.
//!
//! The model is written once against [`Backend`]. A backend owns its buffers (opaque
//! [`Tensor`] handles: host memory for [`Cpu`], device memory for CUDA) and enqueues ops in
//! order; ops may run asynchronously, and data moves to or from the host only through the
//! explicit `upload_*` / `download_*` calls. Every op has a forward and a backward; backward
//! ops *accumulate* (`+=`) into their gradient outputs, so callers zero gradients first.
//!
//! Shapes are passed explicitly (llm.c style) and checked against tensor lengths.

pub mod backend;
pub mod bf16;
pub mod cpu;
pub mod cuda;
pub mod families;
pub mod limits;
pub mod profile;
pub mod shapes;
pub mod tensor;

pub use backend::{Activation, AdamWStep, Backend, DType, InfoNceDims};
pub use cpu::Cpu;
pub use cuda::Cuda;
pub use limits::Limits;
pub use tensor::Tensor;
