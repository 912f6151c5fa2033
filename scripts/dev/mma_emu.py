"""Warp-level emulation helpers shared by the kernel emulations in this folder.

Registers are numpy arrays whose leading axes are (warp, lane); a 32-bit register holding two
bf16 values is an array with a trailing axis of 2 (low half first). Shared memory is a flat
float64 array poisoned with NaN, indexed exactly as the .cu code computes its addresses, so a
read of an element no thread wrote shows up as NaN in the result. Values stay in float64 (no
bf16 rounding), so an emulation agrees with a float64 reference to ~1e-12 unless the indexing
is wrong.

mma.sync.m16n8k16 fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16", bf16 A/B,
f32 C/D), with g = lane >> 2 and q = lane & 3:
  A (16x16): a0 = A[g][2q, 2q+1], a1 = A[g+8][2q, 2q+1], a2 = A[g][2q+8, 2q+9], a3 = A[g+8][2q+8, 2q+9]
  B (16x8):  b0 = B[2q, 2q+1][g], b1 = B[2q+8, 2q+9][g]
  C/D (16x8): c0, c1 = C[g][2q, 2q+1], c2, c3 = C[g+8][2q, 2q+1]
"""

import numpy as np

WARP = 32
LANE = np.arange(WARP)
G = LANE >> 2
Q = LANE & 3

# Where each fragment element sits in its matrix: [lane, register, half] -> (row, col).
_j = np.arange(2)
A_ROW = np.empty((WARP, 4, 2), dtype=np.int64)
A_COL = np.empty((WARP, 4, 2), dtype=np.int64)
for _r, (_dr, _dc) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
    A_ROW[:, _r, :] = (G + _dr)[:, None]
    A_COL[:, _r, :] = 2 * Q[:, None] + _dc + _j[None, :]
B_ROW = np.empty((WARP, 2, 2), dtype=np.int64)
B_COL = np.empty((WARP, 2, 2), dtype=np.int64)
for _r, _dk in enumerate([0, 8]):
    B_ROW[:, _r, :] = 2 * Q[:, None] + _dk + _j[None, :]
    B_COL[:, _r, :] = G[:, None]
C_ROW = np.empty((WARP, 4), dtype=np.int64)
C_COL = np.empty((WARP, 4), dtype=np.int64)
for _e in range(4):
    C_ROW[:, _e] = G + 8 * (_e >> 1)
    C_COL[:, _e] = 2 * Q + (_e & 1)


def _covers(rows, cols, shape):
    m = np.zeros(shape, dtype=int)
    np.add.at(m, (rows, cols), 1)
    assert (m == 1).all(), "a fragment table does not cover its matrix exactly once"


_covers(A_ROW, A_COL, (16, 16))
_covers(B_ROW, B_COL, (16, 8))
_covers(C_ROW, C_COL, (16, 8))


def mma(acc, a, b0, b1):
    """acc[w, lane, 4] += A . B for every warp w; a[w, lane, 4, 2], b0 / b1[w, lane, 2]."""
    nw = acc.shape[0]
    A = np.full((nw, 16, 16), np.nan)
    A[:, A_ROW, A_COL] = a
    B = np.full((nw, 16, 8), np.nan)
    b = np.stack([b0, b1], axis=2)
    B[:, B_ROW, B_COL] = b
    C = np.full((nw, 16, 8), np.nan)
    C[:, C_ROW, C_COL] = acc
    D = C + A @ B
    acc[...] = D[:, C_ROW, C_COL]


def lds32(s, idx):
    """Two consecutive bf16 at flat index idx (an array over warps and lanes)."""
    return np.stack([s[idx], s[idx + 1]], axis=-1)


def lds_pair(s, idx, stride):
    """Two bf16 from different rows: s[idx] low half, s[idx + stride] high half."""
    return np.stack([s[idx], s[idx + stride]], axis=-1)


def pack(lo, hi):
    return np.stack([lo, hi], axis=-1)


def shfl_xor(v, m):
    """__shfl_xor_sync over the lane axis (axis 1)."""
    return v[:, LANE ^ m]
