"""Executes kernels/cuda/infonce.cu warp by warp in float64, launched as kernels/src/cuda/mod.rs
launches it (splits, chunks of output columns in grid z), and compares the loss, log-sum-exps
and every gradient with a plain float64 distributed InfoNCE.

Mirrors infonce_tile (the three modes), infonce_fwd_finish, infonce_reduce_rows and
infonce_finish_scale: the same loops, chunk order, padding masks and fragment indexing, with
the mma.sync m16n8k16 layouts of the PTX ISA (mma_emu.py), shared memory poisoned with NaN.
bf16 rounding is left out. Keep it in step with infonce.cu and the host's launch code.

Run (a venv of your own with numpy; not part of CI):
    /work/venv-kernels/bin/python scripts/dev/emulate_infonce.py
It prints the largest relative error per output and size and exits non-zero above 1e-9.
"""

import sys

import numpy as np

from mma_emu import G, Q, WARP, lds32, lds_pair, mma, pack, shfl_xor

FT = ST = 64
KC = 512
GPITCH = 72
NW = 8
LOG2E = 1.4426950408889634


def padded_dim(dim):
    return (dim + 63) // 64 * 64


def chunk_width(dim):
    return min(padded_dim(dim), KC)


def load_rows(dst, pitch, src, r0, n, dim, c0, cw):
    idx = np.arange(64 * cw)
    r, d = idx // cw, idx % cw
    live = (r0 + r < n) & (c0 + d < dim)
    v = np.zeros(idx.shape)
    v[live] = src[(r0 + r[live]) * dim + c0 + d[live]]
    dst[r * pitch + d] = v


def infonce_tile(mode, fx, nf, sx, ns, dim, chunk, off, lse, logit_scale, coef, part_m, part_l, pos, part_d, part_ds,
                 dout, bx, by, bz, gx):
    dp, kw = padded_dim(dim), chunk_width(dim)
    nch = (dp + KC - 1) // KC
    pitch = kw + 8
    sm_f = np.full(FT * pitch, np.nan)
    sm_s = np.full(ST * pitch, np.nan)
    sm_g = np.full(FT * GPITCH, np.nan)
    sm_lse = np.full(ST, np.nan)
    sm_red = np.full(4 * FT, np.nan)
    warp = np.arange(NW)[:, None]
    mt, nh = warp & 3, warp >> 2
    f0 = bx * FT
    s_begin = by * chunk
    s_end = min(ns, s_begin + chunk)
    s = np.exp(logit_scale)

    if nch == 1:
        load_rows(sm_f, pitch, fx, f0, nf, dim, 0, kw)
    frow = [f0 + mt * 16 + G, f0 + mt * 16 + G + 8]
    m = [np.full((NW, WARP), -np.inf) for _ in range(2)]
    l = [np.zeros((NW, WARP)) for _ in range(2)]
    lrow = [np.zeros((NW, WARP)) for _ in range(2)]
    if mode == 1:
        for r in range(2):
            live = frow[r] < nf
            lrow[r] = np.where(live, lse[np.where(live, frow[r], 0)] * LOG2E, np.inf)
    ds = np.zeros((NW, WARP))
    acc = np.zeros((NW, 4, 8, WARP, 4))  # [warp][a_mt][nt] per lane

    for s0 in range(s_begin, s_end, ST):
        st = [np.zeros((NW, WARP, 4)) for _ in range(4)]
        for i in range(nch):
            c0 = (i if mode == 0 else (bz + 1 + i) % nch) * KC
            cw = min(KC, dp - c0)
            if nch > 1:
                load_rows(sm_f, pitch, fx, f0, nf, dim, c0, cw)
            load_rows(sm_s, pitch, sx, s0, s_end, dim, c0, cw)
            if mode == 2 and i == 0:
                for j in range(ST):
                    sm_lse[j] = lse[s0 + j] * LOG2E if s0 + j < s_end else np.inf
            for k in range(0, cw, 16):
                a = np.stack([
                    lds32(sm_f, (mt * 16 + G) * pitch + k + 2 * Q),
                    lds32(sm_f, (mt * 16 + G + 8) * pitch + k + 2 * Q),
                    lds32(sm_f, (mt * 16 + G) * pitch + k + 2 * Q + 8),
                    lds32(sm_f, (mt * 16 + G + 8) * pitch + k + 2 * Q + 8),
                ], axis=2)
                for nt in range(4):
                    bp = (nh * 32 + nt * 8 + G) * pitch + k + 2 * Q
                    mma(st[nt], a, lds32(sm_s, bp), lds32(sm_s, bp + 8))
        for nt in range(4):
            for e in range(4):
                r = e >> 1
                sc = nh * 32 + nt * 8 + 2 * Q + (e & 1)
                sj = s0 + sc
                logit = s * st[nt][..., e]
                live = (sj < s_end) & (frow[r] < nf)
                if mode == 0:
                    v = logit * LOG2E
                    up = live & (v > m[r])
                    keep = live & ~(v > m[r])
                    with np.errstate(invalid="ignore"):
                        l_up = l[r] * np.exp2(m[r] - v) + 1.0
                        l_keep = l[r] + np.exp2(v - m[r])
                    l[r] = np.where(up, l_up, np.where(keep, l_keep, l[r]))
                    m[r] = np.where(up, v, m[r])
                    hit = live & (sj == off + frow[r])
                    pos[frow[r][hit]] = logit[hit]
                else:
                    if mode == 1:
                        with np.errstate(invalid="ignore"):
                            p = np.exp2(logit * LOG2E - lrow[r])
                        diag = sj == off + frow[r]
                    else:
                        p = np.exp2(logit * LOG2E - sm_lse[np.minimum(sc, ST - 1)])
                        diag = frow[r] == off + sj
                    gv = np.where(live, coef * (p - np.where(diag, 1.0, 0.0)), 0.0)
                    if mode == 1:
                        ds = ds + np.where(live, gv * logit, 0.0)
                    st[nt][..., e] = gv
        if mode != 0:
            for nt in range(4):
                col = nh * 32 + nt * 8 + 2 * Q
                for w in range(NW):
                    for half, rr in ((0, 0), (2, 8)):
                        at = (mt[w, 0] * 16 + G + rr) * GPITCH + col[w]
                        sm_g[at] = st[nt][w, :, half]
                        sm_g[at + 1] = st[nt][w, :, half + 1]
            for w in range(NW):
                d0 = w * 64
                if not (bz * KC + d0 < dp):
                    continue
                for kk in range(4):
                    b = []
                    for nt in range(8):
                        bp = (kk * 16 + 2 * Q) * pitch + d0 + nt * 8 + G
                        b.append((lds_pair(sm_s, bp, pitch)[None], lds_pair(sm_s, bp + 8 * pitch, pitch)[None]))
                    for a_mt in range(4):
                        a = np.stack([
                            lds32(sm_g, (a_mt * 16 + G) * GPITCH + kk * 16 + 2 * Q),
                            lds32(sm_g, (a_mt * 16 + G + 8) * GPITCH + kk * 16 + 2 * Q),
                            lds32(sm_g, (a_mt * 16 + G) * GPITCH + kk * 16 + 2 * Q + 8),
                            lds32(sm_g, (a_mt * 16 + G + 8) * GPITCH + kk * 16 + 2 * Q + 8),
                        ], axis=1)[None]
                        for nt in range(8):
                            tmp = acc[w, a_mt, nt][None].copy()
                            mma(tmp, a, b[nt][0], b[nt][1])
                            acc[w, a_mt, nt] = tmp[0]

    if mode == 0:
        for r in range(2):
            for o in (1, 2):
                m2 = shfl_xor(m[r], o)
                l2 = shfl_xor(l[r], o)
                mn = np.fmax(m[r], m2)
                ok = mn != -np.inf
                with np.errstate(invalid="ignore"):
                    ln = l[r] * np.exp2(m[r] - mn) + l2 * np.exp2(m2 - mn)
                l[r] = np.where(ok, ln, l[r])
                m[r] = np.where(ok, mn, m[r])
        for w in range(NW):
            for lane in range(WARP):
                if lane & 3 == 0:
                    for r in range(2):
                        fr = (w & 3) * 16 + (lane >> 2) + 8 * r
                        sm_red[(w >> 2) * FT + fr] = m[r][w, lane]
                        sm_red[2 * FT + (w >> 2) * FT + fr] = l[r][w, lane]
        for fr in range(FT):
            if f0 + fr >= nf:
                continue
            ma, mb = sm_red[fr], sm_red[FT + fr]
            la, lb = sm_red[2 * FT + fr], sm_red[3 * FT + fr]
            mn = max(ma, mb)
            ln = 0.0
            if mn != -np.inf:
                ln = la * np.exp2(ma - mn) + lb * np.exp2(mb - mn)
            part_m[by * nf + f0 + fr] = mn
            part_l[by * nf + f0 + fr] = ln
        return
    if mode == 1 and bz == 0:
        part_ds[by * gx + bx] = ds.sum()
    for w in range(NW):
        d0 = bz * KC + w * 64
        if d0 >= dp:
            continue
        for a_mt in range(4):
            for nt in range(8):
                for e in range(4):
                    row = f0 + a_mt * 16 + G + 8 * (e >> 1)
                    d = d0 + nt * 8 + 2 * Q + (e & 1)
                    ok = (row < nf) & (d < dim)
                    if mode == 1:
                        part_d[((by * nf + row) * dim + d)[ok]] = acc[w, a_mt, nt][:, e][ok]
                    else:
                        np.add.at(dout, (row * dim + d)[ok], s * acc[w, a_mt, nt][:, e][ok])


def split_plan(glob, blocks_per_split, resident):
    """infonce_split_plan in mod.rs: the split with the least (waves x (tiles + 1))."""
    col_tiles = max(-(-glob // 64), 1)
    bps, resident = max(blocks_per_split, 1), max(resident, 1)
    best = (None, 1, col_tiles)
    for want in range(1, min(col_tiles, 4 * resident) + 1):
        tiles = -(-col_tiles // want)
        splits = -(-col_tiles // tiles)
        cost = -(-(splits * bps) // resident) * (tiles + 1)
        if best[0] is None or cost < best[0]:
            best = (cost, splits, tiles)
    return best[1], best[2] * 64


def infonce(img, txt, all_img, all_txt, ls, local, glob, dim, off, resident):
    """The host's infonce_fwd and infonce_bwd (mod.rs), with `resident` blocks per device."""
    dp = padded_dim(dim)
    nz = -(-dp // KC)
    row_tiles = -(-local // 64)
    # forward
    splits, chunk = split_plan(glob, row_tiles, resident)
    pm = np.full(2 * splits * local, np.nan)
    pl = np.full(2 * splits * local, np.nan)
    pos = np.full(2 * local, np.nan)
    for d, (fx, sx) in enumerate([(img, all_txt), (txt, all_img)]):
        for by in range(splits):
            for bx in range(row_tiles):
                infonce_tile(0, fx, local, sx, glob, dim, chunk, off, None, ls, 0.0,
                             pm[d * splits * local:], pl[d * splits * local:], pos[d * local:], None, None, None,
                             bx, by, 0, row_tiles)
    lse = [np.zeros(local), np.zeros(local)]
    acc = 0.0
    for k in range(2 * local):
        d, i = k // local, k % local
        mx = max(pm[d * splits * local + y * local + i] for y in range(splits))
        sm = sum(pl[d * splits * local + y * local + i] * np.exp2(pm[d * splits * local + y * local + i] - mx)
                 for y in range(splits))
        lse[d][i] = (mx + np.log2(sm)) / LOG2E
        acc += lse[d][i] - pos[d * local + i]
    loss = acc / (2 * glob)
    # backward (dloss = 1), gradients added to zero-filled outputs
    coef = 1.0 / (2 * glob)
    splits, chunk = split_plan(glob, row_tiles * nz, resident)
    grads = {k: np.zeros(n * dim) for k, n in [("d_img", local), ("d_txt", local), ("d_all_img", glob), ("d_all_txt", glob)]}
    nds = splits * row_tiles
    part_ds = np.full(2 * nds, np.nan)
    dirs = [(img, all_txt, lse[0], "d_img", "d_all_txt"), (txt, all_img, lse[1], "d_txt", "d_all_img")]
    for d, (x, y, l, dx, dy) in enumerate(dirs):
        part_d = np.full(splits * local * dim, np.nan)
        for bz in range(nz):
            for by in range(splits):
                for bx in range(row_tiles):
                    infonce_tile(1, x, local, y, glob, dim, chunk, off, l, ls, coef, None, None, None, part_d,
                                 part_ds[d * nds:], None, bx, by, bz, row_tiles)
        s = np.exp(ls)
        n = local * dim
        grads[dx] += s * sum(part_d[yy * n:(yy + 1) * n] for yy in range(splits))
        for bz in range(nz):
            for bx in range(-(-glob // 64)):
                infonce_tile(2, y, glob, x, local, dim, local, off, l, ls, coef, None, None, None, None, None,
                             grads[dy], bx, 0, bz, -(-glob // 64))
    d_scale = part_ds.sum()
    return loss, lse, grads, d_scale


def reference(img, txt, all_img, all_txt, ls, local, glob, dim, off):
    s = np.exp(ls)
    X, T = img.reshape(local, dim), txt.reshape(local, dim)
    AI, AT = all_img.reshape(glob, dim), all_txt.reshape(glob, dim)
    out = {}
    loss = 0.0
    d_scale = 0.0
    g = {"d_img": np.zeros_like(X), "d_txt": np.zeros_like(T), "d_all_img": np.zeros_like(AI),
         "d_all_txt": np.zeros_like(AT)}
    lses = []
    for x, y, dx, dy in [(X, AT, "d_img", "d_all_txt"), (T, AI, "d_txt", "d_all_img")]:
        logit = s * x @ y.T
        mx = logit.max(1, keepdims=True)
        lse = (mx + np.log(np.exp(logit - mx).sum(1, keepdims=True)))[:, 0]
        lses.append(lse)
        idx = np.arange(local)
        loss += (lse - logit[idx, off + idx]).sum()
        gm = np.exp(logit - lse[:, None])
        gm[idx, off + idx] -= 1
        gm /= 2 * glob
        g[dx] += s * gm @ y
        g[dy] += s * gm.T @ x
        d_scale += (gm * logit).sum()
    return loss / (2 * glob), lses, {k: v.reshape(-1) for k, v in g.items()}, d_scale


def rows(rng, n, d):
    v = rng.uniform(-1, 1, (n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).reshape(-1)


def main():
    rng = np.random.default_rng(20261128)
    # (local, global, dim, offset, resident blocks): widths that are and are not multiples of
    # 64, one and several chunks, one and several splits.
    sizes = [(64, 128, 64, 64, 8), (100, 300, 96, 150, 16), (37, 37, 128, 0, 132), (70, 200, 512, 100, 4),
             (50, 130, 600, 20, 6), (64, 192, 768, 64, 3), (40, 100, 1000, 30, 4), (30, 70, 1, 10, 2)]
    worst = 0.0
    for local, glob, dim, off, resident in sizes:
        ai, at = rows(rng, glob, dim), rows(rng, glob, dim)
        img, txt = ai[off * dim:(off + local) * dim], at[off * dim:(off + local) * dim]
        ls = np.log(1 / 0.07) if dim != 1 else np.log(3.0)
        loss, lse, grads, dsc = infonce(img, txt, ai, at, ls, local, glob, dim, off, resident)
        rl, rlse, rg, rdsc = reference(img, txt, ai, at, ls, local, glob, dim, off)
        rel = lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30)
        errs = {"loss": rel(loss, rl), "lse_img": rel(lse[0], rlse[0]), "lse_txt": rel(lse[1], rlse[1]),
                "d_scale": rel(dsc, rdsc)}
        errs.update({k: rel(grads[k], rg[k]) for k in rg})
        e = max(v if np.isfinite(v) else np.inf for v in errs.values())
        worst = max(worst, e)
        print(f"local={local:<4} global={glob:<4} dim={dim:<5} off={off:<4} resident={resident:<4} "
              f"largest relative error {e:.1e} ({max(errs, key=errs.get)})")
    print(f"largest relative error: {worst:.2e}")
    sys.exit(0 if worst < 1e-9 else 1)


if __name__ == "__main__":
    main()
