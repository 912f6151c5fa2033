#!/usr/bin/env python3
"""Emulates, in float64, the indexing of the token table's gradient in kernels/cuda/embed.cu
(token_embed_bwd_sort, _rank, _pieces, _join) against a plain reference, dwte[ids[k]] += dout[k].

Each kernel is replayed block by block as the CUDA code indexes it: the bitonic network of
token_embed_bwd_sort stage by stage, below_in_chunk's power-of-two search, the pieces' run
loop with its edge tests, the join's first-edge test, binary search and row split. Columns are
carried as vectors (no control flow depends on the column). Besides the values it checks that
the ranks are a permutation, that every partial slot read was written, and that each
(id, column) of dwte is added to by exactly one block (a second writer would be a race).

    /work/venv-kernels/bin/python scripts/dev/emulate_token_embed.py
"""
import sys

import numpy as np

CHUNK, PIECE, JOIN_ROWS = 1024, 32, 8
INVALID, NO_KEY = 0x7FFFFFFF, (1 << 64) - 1


def sort_chunks(ids, vocab):
    ntok = len(ids)
    nchunks = -(-ntok // CHUNK)
    keys = np.full(nchunks * CHUNK, NO_KEY, dtype=np.uint64)
    for c in range(nchunks):
        s = np.full(CHUNK, NO_KEY, dtype=np.uint64)
        for tid in range(CHUNK):
            k = c * CHUNK + tid
            if k < ntok:
                i = int(ids[k])
                kid = INVALID if (i < 0 or i >= vocab) else i
                s[tid] = np.uint64((kid << 32) | k)
        tid = np.arange(CHUNK)
        size = 2
        while size <= CHUNK:
            stride = size >> 1
            while stride > 0:
                partner = tid ^ stride
                lo = tid[partner > tid]
                hi = partner[partner > tid]
                a, b = s[lo].copy(), s[hi].copy()
                ascending = (lo & size) == 0
                swap = (a > b) == ascending
                s[lo[swap]] = b[swap]
                s[hi[swap]] = a[swap]
                stride >>= 1
            size <<= 1
        keys[c * CHUNK:(c + 1) * CHUNK] = s
    return keys, nchunks


def below_in_chunk(chunk, key):
    pos = 0
    step = CHUNK // 2
    while step > 0:
        if chunk[pos + step - 1] < key:
            pos += step
        step >>= 1
    return pos + int(chunk[pos] < key)


def rank(keys, ntok, nchunks):
    out = np.full(ntok, NO_KEY, dtype=np.uint64)
    seen = np.zeros(ntok, dtype=int)
    for e in range(nchunks * CHUNK):
        key = keys[e]
        if key == np.uint64(NO_KEY):
            continue
        c, r = e // CHUNK, e % CHUNK
        for o in range(nchunks):
            if o != c:
                r += below_in_chunk(keys[o * CHUNK:(o + 1) * CHUNK], key)
        assert 0 <= r < ntok, f"rank {r} out of 0..{ntok}"
        out[r] = key
        seen[r] += 1
    assert (seen == 1).all(), "the ranks are not a permutation"
    return out


def key_id(key):
    return int(key) >> 32


def pieces_and_join(dwte, dout, sorted_keys, vocab, writers):
    ntok, d = dout.shape
    npieces = -(-ntok // PIECE)
    partial = np.full((2 * npieces, d), np.nan)  # NaN: a slot read before it is written
    for p in range(npieces):
        first = p * PIECE
        ln = min(PIECE, ntok - first)
        sid = [key_id(sorted_keys[first + i]) for i in range(ln)]
        stok = [int(sorted_keys[first + i]) & 0xFFFFFFFF for i in range(ln)]
        before = key_id(sorted_keys[first - 1]) if p > 0 else INVALID
        after = key_id(sorted_keys[first + ln]) if first + ln < ntok else INVALID
        acc = np.zeros(d)
        start = 0
        for i in range(ln):
            acc = acc + dout[stok[i]]
            idv = sid[i]
            if i + 1 < ln and sid[i + 1] == idv:
                continue
            if idv < vocab:
                from_before = start == 0 and idv == before
                goes_on = i + 1 == ln and idv == after
                if not from_before and not goes_on:
                    dwte[idv] += acc
                    writers[idv].append(("piece", p))
                else:
                    if start == 0:
                        partial[2 * p] = acc
                    if i + 1 == ln:
                        partial[2 * p + 1] = acc
            acc = np.zeros(d)
            start = i + 1
    for q in range(npieces - 1):
        edge = (q + 1) * PIECE
        idv = key_id(sorted_keys[edge - 1])
        if idv >= vocab or key_id(sorted_keys[edge]) != idv:
            continue
        if q > 0 and key_id(sorted_keys[q * PIECE - 1]) == idv:
            continue
        lo, hi = edge, ntok
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            if key_id(sorted_keys[mid]) == idv:
                lo = mid
            else:
                hi = mid
        last_piece = lo // PIECE
        m = last_piece - q + 1
        rows = np.zeros((JOIN_ROWS, d))
        for y in range(JOIN_ROWS):
            acc = np.zeros(d)
            for i in range(y, m, JOIN_ROWS):
                slot = 2 * q + 1 if i == 0 else 2 * (q + i)
                assert not np.isnan(partial[slot]).any(), f"join of id {idv} read unwritten slot {slot}"
                acc = acc + partial[slot]
            rows[y] = acc
        total = np.zeros(d)
        for r in range(JOIN_ROWS):
            total = total + rows[r]
        dwte[idv] += total
        writers[idv].append(("join", q))


def emulate(ids, vocab, d, rng):
    ids = np.asarray(ids, dtype=np.int64)
    ntok = len(ids)
    dout = rng.uniform(-1, 1, size=(ntok, d))
    dwte0 = rng.uniform(-1, 1, size=(vocab, d))
    want = dwte0.copy()
    valid = (ids >= 0) & (ids < vocab)
    np.add.at(want, ids[valid], dout[valid])
    keys, nchunks = sort_chunks(ids, vocab)
    sorted_keys = rank(keys, ntok, nchunks)
    expect = sorted(((INVALID if (i < 0 or i >= vocab) else int(i)) << 32) | k for k, i in enumerate(ids))
    assert [int(k) for k in sorted_keys] == expect, "the sort is wrong"
    got = dwte0.copy()
    writers = {i: [] for i in range(vocab)}
    pieces_and_join(got, dout, sorted_keys, vocab, writers)
    for i, w in writers.items():
        n = int((ids == i).sum())
        assert len(w) == (1 if n else 0), f"id {i} ({n} tokens) written by {w}"
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
    runs = np.unique(ids[valid], return_counts=True)[1]
    return err, len(runs), int(runs.max()) if len(runs) else 0


def clip_batch(rng, b, t):
    """Texts of 8..60 tokens: start, words, end, then padding id 0 (the tokenizer's)."""
    ids = np.zeros((b, t), dtype=np.int64)
    for row in ids:
        n = int(rng.integers(8, 61))
        row[0] = 49406
        row[1:n - 1] = rng.integers(1, 49000, size=n - 2)
        row[n - 1] = 49407
    return ids.ravel()


def main():
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
    cases = [
        ("default text batch b=256 t=77 (padding id 0)", clip_batch(rng, 256, 77), 49408, 4),
        ("b=16 t=77", clip_batch(rng, 16, 77), 49408, 5),
    ]
    for n in [1, 31, 32, 33, 63, 64, 65, 1023, 1024, 1025, 2049]:
        cases.append((f"n={n} one id", np.full(n, 3), 10, 3))
        cases.append((f"n={n} ids from 5", rng.integers(0, 5, size=n), 5, 3))
    for n in [1000, 3000]:
        k = np.arange(n)
        cases += [
            (f"n={n} runs of 32 on piece edges", k // 32, n // 32 + 1, 3),
            (f"n={n} runs of 64 (two pieces each)", k // 64, n // 64 + 1, 3),
            (f"n={n} runs of 32 across edges", (k + 16) // 32, n // 32 + 2, 3),
            (f"n={n} runs of 97", k // 97, n // 97 + 1, 3),
            (f"n={n} shuffled, invalid ids", np.where(rng.random(n) < 0.1, rng.choice([-1, 40, 99999], n),
                                                     rng.integers(0, 40, n)), 40, 3),
            (f"n={n} descending", (n - 1 - k) // 7, n // 7 + 1, 3),
        ]
    worst = 0.0
    for name, ids, vocab, d in cases:
        err, runs, longest = emulate(ids, vocab, d, rng)
        worst = max(worst, err)
        print(f"{name:<48} tokens {len(ids):>6}  ids {runs:>5}  longest run {longest:>6}  max rel err {err:.1e}")
    print(f"all {len(cases)} cases: sort exact, one writer per (id, column), worst error {worst:.1e}")
    assert worst < 1e-12


if __name__ == "__main__":
    main()
