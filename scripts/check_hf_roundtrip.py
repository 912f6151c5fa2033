#!/usr/bin/env python3
"""Check our forward/backward against transformers.CLIPModel on a checkpoint folder (developer script).

  python scripts/check_hf_roundtrip.py --checkpoint DIR --inputs IN.safetensors --ours OUT.safetensors \\
      [--rtol 1e-4] [--atol 1e-6] [--atol-scale 0] [--f32]

DIR is a Hugging Face CLIP folder (config.json + model.safetensors), for example one our trainer
wrote. IN holds `pixel_values` [B,3,H,W] and `input_ids` [B,77]. OUT is what
`coordinator forward-backward` writes: `loss` (0-d), `logits_per_image` [B,B], `image_embeds`,
`text_embeds`, `grad.<hf name>` for every parameter (a gradient may be stored sparsely as
`grad_rows.<name>` i64 [k] + `grad.<name>` [k,...]: the rows left out must be zero in the reference);
`logits_per_text` is compared when present.

The reference runs in float64 (the f32 weights and inputs cast up) unless --f32. An element fails
when |ours - ref| > atol' + rtol * |ref|, with atol' = max(atol, atol_scale * max|ref| of that tensor).
The defaults are strict for an f32 implementation: torch's own f32 run fails them on the fixture
`fullvocab` (token-embedding gradient, |err| 1e-5 on a tensor of magnitude 9, by cancellation);
`--atol-scale 1e-5` makes the absolute part follow each tensor's magnitude. Prints one line per tensor and exits 1 on any mismatch or
missing tensor, 0 otherwise.
"""

import argparse
import sys

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import CLIPModel


def reference(checkpoint, pixel_values, input_ids, dtype):
    model = CLIPModel.from_pretrained(checkpoint, attn_implementation="eager", dtype=dtype).eval()
    model.to(dtype)
    px = torch.from_numpy(pixel_values).to(dtype)
    ids = torch.from_numpy(input_ids).to(torch.int64)
    out = model(pixel_values=px, input_ids=ids, return_loss=True)
    out.loss.backward()
    ref = {
        "loss": out.loss.detach().reshape(()),
        "logits_per_image": out.logits_per_image.detach(),
        "logits_per_text": out.logits_per_text.detach(),
        "image_embeds": out.image_embeds.detach(),
        "text_embeds": out.text_embeds.detach(),
    }
    for name, p in model.named_parameters():
        ref[f"grad.{name}"] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
    return {k: v.double().numpy() for k, v in ref.items()}


def compare(name, ours, ref, rtol, atol, atol_scale):
    """-> (ok, max_abs, max_rel, worst ratio of error to tolerance, note)"""
    if ours.shape != ref.shape:
        return False, float("nan"), float("nan"), float("inf"), f"shape {list(ours.shape)} != {list(ref.shape)}"
    ours = ours.astype(np.float64)
    if not np.all(np.isfinite(ours)):
        return False, float("nan"), float("nan"), float("inf"), "non-finite values"
    err = np.abs(ours - ref)
    if ref.size:
        atol = max(atol, atol_scale * float(np.abs(ref).max()))
    tol = atol + rtol * np.abs(ref)
    ratio = float(np.max(err / tol)) if err.size else 0.0
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return ratio <= 1.0, max_abs, max_rel, ratio, ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--ours", required=True)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--atol-scale", type=float, default=0.0, help="absolute tolerance relative to each tensor's max |ref|")
    ap.add_argument("--f32", action="store_true", help="run the reference in float32 instead of float64")
    args = ap.parse_args()

    inputs = load_file(args.inputs)
    for k in ("pixel_values", "input_ids"):
        if k not in inputs:
            sys.exit(f"{args.inputs}: no tensor {k!r}")
    ours = load_file(args.ours)
    ref = reference(args.checkpoint, inputs["pixel_values"], inputs["input_ids"], torch.float32 if args.f32 else torch.float64)

    required = ["loss", "logits_per_image", "image_embeds", "text_embeds"] + [k for k in ref if k.startswith("grad.")]
    optional = ["logits_per_text"]
    rows, failures = [], 0
    for key in required + [k for k in optional if k in ours]:
        if key not in ours:
            rows.append((key, "-", "MISSING", "", "", ""))
            failures += 1
            continue
        r, o, note = ref[key], ours[key], ""
        rows_key = "grad_rows." + key[len("grad.") :]
        if key.startswith("grad.") and rows_key in ours:
            idx = ours[rows_key].astype(np.int64)
            rest = np.ones(r.shape[0], dtype=bool)
            rest[idx] = False
            leak = float(np.abs(r[rest]).max()) if rest.any() else 0.0
            if leak > args.atol:
                rows.append((key, str(list(r.shape)), "FAIL", "", "", f"rows missing from grad_rows carry |g| up to {leak:.3g}"))
                failures += 1
                continue
            r, note = r[idx], f"sparse, {len(idx)} rows"
        ok, max_abs, max_rel, ratio, why = compare(key, o, r, args.rtol, args.atol, args.atol_scale)
        failures += not ok
        rows.append((key, str(list(r.shape)), "ok" if ok else "FAIL", f"{max_abs:.3e}", f"{max_rel:.3e}", why or note or f"{ratio:.3f} of tol"))
    unknown = sorted(k for k in ours if k not in ref and not k.startswith("grad_rows.") and k not in inputs)
    unknown = [k for k in unknown if k.startswith("grad.")]
    for k in unknown:
        rows.append((k, str(list(ours[k].shape)), "FAIL", "", "", "no such parameter in the checkpoint"))
        failures += 1

    w = max(len(r[0]) for r in rows)
    print(f"{'tensor':<{w}}  {'shape':<18} {'status':<7} {'max_abs':>10} {'max_rel':>10}  note")
    for name, shape, status, a, rel, note in rows:
        print(f"{name:<{w}}  {shape:<18} {status:<7} {a:>10} {rel:>10}  {note}")
    mode = "float32" if args.f32 else "float64"
    print(f"{len(rows)} tensors, {failures} mismatched (reference in {mode}, rtol {args.rtol:g}, atol {args.atol:g}, "
          f"atol-scale {args.atol_scale:g})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
