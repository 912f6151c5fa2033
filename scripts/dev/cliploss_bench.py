#!/usr/bin/env python3
"""OpenCLIP's ClipLoss (local_loss=True, as in open_clip's loss.py) timed in PyTorch at one
rank's shape: `local` images and texts against `global` gathered features of width `dim`,
forward and backward, on the CPU. The baseline the fused InfoNCE of issue 11 is held to.

    python scripts/dev/cliploss_bench.py --local 8192 --global 65536 --dim 512 [--threads 2]

Prints one JSON line: ms (forward + backward, after one untimed warm-up at a small size) and
peak_rss_bytes above the inputs (the process's peak resident set, so the logits, their
softmax and gradients: what the op needs in memory).
"""
import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step(all_img, all_txt, logit_scale, local, offset):
    img = all_img[offset:offset + local]
    txt = all_txt[offset:offset + local]
    # The local loss: this rank's rows against every gathered column, both directions.
    logits_per_image = logit_scale.exp() * img @ all_txt.T
    logits_per_text = logit_scale.exp() * txt @ all_img.T
    labels = torch.arange(local) + offset
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    loss.backward()
    return loss.item()


def features(n, d, gen):
    x = torch.randn(n, d, generator=gen)
    return F.normalize(x, dim=-1).requires_grad_()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--local", type=int, required=True)
    ap.add_argument("--global", dest="global_", type=int, required=True)
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(7)
    logit_scale = torch.tensor(2.65, requires_grad=True)
    step(features(256, a.dim, gen), features(256, a.dim, gen), logit_scale, 64, 0)
    all_img, all_txt = features(a.global_, a.dim, gen), features(a.global_, a.dim, gen)
    before = peak_rss_bytes()
    t = time.perf_counter()
    loss = step(all_img, all_txt, logit_scale, a.local, 0)
    ms = (time.perf_counter() - t) * 1e3
    print(json.dumps({"variant": "pytorch ClipLoss (local loss)", "torch": torch.__version__,
                      "threads": a.threads, "local": a.local, "global": a.global_, "dim": a.dim,
                      "ms": round(ms, 1), "peak_rss_bytes": peak_rss_bytes() - before,
                      "loss": loss}))


if __name__ == "__main__":
    main()
