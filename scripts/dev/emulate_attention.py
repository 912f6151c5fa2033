"""Executes kernels/cuda/attention.cu warp by warp in float64 and compares it with a plain
float64 attention (forward, log-sum-exps, dQ, dK, dV).

The emulation mirrors the .cu code line by line: the same loops, tile loads, masks, fragment
indexing and shuffles, with the mma.sync m16n8k16 fragment layouts of the PTX ISA (see
mma_emu.py). bf16 rounding is left out, so the only difference from the reference is float64
round-off: an indexing mistake shows up as an error of order 1, an unwritten or out-of-range
shared-memory read as NaN. Keep it in step with attention.cu when the kernel changes.

Run (a venv of your own with numpy; not part of CI):
    python3 -m venv /work/venv-kernels && /work/venv-kernels/bin/pip install numpy
    /work/venv-kernels/bin/python scripts/dev/emulate_attention.py
It prints the largest absolute error per output and variant and exits non-zero above 1e-9.
"""

import sys

import numpy as np

from mma_emu import G, LANE, Q, WARP, lds32, lds_pair, mma, pack, shfl_xor

TILE = 64
NWARPS = 4
LOG2E = 1.4426950408889634


class Consts:
    def __init__(self, hd):
        self.HD = hd
        self.KS = hd // 16
        self.NH = hd // 8
        self.KT = TILE // 16
        self.NT = TILE // 8
        self.PITCH = hd + 8


def smem(c):
    return np.full(TILE * c.PITCH, np.nan)


def load_tile(c, s, src, base, rs, r0, t):
    idx = np.arange(TILE * c.HD)
    r, d = idx // c.HD, idx % c.HD
    live = r0 + r < t
    v = np.zeros(idx.shape)
    v[live] = src[base + (r0 + r[live]) * rs + d[live]]
    s[r * c.PITCH + d] = v


def warp_ids():
    return np.arange(NWARPS)[:, None]  # (W, 1), broadcasts against lanes


def load_a_frags(c, s, row0):
    a = []
    for kk in range(c.KS):
        a.append(
            np.stack(
                [
                    lds32(s, (row0 + G) * c.PITCH + kk * 16 + 2 * Q),
                    lds32(s, (row0 + G + 8) * c.PITCH + kk * 16 + 2 * Q),
                    lds32(s, (row0 + G) * c.PITCH + kk * 16 + 2 * Q + 8),
                    lds32(s, (row0 + G + 8) * c.PITCH + kk * 16 + 2 * Q + 8),
                ],
                axis=2,
            )
        )
    return a


def mma_rows(c, acc, a, s, nt0, n):
    for kk in range(c.KS):
        for j in range(n):
            b0 = lds32(s, ((nt0 + j) * 8 + G) * c.PITCH + kk * 16 + 2 * Q)
            b1 = lds32(s, ((nt0 + j) * 8 + G) * c.PITCH + kk * 16 + 2 * Q + 8)
            b0 = np.broadcast_to(b0, acc[j].shape[:2] + (2,))
            b1 = np.broadcast_to(b1, acc[j].shape[:2] + (2,))
            mma(acc[j], a[kk], b0, b1)


def mma_p_step(c, acc, p0, p1, s, kk):
    a = np.stack([pack(p0[..., 0], p0[..., 1]), pack(p0[..., 2], p0[..., 3]), pack(p1[..., 0], p1[..., 1]),
                  pack(p1[..., 2], p1[..., 3])], axis=2)
    for nt in range(c.NH):
        b0 = lds_pair(s, (kk * 16 + 2 * Q) * c.PITCH + nt * 8 + G, c.PITCH)
        b1 = lds_pair(s, (kk * 16 + 2 * Q + 8) * c.PITCH + nt * 8 + G, c.PITCH)
        shape = acc[nt].shape[:2] + (2,)
        mma(acc[nt], a, np.broadcast_to(b0, shape), np.broadcast_to(b1, shape))


def zeros(n):
    return [np.zeros((NWARPS, WARP, 4)) for _ in range(n)]


def attn_fwd(c, out, lse, qkv, b, t, h, causal, scale, bx, by):
    HD = c.HD
    sK, sV = smem(c), smem(c)
    bh = by
    bi, hh = bh // h, bh % h
    q0 = bx * TILE
    warp = warp_ids()
    cc = h * HD
    rs = 3 * cc
    base = bi * t * rs + hh * HD
    sl2 = scale * LOG2E

    load_tile(c, sK, qkv, base, rs, q0, t)
    qa = load_a_frags(c, sK, warp * 16)
    sK[:] = np.nan  # its content now lives in registers; a later read of it must not go unnoticed

    o = zeros(c.NH)
    m = [np.full((NWARPS, WARP), -np.inf) for _ in range(2)]
    l = [np.zeros((NWARPS, WARP)) for _ in range(2)]
    row = [q0 + warp * 16 + G, q0 + warp * 16 + G + 8]
    kend = min(t, q0 + TILE) if causal else t
    for k0 in range(0, kend, TILE):
        load_tile(c, sK, qkv, base + cc, rs, k0, t)
        load_tile(c, sV, qkv, base + 2 * cc, rs, k0, t)
        s = zeros(c.NT)
        mma_rows(c, s, qa, sK, 0, c.NT)
        mx = [np.full((NWARPS, WARP), -np.inf) for _ in range(2)]
        for nt in range(c.NT):
            for e in range(4):
                key = k0 + nt * 8 + 2 * Q + (e & 1)
                r = e >> 1
                v = s[nt][..., e] * sl2
                v = np.where((key >= t) | (causal & (key > row[r])), -np.inf, v)
                s[nt][..., e] = v
                mx[r] = np.fmax(mx[r], v)
        for r in range(2):
            mx[r] = np.fmax(mx[r], shfl_xor(mx[r], 1))
            mx[r] = np.fmax(mx[r], shfl_xor(mx[r], 2))
        alpha, msafe = [None, None], [None, None]
        for r in range(2):
            mn = np.fmax(m[r], mx[r])
            msafe[r] = np.where(mn == -np.inf, 0.0, mn)
            alpha[r] = np.exp2(m[r] - msafe[r])
            m[r] = mn
            l[r] = l[r] * alpha[r]
        for nt in range(c.NT):
            for e in range(4):
                r = e >> 1
                p = np.exp2(s[nt][..., e] - msafe[r])
                s[nt][..., e] = p
                l[r] = l[r] + p
        for nt in range(c.NH):
            for e in range(4):
                o[nt][..., e] *= alpha[e >> 1]
        for kk in range(c.KT):
            mma_p_step(c, o, s[2 * kk], s[2 * kk + 1], sV, kk)
    for r in range(2):
        l[r] = l[r] + shfl_xor(l[r], 1)
        l[r] = l[r] + shfl_xor(l[r], 2)
    for nt in range(c.NH):
        for e in range(4):
            r = e >> 1
            live = row[r] < t
            d = nt * 8 + 2 * Q + (e & 1)
            at = (bi * t + row[r]) * cc + hh * HD + d
            out[at[live]] = (o[nt][..., e] / l[r])[live]
    for r in range(2):
        live = (row[r] < t) & (Q == 0)
        val = (m[r] + np.log2(l[r])) / LOG2E
        lse[(bh * t + row[r])[live]] = val[live]


def attn_bwd_dot(c, dsum, dout, out, b, t, h):
    HD = c.HD
    for r in range(b * h * t):
        bh, ti = r // t, r % t
        bi, hh = bh // h, bh % h
        at = (bi * t + ti) * h * HD + hh * HD
        s = np.zeros(WARP)
        for lane in range(WARP):
            for d in range(lane, HD, WARP):
                s[lane] += dout[at + d] * out[at + d]
        dsum[r] = s.sum()


def attn_bwd_dq(c, dqkv, dout, qkv, lse, dsum, b, t, h, causal, scale, bx, by):
    HD = c.HD
    sK, sV = smem(c), smem(c)
    bh = by
    bi, hh = bh // h, bh % h
    q0 = bx * TILE
    warp = warp_ids()
    cc = h * HD
    rs = 3 * cc
    base = bi * t * rs + hh * HD
    obase = bi * t * cc + hh * HD
    sl2 = scale * LOG2E

    load_tile(c, sK, qkv, base, rs, q0, t)
    load_tile(c, sV, dout, obase, cc, q0, t)
    qa = load_a_frags(c, sK, warp * 16)
    da = load_a_frags(c, sV, warp * 16)
    sK[:] = np.nan
    sV[:] = np.nan

    row = [q0 + warp * 16 + G, q0 + warp * 16 + G + 8]
    lrow, drow = [], []
    for r in range(2):
        live = row[r] < t
        idx = np.where(live, bh * t + row[r], 0)
        lrow.append(np.where(live, lse[idx] * LOG2E, np.inf))
        drow.append(np.where(live, dsum[idx], 0.0))
    dq = zeros(c.NH)
    kend = min(t, q0 + TILE) if causal else t
    for k0 in range(0, kend, TILE):
        load_tile(c, sK, qkv, base + cc, rs, k0, t)
        load_tile(c, sV, qkv, base + 2 * cc, rs, k0, t)
        for kc in range(c.KT):
            s, dp = zeros(2), zeros(2)
            mma_rows(c, s, qa, sK, 2 * kc, 2)
            mma_rows(c, dp, da, sV, 2 * kc, 2)
            for j in range(2):
                for e in range(4):
                    key = k0 + kc * 16 + j * 8 + 2 * Q + (e & 1)
                    r = e >> 1
                    with np.errstate(invalid="ignore"):
                        p = np.exp2(s[j][..., e] * sl2 - lrow[r])
                    p = np.where((key >= t) | (causal & (key > row[r])), 0.0, p)
                    s[j][..., e] = p * (dp[j][..., e] - drow[r])
            mma_p_step(c, dq, s[0], s[1], sK, kc)
    for nt in range(c.NH):
        for e in range(4):
            r = e >> 1
            live = row[r] < t
            at = base + row[r] * rs + nt * 8 + 2 * Q + (e & 1)
            np.add.at(dqkv, at[live], (dq[nt][..., e] * scale)[live])


def attn_bwd_dkv(c, dqkv, dout, qkv, lse, dsum, b, t, h, causal, scale, bx, by):
    HD = c.HD
    sQ, sO = smem(c), smem(c)
    bh = by
    bi, hh = bh // h, bh % h
    k0 = bx * TILE
    warp = warp_ids()
    cc = h * HD
    rs = 3 * cc
    base = bi * t * rs + hh * HD
    obase = bi * t * cc + hh * HD
    sl2 = scale * LOG2E

    load_tile(c, sQ, qkv, base + cc, rs, k0, t)
    load_tile(c, sO, qkv, base + 2 * cc, rs, k0, t)
    ka = load_a_frags(c, sQ, warp * 16)
    va = load_a_frags(c, sO, warp * 16)
    sQ[:] = np.nan
    sO[:] = np.nan

    key = [k0 + warp * 16 + G, k0 + warp * 16 + G + 8]
    dk, dv = zeros(c.NH), zeros(c.NH)
    for j0 in range(k0 if causal else 0, t, TILE):
        load_tile(c, sQ, qkv, base, rs, j0, t)
        load_tile(c, sO, dout, obase, cc, j0, t)
        sL = np.full(TILE, np.nan)
        sD = np.full(TILE, np.nan)
        for i in range(TILE):
            live = j0 + i < t
            sL[i] = lse[bh * t + j0 + i] * LOG2E if live else np.inf
            sD[i] = dsum[bh * t + j0 + i] if live else 0.0
        for qc in range(c.KT):
            s, dp = zeros(2), zeros(2)
            mma_rows(c, s, ka, sQ, 2 * qc, 2)
            mma_rows(c, dp, va, sO, 2 * qc, 2)
            for j in range(2):
                for e in range(4):
                    qi = qc * 16 + j * 8 + 2 * Q + (e & 1)
                    r = e >> 1
                    with np.errstate(invalid="ignore"):
                        p = np.exp2(s[j][..., e] * sl2 - sL[qi])
                    p = np.where(causal & (j0 + qi < key[r]), 0.0, p)
                    s[j][..., e] = p
                    dp[j][..., e] = p * (dp[j][..., e] - sD[qi])
            mma_p_step(c, dv, s[0], s[1], sO, qc)
            mma_p_step(c, dk, dp[0], dp[1], sQ, qc)
    for nt in range(c.NH):
        for e in range(4):
            r = e >> 1
            live = key[r] < t
            at = base + key[r] * rs + nt * 8 + 2 * Q + (e & 1)
            np.add.at(dqkv, (at + cc)[live], (dk[nt][..., e] * scale)[live])
            np.add.at(dqkv, (at + 2 * cc)[live], dv[nt][..., e][live])


def reference(qkv, dout, b, t, h, hd, causal, scale):
    x = qkv.reshape(b, t, 3, h, hd).transpose(2, 0, 3, 1, 4)  # (3, b, h, t, hd)
    q, k, v = x[0], x[1], x[2]
    s = scale * q @ k.transpose(0, 1, 3, 2)
    if causal:
        s = np.where(np.tril(np.ones((t, t), dtype=bool)), s, -np.inf)
    mx = s.max(-1, keepdims=True)
    e = np.exp(s - mx)
    lse = (mx + np.log(e.sum(-1, keepdims=True)))[..., 0]
    p = np.exp(s - lse[..., None])
    o = p @ v
    do = dout.reshape(b, t, h, hd).transpose(0, 2, 1, 3)
    dp = do @ v.transpose(0, 1, 3, 2)
    dsum = (do * o).sum(-1, keepdims=True)
    ds = p * (dp - dsum)
    dq = scale * ds @ k
    dk = scale * ds.transpose(0, 1, 3, 2) @ q
    dv = p.transpose(0, 1, 3, 2) @ do
    out = o.transpose(0, 2, 1, 3).reshape(-1)
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(-1)
    return out, lse.reshape(-1), dqkv


def run(hd, b, t, h, causal, rng):
    c = Consts(hd)
    scale = 1.0 / np.sqrt(hd)
    # Sharp logits (q, k entries up to +-4, as the GPU check uses), so that a wrong mask or a
    # misplaced fragment changes the result by far more than round-off.
    qkv = rng.uniform(-4, 4, b * t * 3 * h * hd)
    dout = rng.uniform(-1, 1, b * t * h * hd)
    out = np.full(b * t * h * hd, np.nan)
    lse = np.full(b * h * t, np.nan)
    tiles = -(-t // TILE)
    for by in range(b * h):
        for bx in range(tiles):
            attn_fwd(c, out, lse, qkv, b, t, h, causal, scale, bx, by)
    dsum = np.full(b * h * t, np.nan)
    attn_bwd_dot(c, dsum, dout, out, b, t, h)
    g0 = rng.uniform(-0.1, 0.1, b * t * 3 * h * hd)  # ops add into the gradient
    dqkv = g0.copy()
    for by in range(b * h):
        for bx in range(tiles):
            attn_bwd_dq(c, dqkv, dout, qkv, lse, dsum, b, t, h, causal, scale, bx, by)
            attn_bwd_dkv(c, dqkv, dout, qkv, lse, dsum, b, t, h, causal, scale, bx, by)
    r_out, r_lse, r_dqkv = reference(qkv, dout, b, t, h, hd, causal, scale)
    r_dqkv = r_dqkv + g0
    d = r_dqkv.reshape(b, t, 3, h, hd) - dqkv.reshape(b, t, 3, h, hd)
    errs = {
        "out": np.abs(out - r_out).max(),
        "lse": np.abs(lse - r_lse).max(),
        "dQ": np.abs(d[:, :, 0]).max(),
        "dK": np.abs(d[:, :, 1]).max(),
        "dV": np.abs(d[:, :, 2]).max(),
    }
    scale_of = {
        "out": np.abs(r_out).max(),
        "lse": np.abs(r_lse).max(),
        "dQ": np.abs(r_dqkv.reshape(b, t, 3, h, hd)[:, :, 0]).max(),
        "dK": np.abs(r_dqkv.reshape(b, t, 3, h, hd)[:, :, 1]).max(),
        "dV": np.abs(r_dqkv.reshape(b, t, 3, h, hd)[:, :, 2]).max(),
    }
    return errs, scale_of


def main():
    rng = np.random.default_rng(20261128)
    worst = 0.0
    print(f"{'variant':<8} {'t':>4} {'causal':<6} " + " ".join(f"{k:>9}" for k in ["out", "lse", "dQ", "dK", "dV"]))
    for hd in (32, 64, 128):
        for t in (50, 77, 130):
            for causal in (False, True):
                errs, mags = run(hd, 2, t, 2, causal, rng)
                vals = [errs[k] for k in ["out", "lse", "dQ", "dK", "dV"]]
                bad = any(not np.isfinite(v) for v in vals)
                worst = max(worst, np.inf if bad else max(vals))
                print(f"hd{hd:<6} {t:>4} {str(causal):<6} " + " ".join(f"{v:9.1e}" for v in vals))
    print(f"largest absolute error: {worst:.2e} (outputs of magnitude up to ~{max(mags.values()):.0f})")
    sys.exit(0 if worst < 1e-9 else 1)


if __name__ == "__main__":
    main()
