//! The CUDA backend (work in progress in this commit: kernel sources and their compilation).

pub mod libs;
pub mod nvrtc;
