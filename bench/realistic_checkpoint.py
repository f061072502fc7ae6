"""A random-weight checkpoint with the real `0.1.0-small` architecture, for CPU benchmarks.

Same Swin encoder (input [896, 672], window 7, layers [2, 2, 14, 2], embed_dim 128, heads
[4, 8, 16, 32]) and mBART decoder (4 layers, width 1024) as the released model, and a tokenizer
padded to the released vocabulary size (50,000) so the lm_head costs what it costs there. Only
max_length is short: the point is the real encoder cost per page next to the pipeline's per-page
costs, not hours of decoding. With the default random init greedy decoding never emits </s>, so
every page decodes exactly max_length tokens: a fixed, page-independent cost per batch.

It loads through `NougatModel.from_pretrained` like `testing.tiny_checkpoint` (five files,
tokenizer written before the model is built). Not an OCR model.

    python bench/realistic_checkpoint.py DIR [--max-length 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

#: The released 0.1.0-small architecture (from its config.json), minus max_length.
SMALL_ARCH: dict[str, Any] = {
    "model_type": "nougat",
    "input_size": [896, 672],
    "align_long_axis": False,
    "window_size": 7,
    "encoder_layer": [2, 2, 14, 2],
    "decoder_layer": 4,
    "patch_size": 4,
    "embed_dim": 128,
    "num_heads": [4, 8, 16, 32],
    "hidden_dimension": 1024,
}
VOCAB_SIZE = 50_000  # the released tokenizer's size
MARKER_KEY = "nougat_dist_bench_realistic"
FORMAT_VERSION = 1
FILES = ("config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json")


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    """Byte-level BPE without merges (as the tiny checkpoint), padded with unreachable tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Private helper, imported (not copied) so both checkpoints map bytes to tokens identically.
    from testing.tiny_checkpoint import SPECIAL_TOKENS, _byte_to_unicode

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte, char in _byte_to_unicode().items():
        vocab[char] = len(SPECIAL_TOKENS) + byte
    # Never produced by encoding (no merges lead to them); they only make the embedding and
    # lm_head as large as the real model's.
    for i in range(len(vocab), vocab_size):
        vocab[f"<pad_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>",
                            eos_token="</s>", unk_token="<unk>").save_pretrained(str(directory))


def build_realistic_checkpoint(out_dir: str | os.PathLike[str], *, max_length: int = 32,
                               seed: int = 0) -> Path:
    """Write (or reuse) the checkpoint in out_dir and return its path."""
    import torch
    from nougat import NougatConfig, NougatModel

    out = Path(out_dir)
    params = {"format_version": FORMAT_VERSION, "max_length": max_length, "seed": seed}
    try:
        old = json.loads((out / "config.json").read_text()).get(MARKER_KEY)
    except (OSError, ValueError):
        old = None
    if old == params and all((out / f).is_file() for f in FILES):
        return out
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".realistic-", dir=out))
    try:
        # BARTDecoder reads <name_or_path>/tokenizer.json while the model is constructed, and a
        # non-empty name_or_path keeps nougat from downloading pretrained Swin/mBART weights.
        _write_tokenizer(staging, VOCAB_SIZE)
        arch = dict(SMALL_ARCH, max_length=max_length, max_position_embeddings=max_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = NougatModel(NougatConfig(**arch, name_or_path=str(staging)))
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()},
                   staging / "pytorch_model.bin")
        cfg = dict(arch, _name_or_path="")
        cfg[MARKER_KEY] = params
        (staging / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for name in FILES[1:] + FILES[:1]:  # config.json last: a partial build is never reused
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--max-length", type=int, default=32)
    args = ap.parse_args(argv)
    print(build_realistic_checkpoint(args.out_dir, max_length=args.max_length))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
