#!/usr/bin/env python3
"""Build the CLIP byte-level BPE tokenizer as a `tokenizers` JSON file, and the parity fixture.

Developer script (CI never runs Python). It reads the MIT-licensed CLIP merge list
`bpe_simple_vocab_16e6.txt.gz` shipped inside the installed `open_clip` package, builds vocabulary
and merges the way CLIP's `SimpleTokenizer` does, and writes

  model/assets/tokenizer.json.gz            the tokenizer, gzip-compressed (embedded by model/src/tokenizer.rs)
  model/tests/fixtures/tokenizer_cases.json texts and the 77 ids `open_clip.tokenize` gives them

Usage (from the repository root):  python scripts/make_tokenizer.py [--check]
`--check` also re-encodes every case with the new tokenizer.json through the Python `tokenizers`
library and reports any difference with open_clip.
"""

import argparse
import gzip
import json
import os
import sys

import open_clip
from open_clip import tokenizer as oc_tok
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(ROOT, "model", "assets", "tokenizer.json.gz")
CASES = os.path.join(ROOT, "model", "tests", "fixtures", "tokenizer_cases.json")

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
CONTEXT_LEN = 77
# CLIP's pre-tokenisation pattern (the special-token alternatives are handled as added tokens).
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode():
    """CLIP/GPT-2 table mapping each byte to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def vocab_and_merges(bpe_path):
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [SOT_TOKEN, EOT_TOKEN]
    assert len(vocab) == 49408, len(vocab)
    assert len(set(vocab)) == len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


LIGATURES = [
    ("\u0132", "IJ"), ("\u0133", "ij"), ("\u0149", "\u02bcn"), ("\u01f1", "DZ"), ("\u01f2", "Dz"),
    ("\u01f3", "dz"), ("\u01c4", "D\u017d"), ("\u01c5", "D\u017e"), ("\u01c6", "d\u017e"), ("\u01c7", "LJ"),
    ("\u01c8", "Lj"), ("\u01c9", "lj"), ("\u01ca", "NJ"), ("\u01cb", "Nj"), ("\u01cc", "nj"),
    ("\ufb00", "ff"), ("\ufb01", "fi"), ("\ufb02", "fl"), ("\ufb03", "ffi"), ("\ufb04", "ffl"),
    ("\ufb05", "\u017ft"), ("\ufb06", "st"),
]


def ftfy_like_normalizers():
    """The parts of open_clip's `ftfy.fix_text` + double `html.unescape` that a fixed list of
    single-pass normalisers can reproduce (see the module doc of model/src/tokenizer.rs)."""
    n = normalizers
    steps = [
        # ftfy.remove_terminal_escapes
        n.Replace(Regex(r"\x1b\[((?:\d|;)*)([a-zA-Z])"), ""),
        # ftfy.remove_control_chars (same code points as ftfy.chardata.CONTROL_CHARS)
        n.Replace(
            Regex(
                "[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufff9-\ufffc\ufeff]"
            ),
            "",
        ),
        # ftfy.uncurl_quotes
        n.Replace(Regex("[\u02bc\u2018-\u201b]"), "'"),
        n.Replace(Regex("[\u201c-\u201f]"), '"'),
    ]
    # ftfy.fix_latin_ligatures (ftfy.chardata.LIGATURES); ftfy.fix_character_width is left out: its
    # ~230 single-character replacements would double the normalisation time for forms (fullwidth
    # Latin) that English reports do not contain.
    steps += [n.Replace(k, v) for k, v in LIGATURES]
    # html.unescape applied twice: "&amp;" first (so "&amp;lt;" becomes "<"), then the common entities.
    steps += [n.Replace("&amp;", "&"), n.Replace("&amp;", "&")]
    for ent, rep in [
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&quot;", '"'),
        ("&#34;", '"'),
        ("&apos;", "'"),
        ("&#39;", "'"),
        ("&#x27;", "'"),
        ("&nbsp;", " "),
    ]:
        steps.append(n.Replace(ent, rep))
    return steps


def build_tokenizer(bpe_path):
    vocab, merges = vocab_and_merges(bpe_path)
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOT_TOKEN,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC()]
        + ftfy_like_normalizers()
        + [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # The decoded text keeps a trailing space after the last word (the Rust side trims it).
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    # The two special tokens are plain vocabulary entries, not "added tokens": like open_clip 3.x
    # (whose specials are spelled <start_of_text>/<end_of_text>), a literal "<|endoftext|>" in a
    # report is tokenised as text and cannot inject a control token.
    assert tok.token_to_id(SOT_TOKEN) == 49406 and tok.token_to_id(EOT_TOKEN) == 49407
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
        pair=f"{SOT_TOKEN} $A {EOT_TOKEN} $B:1 {EOT_TOKEN}:1",
        special_tokens=[(SOT_TOKEN, 49406), (EOT_TOKEN, 49407)],
    )
    return tok


LONG_REPORT = (
    "FINDINGS: PA and lateral views of the chest provided. There is no focal consolidation, effusion, "
    "or pneumothorax. The cardiomediastinal silhouette is normal. Imaged osseous structures are intact. "
    "No free air below the right hemidiaphragm is seen. Median sternotomy wires and mediastinal clips "
    "are again noted. IMPRESSION: No acute intrathoracic process; compared to the prior study of ___, "
    "the left basilar atelectasis has resolved."
)

TEXTS = [
    "",
    "   ",
    "a",
    "No acute cardiopulmonary process.",
    "FINDINGS: PA and lateral views of the chest provided.",
    "IMPRESSION: No acute intrathoracic process.",
    "There is no focal consolidation, effusion, or pneumothorax.",
    "Mild pulmonary edema. Moderate cardiomegaly is stable.",
    "The cardiomediastinal silhouette is within normal limits.",
    "Compared to the prior study of ___, there is no significant change.",
    "Dr. ___ was paged at 10:45 a.m. on ___ to discuss these findings.",
    "ET tube terminates 4.5 cm above the carina; NG tube tip in the stomach.",
    "Right PICC line ends in the mid SVC.",
    "Left lower lobe opacity (likely atelectasis vs. pneumonia).",
    "small bilateral pleural effusions, L>R, with bibasilar atelectasis",
    "Heart size is top-normal. No pneumothorax!!!",
    "Patient's lungs are clear; it's stable, they're improved, we've seen it, I'm sure, we'll see, he'd agree.",
    "THE PATIENT'S HEART IS ENLARGED.",
    "MiXeD CaSe TeXt WiTh CAPS",
    "Numbers: 0 1 12 123 1234 3.14159 -2.5 1e-6 100%",
    "Dates 2019-03-14 and times 23:59:59",
    "____ ___ _ __ ___.",
    "multiple    spaces\tand\ttabs\nand\nnewlines\r\n here",
    "  leading and trailing whitespace   ",
    "Punctuation: ... ,,, ;;; !!! ??? --- ((())) [] {} <> @#$^&*~`|\\/",
    "Quotes \"double\" and 'single' quotes",
    "Curly \u201cdouble\u201d and \u2018single\u2019 \u2014 it\u2019s curly",
    "Unicode: caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe",
    "Decomposed: cafe\u0301 (combining accent)",
    "Greek and symbols: \u03b1-1 antitrypsin, 5 \u03bcm, 37\u00b0C, \u00b1 2 mm, \u2265 3",
    "Emoji \U0001F600 and CJK \u80ba\u708e",
    "\u00c9PANCHEMENT PLEURAL \u00c0 DROITE",
    "Non\u00a0breaking\u2009thin\u3000ideographic spaces",
    "HTML entities: &amp; &lt;tag&gt; &quot;q&quot; &#39;a&#39; AT&amp;T",
    "Double escaped &amp;amp; and &amp;lt;",
    "dashes \u2013 en and \u2014 em, ellipsis\u2026",
    "tokens like <|startoftext|> should stay text? no: <|endoftext|>",
    "\ufb01ndings: \ufb02uid in the \ufb01ssure (PDF ligatures)",
    "Greek capitals \u039f\u0394\u039f\u03a3 \u03a3\u039f\u03a6\u039f\u03a3 and \u0130stanbul",
    "zero\u200bwidth and \x1ccontrol\x1f chars\x07 \x1b[1mbold\x1b[0m",
    "mojibake caf\u00c3\u00a9",
    "fullwidth \uff23\uff34 \uff53\uff43\uff41\uff4e",
    "<start_of_text> spelled out",
    "Lines/tubes: Swan-Ganz catheter, s/p CABG, c/w prior, r/o PNA.",
    "pneumothorax pneumothoraces pneumomediastinum hydropneumothorax",
    LONG_REPORT,
    LONG_REPORT + " " + LONG_REPORT,
]


# Cases where open_clip (ftfy.fix_text + html.unescape) and our normaliser disagree, on purpose.
KNOWN_DIFFERENCES = {
    "mojibake caf\u00c3\u00a9": "ftfy repairs mojibake (UTF-8 read as Latin-1); a fixed normaliser cannot",
    "fullwidth \uff23\uff34 \uff53\uff43\uff41\uff4e": "ftfy.fix_character_width maps fullwidth forms to ASCII; left out",
    "<start_of_text> spelled out": "open_clip 3.x treats its special-token spelling in text as the special token",
    "Greek capitals \u039f\u0394\u039f\u03a3 \u03a3\u039f\u03a6\u039f\u03a3 and \u0130stanbul":
        "Python's str.lower gives a word-final capital sigma the final form; the Lowercase normaliser does not",
}


def open_clip_ids(text):
    return [int(x) for x in open_clip.tokenize([text], context_length=CONTEXT_LEN)[0].tolist()]


def our_ids(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    ids = [49406] + ids + [49407]
    if len(ids) > CONTEXT_LEN:
        ids = ids[:CONTEXT_LEN]
        ids[-1] = 49407
    return ids + [0] * (CONTEXT_LEN - len(ids))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare the new tokenizer with open_clip")
    args = ap.parse_args()

    bpe_path = oc_tok.default_bpe()
    tok = build_tokenizer(bpe_path)
    data = tok.to_str(pretty=False).encode("utf-8")
    os.makedirs(os.path.dirname(ASSET), exist_ok=True)
    # mtime=0: the same input gives byte-identical output.
    with open(ASSET, "wb") as f:
        with gzip.GzipFile(filename="tokenizer.json", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            gz.write(data)
    print(f"wrote {ASSET}: {len(data)} bytes of json, {os.path.getsize(ASSET)} compressed")

    cases = []
    n_diff = 0
    for text in TEXTS:
        ids = open_clip_ids(text)
        assert len(ids) == CONTEXT_LEN
        case = {"text": text, "ids": ids}
        ours = our_ids(tok, text)
        if text in KNOWN_DIFFERENCES:
            case["ours"] = ours
            case["known_difference"] = KNOWN_DIFFERENCES[text]
            if ours == ids:
                print(f"listed as a known difference but equal: {text!r}", file=sys.stderr)
                n_diff += 1
        elif ours != ids:
            n_diff += 1
            print(f"DIFF: {text!r}\n  open_clip {ids}\n  ours      {ours}", file=sys.stderr)
        cases.append(case)
    out = {
        "about": "ids from open_clip.tokenize (context 77, zero padding); written by scripts/make_tokenizer.py",
        "open_clip_version": open_clip.__version__,
        "context_length": CONTEXT_LEN,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(CASES), exist_ok=True)
    with open(CASES, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, indent=1)
        f.write("\n")
    print(f"wrote {CASES}: {len(cases)} cases, {len(KNOWN_DIFFERENCES)} known differences, {n_diff} unexpected")
    if args.check:
        for text in TEXTS[:8]:
            enc = tok.encode(text)
            print(repr(text), "->", repr(tok.decode(enc.ids)))
    return 1 if n_diff else 0


if __name__ == "__main__":
    sys.exit(main())
