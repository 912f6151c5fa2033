"""Executes kernels/cuda/infonce.cu warp by warp in float64, launched as kernels/src/cuda/mod.rs
launches it (splits, chunks of output columns in grid z), and compares the one-block op's
statistics, loss and gradients with the block materialised in float64.

Mirrors infonce_fwd_block (the one-pass forward: row groups, column partials merged across a
group's row tiles), infonce_tile (the backward's two modes), infonce_block_fwd_finish,
infonce_col_rescale, infonce_col_lse, infonce_block_loss, infonce_reduce_rows and
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


def logit_tile(sm_f, sm_s, pitch, nch, dp, fx, f0, nf, sx, s0, s_end, dim, chunk_at, mt, nh, lse_s=None, sm_lse=None):
    """logit_tile in infonce.cu: this warp's 16 fixed x 32 streaming dot products over the chunks."""
    st = [np.zeros((NW, WARP, 4)) for _ in range(4)]
    for i in range(nch):
        c0 = chunk_at(i)
        cw = min(KC, dp - c0)
        if nch > 1:
            load_rows(sm_f, pitch, fx, f0, nf, dim, c0, cw)
        load_rows(sm_s, pitch, sx, s0, s_end, dim, c0, cw)
        if lse_s is not None and i == 0:
            for j in range(ST):
                sm_lse[j] = lse_s[s0 + j] * LOG2E if s0 + j < s_end else np.inf
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
    return st


def store_row_stats(m, l, sm_red, f0, nf, part_m, part_l, by):
    """store_row_stats in infonce.cu."""
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


def infonce_fwd_block(img, local, txt, glob, dim, chunk, rtiles, off, logit_scale, rpm, rpl, cpm, cpl, pos, bx, by):
    dp, kw = padded_dim(dim), chunk_width(dim)
    nch = (dp + KC - 1) // KC
    pitch = kw + 8
    sm_f = np.full(FT * pitch, np.nan)
    sm_s = np.full(ST * pitch, np.nan)
    sm_red = np.full(4 * FT, np.nan)
    sm_cred = np.full(8 * ST, np.nan)
    warp = np.arange(NW)[:, None]
    mt, nh = warp & 3, warp >> 2
    s_begin = by * chunk
    s_end = min(glob, s_begin + chunk)
    s = np.exp(logit_scale)
    for t in range(rtiles):
        f0 = (bx * rtiles + t) * FT
        if f0 >= local:
            break
        if nch == 1:
            load_rows(sm_f, pitch, img, f0, local, dim, 0, kw)
        frow = [f0 + mt * 16 + G, f0 + mt * 16 + G + 8]
        m = [np.full((NW, WARP), -np.inf) for _ in range(2)]
        l = [np.zeros((NW, WARP)) for _ in range(2)]
        for s0 in range(s_begin, s_end, ST):
            st = logit_tile(sm_f, sm_s, pitch, nch, dp, img, f0, local, txt, s0, s_end, dim, lambda i: i * KC, mt, nh)
            for nt in range(4):
                for c in range(2):
                    sc = nh * 32 + nt * 8 + 2 * Q + c
                    sj = s0 + sc
                    v = []
                    for r in range(2):
                        logit = s * st[nt][..., 2 * r + c]
                        live = (sj < s_end) & (frow[r] < local)
                        vr = np.where(live, logit * LOG2E, -np.inf)
                        v.append(vr)
                        up = live & (vr > m[r])
                        keep = live & ~(vr > m[r])
                        with np.errstate(invalid="ignore"):
                            l_up = l[r] * np.exp2(m[r] - vr) + 1.0
                            l_keep = l[r] + np.exp2(vr - m[r])
                        l[r] = np.where(up, l_up, np.where(keep, l_keep, l[r]))
                        m[r] = np.where(up, vr, m[r])
                        hit = live & (sj == off + frow[r])
                        pos[frow[r][hit]] = logit[hit]
                    cm = np.fmax(v[0], v[1])
                    for o in (4, 8, 16):
                        cm = np.fmax(cm, shfl_xor(cm, o))
                    with np.errstate(invalid="ignore"):
                        cs = np.where(cm == -np.inf, 0.0, np.exp2(v[0] - cm) + np.exp2(v[1] - cm))
                    for o in (4, 8, 16):
                        cs = cs + shfl_xor(cs, o)
                    for w in range(NW):
                        for lane in range(4):  # g == 0
                            col = sc[w, lane]
                            sm_cred[mt[w, 0] * ST + col] = cm[w, lane]
                            sm_cred[4 * ST + mt[w, 0] * ST + col] = cs[w, lane]
            for c in range(ST):
                j = s0 + c
                if j >= s_end:
                    continue
                mx = max(sm_cred[w * ST + c] for w in range(4))
                sm = 0.0
                if mx != -np.inf:
                    sm = sum(sm_cred[4 * ST + w * ST + c] * np.exp2(sm_cred[w * ST + c] - mx) for w in range(4))
                at = bx * glob + j
                if t > 0:
                    om, ol = cpm[at], cpl[at]
                    mn = max(om, mx)
                    if mn != -np.inf:
                        sm = ol * np.exp2(om - mn) + sm * np.exp2(mx - mn)
                        mx = mn
                cpm[at], cpl[at] = mx, sm
        store_row_stats(m, l, sm_red, f0, local, rpm, rpl, by)


def infonce_tile(mode, fx, nf, sx, ns, dim, chunk, off, lse_f, lse_s, logit_scale, coef, part_d, part_ds, dout, bx, by,
                 bz, gx):
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
    lrow = [np.zeros((NW, WARP)) for _ in range(2)]
    for r in range(2):
        live = frow[r] < nf
        lrow[r] = np.where(live, lse_f[np.where(live, frow[r], 0)] * LOG2E, np.inf)
    ds = np.zeros((NW, WARP))
    acc = np.zeros((NW, 4, 8, WARP, 4))  # [warp][a_mt][nt] per lane

    for s0 in range(s_begin, s_end, ST):
        st = logit_tile(sm_f, sm_s, pitch, nch, dp, fx, f0, nf, sx, s0, s_end, dim, lambda i: (bz + 1 + i) % nch * KC,
                        mt, nh, lse_s, sm_lse)
        for nt in range(4):
            for e in range(4):
                r = e >> 1
                sc = nh * 32 + nt * 8 + 2 * Q + (e & 1)
                sj = s0 + sc
                logit = s * st[nt][..., e]
                live = (sj < s_end) & (frow[r] < nf)
                v = logit * LOG2E
                with np.errstate(invalid="ignore"):
                    p = np.exp2(v - lrow[r]) + np.exp2(v - sm_lse[np.minimum(sc, ST - 1)])
                diag = (sj == off + frow[r]) if mode == 1 else (frow[r] == off + sj)
                gv = np.where(live, coef * (p - np.where(diag, 2.0, 0.0)), 0.0)
                if mode == 1:
                    ds = ds + np.where(live, gv * logit, 0.0)
                st[nt][..., e] = gv
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


def row_groups(local, glob, resident):
    """infonce_row_groups in mod.rs."""
    tiles = max(-(-local // 64), 1)
    want = int(np.floor(np.sqrt(max(resident, 1) * local / max(glob, 1)) + 0.5))
    per = -(-tiles // min(max(want, 1), tiles))
    return -(-tiles // per), per


def infonce(img, all_txt, ls, local, glob, dim, off, resident, other):
    """The host's infonce_block_fwd, infonce_col_rescale, infonce_block_loss and
    infonce_block_bwd (mod.rs), with `resident` blocks per device; `other` raises the column
    maxima as another rank's would (the all-reduce of the maxima)."""
    dp = padded_dim(dim)
    nz = -(-dp // KC)
    row_tiles, col_tiles = -(-local // 64), -(-glob // 64)
    # forward in one pass: the images in row groups, the texts streamed in splits
    groups, rtiles = row_groups(local, glob, resident)
    rsplits, rchunk = split_plan(glob, groups, resident)
    csplits = groups
    rpm, rpl = np.full(rsplits * local, np.nan), np.full(rsplits * local, np.nan)
    cpm, cpl = np.full(csplits * glob, np.nan), np.full(csplits * glob, np.nan)
    pos = np.full(local, np.nan)
    for by in range(rsplits):
        for bx in range(groups):
            infonce_fwd_block(img, local, all_txt, glob, dim, rchunk, rtiles, off, ls, rpm, rpl, cpm, cpl, pos, bx, by)
    assert not np.isnan(cpm).any() and not np.isnan(rpm).any(), "a partial left unwritten"
    # infonce_block_fwd_finish
    row_lse, col_max, col_sum = np.zeros(local), np.zeros(glob), np.zeros(glob)
    for k in range(local + glob):
        row = k < local
        i, n, splits = (k, local, rsplits) if row else (k - local, glob, csplits)
        pm, pl = (rpm, rpl) if row else (cpm, cpl)
        mx = max(pm[y * n + i] for y in range(splits))
        sm = sum(pl[y * n + i] * np.exp2(pm[y * n + i] - mx) for y in range(splits))
        if row:
            row_lse[i] = (mx + np.log2(sm)) / LOG2E
        else:
            col_max[i], col_sum[i] = mx / LOG2E, sm
    # the all-reduce of the maxima, infonce_col_rescale, infonce_col_lse, infonce_block_loss
    gmax = col_max + other
    col_sum = np.where(col_max != gmax, col_sum * np.exp(col_max - gmax), col_sum)
    col_lse = gmax + np.log(col_sum)
    loss = sum((row_lse[i] - pos[i]) + (gmax[off + i] + np.log(col_sum[off + i]) - pos[i])
               for i in range(local)) / (2 * glob)
    # backward (dloss = 1), gradients added to zero-filled outputs
    coef = 1.0 / (2 * glob)
    splits, chunk = split_plan(glob, row_tiles * nz, resident)
    d_img, d_all_txt = np.zeros(local * dim), np.zeros(glob * dim)
    nds = splits * row_tiles
    part_ds = np.full(nds, np.nan)
    part_d = np.full(splits * local * dim, np.nan)
    for bz in range(nz):
        for by in range(splits):
            for bx in range(row_tiles):
                infonce_tile(1, img, local, all_txt, glob, dim, chunk, off, row_lse, col_lse, ls, coef, part_d, part_ds,
                             None, bx, by, bz, row_tiles)
    s = np.exp(ls)
    n = local * dim
    d_img += s * sum(part_d[yy * n:(yy + 1) * n] for yy in range(splits))
    for bz in range(nz):
        for bx in range(col_tiles):
            infonce_tile(2, all_txt, glob, img, local, dim, local, off, col_lse, row_lse, ls, coef, None, None,
                         d_all_txt, bx, 0, bz, col_tiles)
    d_scale = part_ds.sum()
    stats = {"row_lse": row_lse, "pos": pos, "col_max": col_max, "col_lse": col_lse}
    return loss, stats, {"d_img": d_img, "d_all_txt": d_all_txt}, d_scale


def reference(img, all_txt, ls, local, glob, dim, off):
    """The block materialised: its images against all texts, the columns over its images."""
    s = np.exp(ls)
    X, AT = img.reshape(local, dim), all_txt.reshape(glob, dim)
    S = s * X @ AT.T
    rm, cm = S.max(1, keepdims=True), S.max(0, keepdims=True)
    row_lse = (rm + np.log(np.exp(S - rm).sum(1, keepdims=True)))[:, 0]
    col_lse = (cm + np.log(np.exp(S - cm).sum(0, keepdims=True)))[0]
    idx = np.arange(local)
    pos = S[idx, off + idx]
    loss = (row_lse - pos + col_lse[off + idx] - pos).sum() / (2 * glob)
    gm = np.exp(S - row_lse[:, None]) + np.exp(S - col_lse[None, :])
    gm[idx, off + idx] -= 2
    gm /= 2 * glob
    grads = {"d_img": (s * gm @ AT).reshape(-1), "d_all_txt": (s * gm.T @ X).reshape(-1)}
    stats = {"row_lse": row_lse, "pos": pos, "col_max": cm[0], "col_lse": col_lse}
    return loss, stats, grads, (gm * S).sum()


def rows(rng, n, d):
    v = rng.uniform(-1, 1, (n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).reshape(-1)


def main():
    rng = np.random.default_rng(20261128)
    # (local, global, dim, offset, resident blocks): widths that are and are not multiples of
    # 64, one and several chunks, one and several splits, one and several row tiles per group.
    sizes = [(64, 128, 64, 64, 8), (100, 300, 96, 150, 16), (37, 37, 128, 0, 132), (70, 200, 512, 100, 4),
             (50, 130, 600, 20, 6), (64, 192, 768, 64, 3), (40, 100, 1000, 30, 4), (30, 70, 1, 10, 2),
             # several row tiles per group in the forward (its column partials merged across
             # them), the last group partial, and with several chunks
             (200, 250, 64, 40, 2), (300, 320, 96, 10, 4), (150, 160, 600, 5, 1)]
    worst = 0.0
    for local, glob, dim, off, resident in sizes:
        at = rows(rng, glob, dim)
        img = rows(rng, local, dim)
        ls = np.log(1 / 0.07) if dim != 1 else np.log(3.0)
        other = rng.uniform(0, 2, glob)
        loss, stats, grads, dsc = infonce(img, at, ls, local, glob, dim, off, resident, other)
        rl, rstats, rg, rdsc = reference(img, at, ls, local, glob, dim, off)
        rel = lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30)
        errs = {"loss": rel(loss, rl), "d_scale": rel(dsc, rdsc)}
        errs.update({k: rel(stats[k], rstats[k]) for k in rstats})
        errs.update({k: rel(grads[k], rg[k]) for k in rg})
        e = max(v if np.isfinite(v) else np.inf for v in errs.values())
        worst = max(worst, e)
        print(f"local={local:<4} global={glob:<4} dim={dim:<5} off={off:<4} resident={resident:<4} "
              f"largest relative error {e:.1e} ({max(errs, key=errs.get)})")
    print(f"largest relative error: {worst:.2e}")
    sys.exit(0 if worst < 1e-9 else 1)


if __name__ == "__main__":
    main()
