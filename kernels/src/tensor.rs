//! Opaque tensor handles: a shared storage owned by a backend plus an element range.

use std::sync::Arc;

use crate::backend::{Backend, DType};

/// A contiguous range of elements in a backend-owned buffer. Cloning is cheap (shared
/// storage), and [`Tensor::slice`] makes views; a flat parameter buffer and its per-layer
/// views share one allocation, as in llm.c.
pub struct Tensor<B: Backend> {
    pub(crate) storage: Arc<B::Storage>,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) dtype: DType,
}

impl<B: Backend> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Self { storage: Arc::clone(&self.storage), offset: self.offset, len: self.len, dtype: self.dtype }
    }
}

impl<B: Backend> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, offset {}, len {})", self.dtype, self.offset, self.len)
    }
}

impl<B: Backend> Tensor<B> {
    /// Wraps a backend storage; used by backend implementations.
    pub fn from_storage(storage: Arc<B::Storage>, len: usize, dtype: DType) -> Self {
        Self { storage, offset: 0, len, dtype }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn storage(&self) -> &Arc<B::Storage> {
        &self.storage
    }
    /// A view of `len` elements starting at `offset` within this tensor.
    pub fn slice(&self, offset: usize, len: usize) -> Self {
        assert!(offset + len <= self.len, "slice {offset}..{} out of a tensor of {} elements", offset + len, self.len);
        Self { storage: Arc::clone(&self.storage), offset: self.offset + offset, len, dtype: self.dtype }
    }
    /// Whether two tensors share storage and their element ranges intersect.
    pub fn overlaps(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
            && self.offset < other.offset + other.len
            && other.offset < self.offset + self.len
    }
}
