//! Matrix products through cuBLASLt: bf16 operands with f32 accumulation (the matrix units),
//! or f32 throughout when both operands are f32. Row-major products are expressed as
//! column-major ones on the transposed problem.

use std::ffi::c_void;

use anyhow::{anyhow, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

use super::device::Raw;
use crate::backend::DType;

/// Workspace handed to cuBLASLt for its split-K and similar algorithms.
pub const WORKSPACE_BYTES: usize = 32 << 20;

pub struct Blas {
    pub handle: Raw<sys::cublasLtHandle_t>,
}

/// One operand in column-major terms: `rows x cols` as stored, leading dimension `ld`,
/// transposed by the product when `trans`.
#[derive(Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub dtype: DType,
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    pub trans: bool,
}

fn data_type(d: DType) -> Result<sys::cudaDataType> {
    Ok(match d {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        DType::I32 => return Err(anyhow!("matrix product on an i32 tensor")),
    })
}

/// The largest power of two (up to 256) dividing a device address.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

fn err(what: &str) -> impl Fn(lt::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e:?}")
}

impl Blas {
    pub fn new() -> Result<Self> {
        Ok(Self { handle: Raw(lt::create_handle().map_err(err("create"))?) })
    }

    /// `D = alpha * op(A) op(B) + beta * D` (column-major, `m x n`, leading dimension `ldd`).
    /// A and B must have the same storage type.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        stream: *mut c_void,
        workspace: u64,
        a: Operand,
        b: Operand,
        d: (u64, DType, i64),
        m: u64,
        n: u64,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.matmul_batched(stream, workspace, a, b, d, m, n, alpha, beta, None)
    }

    /// As [`Blas::matmul`], over `batch.0` products whose A, B and D start `batch.1`,
    /// `batch.2` and `batch.3` elements apart.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_batched(
        &self,
        stream: *mut c_void,
        workspace: u64,
        a: Operand,
        b: Operand,
        d: (u64, DType, i64),
        m: u64,
        n: u64,
        alpha: f32,
        beta: f32,
        batch: Option<(i32, i64, i64, i64)>,
    ) -> Result<()> {
        assert_eq!(a.dtype, b.dtype, "cuBLASLt operands of different storage types");
        let in_ty = data_type(a.dtype)?;
        let out_ty = data_type(d.1)?;
        // SAFETY: every descriptor is created here and destroyed before returning; pointers
        // are device buffers of the sizes the layouts describe (checked by the callers).
        unsafe {
            let desc =
                lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
                    .map_err(err("matmul desc"))?;
            // cublasOperation_t as the int32 the attribute takes: 0 = N, 1 = T.
            let op = |t: bool| -> i32 { t as i32 };
            let (ta, tb) = (op(a.trans), op(b.trans));
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta as *const _ as *const c_void,
                std::mem::size_of_val(&ta),
            )
            .map_err(err("transa"))?;
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &tb as *const _ as *const c_void,
                std::mem::size_of_val(&tb),
            )
            .map_err(err("transb"))?;
            let la = lt::create_matrix_layout(in_ty, a.rows, a.cols, a.ld).map_err(err("layout a"))?;
            let lb = lt::create_matrix_layout(in_ty, b.rows, b.cols, b.ld).map_err(err("layout b"))?;
            let ld = lt::create_matrix_layout(out_ty, m, n, d.2).map_err(err("layout d"))?;
            if let Some((count, sa, sb, sd)) = batch {
                for (l, stride) in [(la, sa), (lb, sb), (ld, sd)] {
                    lt::set_matrix_layout_attribute(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const c_void,
                        4,
                    )
                    .map_err(err("batch count"))?;
                    lt::set_matrix_layout_attribute(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &stride as *const i64 as *const c_void,
                        8,
                    )
                    .map_err(err("batch stride"))?;
                }
            }
            let pref = lt::create_matmul_pref().map_err(err("preference"))?;
            let ws = WORKSPACE_BYTES as u64;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(err("workspace preference"))?;
            // Tensors are views into larger buffers: tell the heuristic the real alignment of
            // each pointer (it assumes 256 bytes otherwise).
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            for (attr, ptr) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a.ptr),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b.ptr),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, d.0),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d.0),
            ] {
                let align: u32 = alignment(ptr);
                lt::set_matmul_pref_attribute(pref, attr, &align as *const u32 as *const c_void, 4)
                    .map_err(err("alignment preference"))?;
            }
            let result = lt::get_matmul_algo_heuristic(self.handle.0, desc, la, lb, ld, ld, pref)
                .map_err(err("no algorithm for this product"))
                .and_then(|h| {
                    lt::matmul(
                        self.handle.0,
                        desc,
                        &alpha as *const f32 as *const c_void,
                        &beta as *const f32 as *const c_void,
                        a.ptr as *const c_void,
                        la,
                        b.ptr as *const c_void,
                        lb,
                        d.0 as *const c_void,
                        ld,
                        d.0 as *mut c_void,
                        ld,
                        &h.algo,
                        workspace as *mut c_void,
                        WORKSPACE_BYTES,
                        stream as _,
                    )
                    .map_err(err("matmul"))
                });
            let _ = lt::destroy_matmul_pref(pref);
            let _ = lt::destroy_matrix_layout(la);
            let _ = lt::destroy_matrix_layout(lb);
            let _ = lt::destroy_matrix_layout(ld);
            let _ = lt::destroy_matmul_desc(desc);
            result
        }
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle.0) };
    }
}
