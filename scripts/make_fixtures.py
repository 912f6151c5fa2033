#!/usr/bin/env python3
"""Reference-parity fixtures from `transformers.CLIPModel` (developer script; CI never runs Python).

For each fixture it builds a small random CLIPModel with a fixed seed and writes into
model/tests/fixtures/<name>/:

  config.json, model.safetensors   as `CLIPModel.save_pretrained` writes them (f32, HF names/layouts)
  reference.safetensors            inputs, outputs, loss, gradients, 10 AdamW steps (see FORMAT below)

The reference numbers are computed in float64 from the f32 weights and f32 inputs that are stored
(the model is cast to double after saving), then rounded to f32: they are the exact answer for the
stored f32 data, not torch's own f32 rounding. Run from the repository root:

  python scripts/make_fixtures.py [--only NAME ...]

FORMAT of reference.safetensors (f32 unless noted):
  pixel_values [B,3,H,W]        random normal ("already normalised")
  input_ids i64 [B,77]          start id, tokens, end id, zeros
  logits_per_image [B,B], logits_per_text [B,B]
  image_embeds [B,P], text_embeds [B,P]     projected and L2-normalised (CLIPModel's outputs)
  loss []                       CLIP loss (mean of the image->text and text->image cross-entropies)
  grad.<hf name>                d loss / d parameter, in the parameter's shape, for every parameter;
                                for the token embedding of the 49,408-token fixture only the rows of
                                ids present: grad_rows.<name> i64 [k] (sorted) and grad.<name> [k,D]
  adamw_losses [10]             loss before each of 10 AdamW updates on the same batch (entry 0 = loss)
  adamw_logit_scale [10]        logit_scale after each update (and after the clamp)
  adamw_hparams [6]             lr, beta1, beta2, eps, weight_decay, max_grad_norm
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import safetensors
import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "model", "tests", "fixtures")
CONTEXT = 77
ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.2, max_grad_norm=1.0)
ADAMW_STEPS = 10
LOGIT_SCALE_MAX = math.log(100.0)
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"

REPORT_SENTENCES = [
    "No acute cardiopulmonary process.",
    "Moderate right pleural effusion with adjacent atelectasis.",
    "Endotracheal tube terminates 4 cm above the carina; no pneumothorax.",
]


def vision(image, patch, hidden, layers, heads, inter, act, eps=1e-5):
    return dict(
        image_size=image, patch_size=patch, num_channels=3, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=inter, hidden_act=act, layer_norm_eps=eps,
    )


def text(vocab, bos, eos, hidden, layers, heads, inter, act, pad=0, eps=1e-5):
    return dict(
        vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter, hidden_act=act,
        max_position_embeddings=CONTEXT, layer_norm_eps=eps,
    )


# name -> (seed, vision config, text config, projection_dim, batch, logit_scale_init or None, ids kind)
FIXTURES = {
    "tiny_quickgelu": (
        1001,
        vision(32, 8, 64, 2, 4, 128, "quick_gelu"),
        text(1000, 998, 999, 48, 2, 4, 96, "quick_gelu"),
        32, 4, None, "random",
    ),
    "small_gelu": (
        1002,
        vision(48, 16, 96, 3, 6, 160, "gelu", eps=1e-6),
        text(1200, 1198, 1199, 64, 3, 2, 128, "gelu"),
        48, 5, math.log(1 / 0.07) + 0.3, "random",
    ),
    "fullvocab": (
        1003,
        vision(32, 16, 32, 1, 2, 64, "quick_gelu"),
        text(49408, 49406, 49407, 16, 1, 2, 64, "quick_gelu"),
        16, 3, None, "open_clip",
    ),
    "legacy_eos2": (
        1004,
        vision(32, 8, 64, 2, 4, 128, "quick_gelu"),
        text(500, 498, 2, 32, 2, 2, 96, "quick_gelu", pad=1),
        32, 3, None, "legacy",
    ),
}


def make_input_ids(kind, tc, batch, gen):
    """i64 [B,77]: rows of different lengths, one of full length 77."""
    vocab, bos, eos = tc["vocab_size"], tc["bos_token_id"], tc["eos_token_id"]
    if kind == "open_clip":
        import open_clip

        ids = open_clip.tokenize(REPORT_SENTENCES[:batch], context_length=CONTEXT).to(torch.int64)
        assert int(ids[0, 0]) == bos and (ids == eos).any(dim=1).all()
        return ids
    # "legacy" mimics the OpenAI checkpoints, whose config says eos_token_id = 2 while the text ends
    # with the highest id: transformers then pools at argmax(input_ids). Row 0 also contains id 2
    # mid-text, so "first occurrence of eos_token_id" pools elsewhere than argmax.
    end = vocab - 1 if kind == "legacy" else eos
    lengths = [CONTEXT] + [int(x) for x in torch.randint(3, CONTEXT - 10, (batch - 1,), generator=gen)]
    ids = torch.zeros(batch, CONTEXT, dtype=torch.int64)
    lo, hi = (3, bos) if kind == "legacy" else (1, bos)  # tokens never equal start or end id
    for r, n in enumerate(lengths):
        ids[r, 0] = bos
        ids[r, 1 : n - 1] = torch.randint(lo, hi, (n - 2,), generator=gen)
        ids[r, n - 1] = end
    if kind == "legacy":
        ids[0, 5] = 2
        assert int(ids[0].argmax()) == CONTEXT - 1 and int((ids[0] == 2).int().argmax()) == 5
    assert len(set(lengths)) == len(lengths), "rows must differ in length"
    return ids


def is_norm(name):
    return any(k in name for k in ("layer_norm", "layernorm", "layrnorm"))  # HF spells pre_layrnorm


def decay_groups(model):
    """weight_decay 0.2: the 2-D weights of linear layers and the patch-embedding conv weight;
    0: biases, layer norms, token/position/class embeddings, logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_linear = p.ndim == 2 and ("_proj.weight" in name or ".fc1." in name or ".fc2." in name or "projection" in name)
        if is_linear or name.endswith("patch_embedding.weight"):
            decay.append(name)
        else:
            no_decay.append(name)
    for name in no_decay:
        assert (
            name.endswith(".bias") or is_norm(name) or "embedding" in name
            or name == "logit_scale"
        ), name
    return decay, no_decay


def forward_loss(model, pixel_values, input_ids):
    return model(pixel_values=pixel_values, input_ids=input_ids, return_loss=True)


def build(name, out_root):
    seed, vc, tc, proj, batch, scale_init, kind = FIXTURES[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tc = dict(tc, projection_dim=proj)
    vc = dict(vc, projection_dim=proj)
    cfg_kwargs = dict(text_config=tc, vision_config=vc, projection_dim=proj)
    if scale_init is not None:
        cfg_kwargs["logit_scale_init_value"] = scale_init
    config = CLIPConfig(**cfg_kwargs)
    model = CLIPModel(config).float().eval()
    # The default init has zero biases and unit layer norms: randomise them so their gradients and
    # their place in the formulas are tested too.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname == "logit_scale":
                continue
            if is_norm(pname):
                p.copy_((1.0 if pname.endswith(".weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif pname.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))

    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model.save_pretrained(d)

    pixel_values = torch.randn(batch, 3, vc["image_size"], vc["image_size"], generator=gen, dtype=torch.float32)
    input_ids = make_input_ids(kind, tc, batch, gen)

    # float64 from here on; `model` keeps the saved f32 values exactly.
    m = CLIPModel.from_pretrained(d, attn_implementation="eager", dtype=torch.float64).eval()
    m.double()
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), m.named_parameters()):
        assert n1 == n2 and torch.equal(p1.double(), p2), n1
    px = pixel_values.double()
    out = forward_loss(m, px, input_ids)
    out.loss.backward()

    ref = {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "logits_per_image": out.logits_per_image,
        "logits_per_text": out.logits_per_text,
        "image_embeds": out.image_embeds,
        "text_embeds": out.text_embeds,
        "loss": out.loss.reshape(()),
    }
    for pname, p in m.named_parameters():
        g = p.grad
        assert g is not None, pname
        if pname == TOKEN_EMBEDDING and tc["vocab_size"] == 49408:
            rows = torch.unique(input_ids)  # sorted
            mask = torch.ones(g.shape[0], dtype=torch.bool)
            mask[rows] = False
            assert torch.count_nonzero(g[mask]) == 0, "token-embedding gradient outside the ids present"
            ref[f"grad_rows.{pname}"] = rows.to(torch.int64)
            ref[f"grad.{pname}"] = g[rows]
        else:
            ref[f"grad.{pname}"] = g

    # 10 AdamW steps on the same batch.
    decay, no_decay = decay_groups(m)
    params = dict(m.named_parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [params[n] for n in decay], "weight_decay": ADAMW["weight_decay"]},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
        ],
        lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
    )
    losses, scales = [], []
    for _ in range(ADAMW_STEPS):
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(m, px, input_ids).loss
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(m.parameters(), ADAMW["max_grad_norm"])
        opt.step()
        with torch.no_grad():
            m.logit_scale.clamp_(max=LOGIT_SCALE_MAX)
        scales.append(m.logit_scale.item())
    assert abs(losses[0] - float(out.loss)) < 1e-12
    ref["adamw_losses"] = torch.tensor(losses, dtype=torch.float64)
    ref["adamw_logit_scale"] = torch.tensor(scales, dtype=torch.float64)
    ref["adamw_hparams"] = torch.tensor(
        [ADAMW[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm")], dtype=torch.float64
    )

    ref = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in ref.items()}
    meta = {
        "generator": "scripts/make_fixtures.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compute_dtype": "float64",
        "seed": str(seed),
        "adamw_decay_params": json.dumps(decay),
    }
    # One metadata key: safetensors writes its metadata map in hash order, which would make the
    # file differ from run to run.
    save_file(ref, os.path.join(d, "reference.safetensors"), metadata={"info": json.dumps(meta, sort_keys=True)})
    sizes = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
    print(
        f"{name}: loss {float(out.loss):.6f}, adamw {losses[0]:.4f} -> {losses[-1]:.4f}, "
        + ", ".join(f"{f} {s / 1e6:.2f} MB" for f, s in sizes.items())
    )
    return sizes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="fixture names (default: all)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for name in args.only or FIXTURES:
        build(name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
