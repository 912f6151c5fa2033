#!/usr/bin/env python3
"""PyTorch CPU baseline for one CLIP training step (developer script; CI never runs Python).

  python scripts/bench_torch_train_step.py --image 64 --patch 8 --width 256 --layers 4 --heads 4 \\
      --batch 64 --steps 20 [--threads 2] [--attn sdpa|eager] [--clip-grad 0] [--json]

Both towers get the same width / layers / heads (MLP 4x width, quick_gelu); the text tower has a
77-token context, the 49,408-token vocabulary and every text is a full 77 tokens; projection_dim =
width. One step = forward + CLIP loss + backward + AdamW step (weight decay 0.2 on matrices, 0 on
the rest, as in scripts/make_fixtures.py) + logit-scale clamp; `--clip-grad N` adds gradient-norm
clipping. Eager mode (no torch.compile), f32. Three warm-up steps, then `--steps` timed ones.
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import transformers
from transformers import CLIPConfig, CLIPModel

VOCAB, CONTEXT, SOT, EOT = 49408, 77, 49406, 49407


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="transformers attention implementation")
    ap.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tower = dict(
        hidden_size=args.width, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.width, hidden_act="quick_gelu", projection_dim=args.width,
    )
    config = CLIPConfig(
        vision_config=dict(tower, image_size=args.image, patch_size=args.patch, num_channels=3),
        text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=CONTEXT, bos_token_id=SOT, eos_token_id=EOT, pad_token_id=0),
        projection_dim=args.width,
    )
    model = CLIPModel(config).float().train()
    model.config._attn_implementation = args.attn
    for sub in (model.vision_model.config, model.text_model.config):
        sub._attn_implementation = args.attn

    pixel_values = torch.randn(args.batch, 3, args.image, args.image)
    input_ids = torch.randint(1, SOT, (args.batch, CONTEXT))
    input_ids[:, 0], input_ids[:, -1] = SOT, EOT

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim >= 2 and ("embeddings." not in name or name.endswith("patch_embedding.weight"))
        (decay if is_matrix else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
    )

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(pixel_values=pixel_values, input_ids=input_ids, return_loss=True).loss
        loss.backward()
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(times)
    result = {
        "images_per_s": round(args.batch / (med / 1e3), 3),
        "step_ms": round(med, 3),
        "step_ms_min": round(min(times), 3),
        "threads": args.threads,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "attn": args.attn,
        "params": sum(p.numel() for p in model.parameters()),
        "config": {k: getattr(args, k) for k in ("image", "patch", "width", "layers", "heads", "batch", "steps", "clip_grad")},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['step_ms']:.1f} ms/step (min {result['step_ms_min']:.1f}), {result['images_per_s']:.1f} images/s, "
              f"{args.threads} threads, torch {torch.__version__}, attention {args.attn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
