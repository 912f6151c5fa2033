#!/usr/bin/env python3
"""Does the generator teach? Linear probes on a trained CLIP against the same CLIP untrained
(developer script; CI never runs it).

  python scripts/probe_check.py --tree DIR --checkpoint RUN/checkpoints/step-NNNNNN [--checkpoint ...] \\
      [--random-seeds 7,8,9] [--random DIR ...] [--features pooled|embeds|both] \\
      [--coordinator target/release/coordinator] [--min-pos 5] [--bootstrap 1000] [--json OUT]

DIR is a MIMIC-CXR-JPG tree (for example one `coordinator synth --dataset mimic` wrote). Its pairs
come from `coordinator data-stats --dataset mimic --root DIR --uncertain zeros --dump-pairs N`
(default views PA and AP, the same pairs training reads; uncertain and blank labels are 0). Each
image is preprocessed as the loader's evaluation path does it (data/src/loader.rs, augment off:
scale the smaller side to the model's size, centre crop, bilinear at pixel centres, black outside
the image, CLIP mean and std, grey in all 3 channels), and encoded by `transformers.CLIPModel`:

  pooled: vision_model(...).pooler_output (the post-layernorm CLS token, before the projection)
  embeds: visual_projection(pooled), L2-normalised (the features the contrastive loss compares)

The random-init arm is `coordinator init` with the sizes, activation and seed read from the first
checkpoint's config.json (`--random-seeds`; the training run's step-0 weights when the seed is the
run's `--seed`), or any folders given with `--random`.

The probe: one L2-regularised logistic regression per label on the train split's features
(standardised with the train mean and std), the penalty chosen per label from a small grid by
3-fold cross-validated AUC on train (folds by patient), refitted on all of train, scored by ROC
AUC on the test split. Labels with fewer than --min-pos positives or negatives in the test split
(or 2 x --min-pos in train) are left out, the same set for every arm. Macro AUC is the mean over
the kept labels; its 95% interval and that of each arm's difference from the first random arm
come from a bootstrap over test patients (paired: the same resample for every arm). That interval
measures test-set sampling noise only, not training noise: train a second seed for that.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
LAMBDAS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def read_pairs(coordinator, tree):
    out = subprocess.run(
        [coordinator, "data-stats", "--dataset", "mimic", "--root", tree, "--uncertain", "zeros",
         "--json", "--dump-pairs", "100000000"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    pairs = [json.loads(line) for line in out[1:] if line.strip()]
    return [p for p in pairs if p["split"] in ("train", "test")]


def eval_pixels(path, size):
    """The loader's evaluation warp (make_warp with augment=false, then warp_normalise)."""
    g = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    h, w = g.shape
    k = min(w, h) / size  # source pixels per output pixel
    o = np.arange(size, dtype=np.float32) + 0.5 - size * 0.5
    sx = k * o + w * 0.5 - 0.5
    sy = k * o + h * 0.5 - 0.5
    vx = (sx >= 0) & (sx < w - 1)
    vy = (sy >= 0) & (sy < h - 1)
    sx = np.clip(sx, 0, w - 1 - 1e-3)
    sy = np.clip(sy, 0, h - 1 - 1e-3)
    x0, y0 = sx.astype(np.int64), sy.astype(np.int64)
    fx, fy = sx - x0, sy - y0
    p00 = g[y0][:, x0]
    p01 = g[y0][:, x0 + 1]
    p10 = g[y0 + 1][:, x0]
    p11 = g[y0 + 1][:, x0 + 1]
    top = p00 + (p01 - p00) * fx[None, :]
    bot = p10 + (p11 - p10) * fx[None, :]
    v = top + (bot - top) * fy[:, None]
    v = v * (vy[:, None] & vx[None, :])
    return (v[None] / 255.0 - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]


@torch.no_grad()
def features(ckpt, pixels, batch=256):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(ckpt).eval()
    pooled, embeds = [], []
    for i in range(0, len(pixels), batch):
        x = torch.from_numpy(pixels[i:i + batch])
        p = model.vision_model(pixel_values=x).pooler_output
        e = model.visual_projection(p)
        pooled.append(p)
        embeds.append(e / e.norm(dim=-1, keepdim=True))
    return {"pooled": torch.cat(pooled).double().numpy(), "embeds": torch.cat(embeds).double().numpy()}


def auc(y, s):
    """ROC AUC by ranks (ties averaged); y in {0,1}."""
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ss = s[order]
    i = 0
    while i < len(ss):
        j = i
        while j + 1 < len(ss) and ss[j + 1] == ss[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    npos = y.sum()
    nneg = len(y) - npos
    return (ranks[y == 1].sum() - npos * (npos + 1) / 2) / (npos * nneg)


def fit_logreg(x, y, lam, iters=200):
    """Independent L2 logistic regressions, one per column of y: minimise mean BCE + lam/2 |w|^2."""
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    lam_t = torch.as_tensor(lam, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, reduction="none").mean(0)
        loss = (loss + 0.5 * lam_t * (w * w).sum(0)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def probe(xtr, ytr, gtr, xte, yte, folds=3):
    """Per-label penalty by grouped CV on train, refit, test scores [n_test, n_labels]."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-8
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    groups = np.unique(gtr)
    rng = np.random.default_rng(0)
    fold_of = dict(zip(rng.permutation(groups), np.arange(len(groups)) % folds))
    fold = np.array([fold_of[g] for g in gtr])
    L = ytr.shape[1]
    cv = np.zeros((len(LAMBDAS), L))
    for li, lam in enumerate(LAMBDAS):
        for f in range(folds):
            tr, va = fold != f, fold == f
            w, b = fit_logreg(xtr[tr], ytr[tr], np.full(L, lam))
            s = xtr[va] @ w + b
            for j in range(L):
                yv = ytr[va, j]
                cv[li, j] += auc(yv, s[:, j]) / folds if 0 < yv.sum() < len(yv) else 0.5 / folds
    best = np.array([LAMBDAS[i] for i in cv.argmax(0)])
    w, b = fit_logreg(xtr, ytr, best)
    return xte @ w + b, best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", required=True)
    ap.add_argument("--checkpoint", action="append", required=True, help="trained CLIP folder(s)")
    ap.add_argument("--random", action="append", default=[], help="untrained CLIP folder(s)")
    ap.add_argument("--random-seeds", default="", help="comma-separated seeds for `coordinator init`")
    ap.add_argument("--coordinator", default="target/release/coordinator")
    ap.add_argument("--features", choices=["pooled", "embeds", "both"], default="both")
    ap.add_argument("--min-pos", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    t0 = time.time()
    pairs = read_pairs(a.coordinator, a.tree)
    cfg = json.load(open(os.path.join(a.checkpoint[0], "config.json")))
    vc = cfg["vision_config"]
    size = vc["image_size"]
    split = np.array([p["split"] for p in pairs])
    y = np.array([[p["labels"][l] for l in LABELS] for p in pairs], dtype=np.float64)
    patient = np.array([p["subject_id"] for p in pairs])
    tr, te = split == "train", split == "test"
    pixels = np.stack([eval_pixels(os.path.join(a.tree, p["image"]), size) for p in pairs]).astype(np.float32)
    print(f"{tr.sum()} train and {te.sum()} test pairs ({len(set(patient[te]))} test patients), "
          f"{size} px, read in {time.time() - t0:.1f} s", file=sys.stderr)

    keep = [j for j in range(len(LABELS))
            if min(y[te, j].sum(), (1 - y[te, j]).sum()) >= a.min_pos
            and min(y[tr, j].sum(), (1 - y[tr, j]).sum()) >= 2 * a.min_pos]
    dropped = [LABELS[j] for j in range(len(LABELS)) if j not in keep]

    tmp = tempfile.TemporaryDirectory()
    def short(path):  # RUN/checkpoints/step-N -> RUN/step-N
        parts = [q for q in os.path.normpath(os.path.abspath(path)).split(os.sep) if q and q != "checkpoints"]
        return "/".join(parts[-2:])

    arms = [(f"CLS {short(c)}", c) for c in a.checkpoint]
    rnd = [(f"random {short(r)}", r) for r in a.random]
    for s in [s for s in a.random_seeds.split(",") if s.strip()]:
        out = os.path.join(tmp.name, f"init-{s}")
        subprocess.run(
            [a.coordinator, "init", "--out", out, "--image", str(size), "--patch", str(vc["patch_size"]),
             "--width", str(vc["hidden_size"]), "--layers", str(vc["num_hidden_layers"]),
             "--heads", str(vc["num_attention_heads"]), "--act", vc.get("hidden_act", "quick_gelu"),
             "--seed", s.strip()],
            check=True, capture_output=True)
        rnd.append((f"random seed {s.strip()}", out))
    arms += rnd
    names = [n for n, _ in arms]
    if len(set(names)) != len(names):
        sys.exit(f"two arms share a name: {names}")
    kinds = ["pooled", "embeds"] if a.features == "both" else [a.features]

    scores = {}
    for name, path in arms:
        t = time.time()
        f = features(path, pixels)
        for k in kinds:
            s, lam = probe(f[k][tr], y[tr][:, keep], patient[tr], f[k][te], y[te][:, keep])
            scores[(name, k)] = s
        print(f"{name}: features and probes in {time.time() - t:.1f} s", file=sys.stderr)

    yte = y[te][:, keep]
    cols = list(scores)
    per = {c: np.array([auc(yte[:, j], scores[c][:, j]) for j in range(len(keep))]) for c in cols}

    # Paired bootstrap over test patients.
    pte = patient[te]
    ups = np.unique(pte)
    idx_of = {u: np.flatnonzero(pte == u) for u in ups}
    rng = np.random.default_rng(12345)
    boot = {c: [] for c in cols}
    for _ in range(a.bootstrap):
        idx = np.concatenate([idx_of[u] for u in rng.choice(ups, len(ups))])
        ok = [j for j in range(len(keep)) if 0 < yte[idx, j].sum() < len(idx)]
        for c in cols:
            boot[c].append(np.mean([auc(yte[idx, j], scores[c][idx, j]) for j in ok]))
    boot = {c: np.array(v) for c, v in boot.items()}

    def pct(v):
        return f"{100 * np.mean(v):.1f}"

    print()
    print("| label | test pos/neg | " + " | ".join(f"{n} ({k})" for n, k in cols) + " |")
    print("| --- | --- |" + " --- |" * len(cols))
    for jj, j in enumerate(keep):
        print(f"| {LABELS[j]} | {int(yte[:, jj].sum())}/{int((1 - yte[:, jj]).sum())} | "
              + " | ".join(pct(per[c][jj]) for c in cols) + " |")
    print("| **macro AUC** | | " + " | ".join(
        f"**{pct(per[c])}** [{100 * np.percentile(boot[c], 2.5):.1f}, {100 * np.percentile(boot[c], 97.5):.1f}]"
        for c in cols) + " |")
    base = {k: next(((n, kk) for n, kk in cols if kk == k and n.startswith("random")), None) for k in kinds}
    diffs = {}
    for c in cols:
        b = base[c[1]]
        if b is None or c == b:
            continue
        d = boot[c] - boot[b]
        diffs[f"{c[0]} ({c[1]}) - {b[0]}"] = (per[c].mean() - per[b].mean(), np.percentile(d, 2.5), np.percentile(d, 97.5))
    print()
    for k, (m, lo, hi) in diffs.items():
        print(f"{k}: {100 * m:+.1f} AUC points, 95% bootstrap interval [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    for k in kinds:
        cls_m = [per[c].mean() for c in cols if c[1] == k and not c[0].startswith("random")]
        rnd_m = [per[c].mean() for c in cols if c[1] == k and c[0].startswith("random")]
        if cls_m and rnd_m:
            print(f"{k}: CLS arms macro {100 * np.mean(cls_m):.1f} (range {100 * min(cls_m):.1f}-{100 * max(cls_m):.1f}, "
                  f"{len(cls_m)} arms); random arms {100 * np.mean(rnd_m):.1f} "
                  f"(range {100 * min(rnd_m):.1f}-{100 * max(rnd_m):.1f}, {len(rnd_m)} arms)")
    if dropped:
        print(f"left out (fewer than {a.min_pos} positives or negatives in test, or {2 * a.min_pos} in train): "
              + ", ".join(dropped))
    print(f"total {time.time() - t0:.0f} s", file=sys.stderr)
    if a.json:
        json.dump({
            "labels": [LABELS[j] for j in keep], "dropped": dropped,
            "arms": {f"{n} ({k})": {"path": dict(arms)[n], "macro": per[(n, k)].mean(),
                                    "per_label": per[(n, k)].tolist(),
                                    "ci95": [np.percentile(boot[(n, k)], 2.5), np.percentile(boot[(n, k)], 97.5)]}
                     for n, k in cols},
            "differences": {k: {"mean": m, "ci95": [lo, hi]} for k, (m, lo, hi) in diffs.items()},
        }, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
