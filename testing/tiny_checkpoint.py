"""Build a tiny, deterministic, random-weight Nougat checkpoint for tests and demos.

The checkpoint is a directory that goes through exactly the same code paths as
Meta's released ``0.1.0-small`` checkpoint:

* ``nougat.utils.checkpoint.get_checkpoint(dir)`` accepts it without trying to
  download anything (it only downloads when the directory holds fewer than five
  entries, so the five files written here are enough);
* ``nougat.NougatModel.from_pretrained(dir)`` loads it with the unmodified
  nougat/transformers code (``pytorch_model.bin`` is a plain ``torch.save`` of the
  state dict, which transformers' loader reads with ``weights_only=True``).

The weights are random, so the "transcriptions" are gibberish, but the weights
are shaped so that inference behaves like a real model from the pipeline's point
of view: different pages give different, printable texts of varying length that
usually end with ``</s>`` before ``max_length``.  A default random init would not
do that (greedy decoding emits ``<s>`` forever, i.e. every page is empty); see
:func:`_init_weights`, :func:`_center_cross_attention`, :func:`_reserve_dims` and
:func:`_calibrate` for the tricks used.

Tokenizer path resolution (why a copied/moved directory still loads):
    ``BARTDecoder.__init__`` reads ``Path(config.name_or_path) / "tokenizer.json"``.
    ``NougatConfig`` ignores the ``_name_or_path`` key that transformers writes into
    ``config.json`` (its ``__init__`` calls ``super().__init__()`` without kwargs),
    and ``PreTrainedModel.from_pretrained`` sets ``config.name_or_path`` to the
    directory it was called with *before* constructing the model.  So the
    tokenizer is always taken from the directory being loaded, and no absolute path
    is baked into ``config.json`` (we write ``_name_or_path: ""`` anyway).  The
    limit: building a model from the config alone, e.g.
    ``NougatModel(NougatConfig.from_pretrained(dir))``, leaves ``name_or_path``
    empty, and nougat then tries to download the pretrained Swin/mBART weights;
    always load through ``NougatModel.from_pretrained(dir)``.

Determinism: the same ``seed``/``max_length`` give a byte-identical
``pytorch_model.bin`` (and identical JSON files) with the same torch/timm/
transformers versions on the same kind of CPU, in any process and with any torch
thread count (the build runs single-threaded).  ``torch.save`` embeds a
``serialization_id`` hashed from the archive's record names, which include the
file's stem, so the weights are always saved under the final name
``pytorch_model.bin``.  Across machines float results (and that id,
pytorch/pytorch#184219) may differ in the last bits, and the calibration turns
those into different weights; compare behaviour, not hashes, across machines.

Usage::

    python -m testing.tiny_checkpoint OUT_DIR [--seed N] [--max-length N]
        [--variant text|eos|loop] [--overwrite]

Variants (``variant=``): "text" is the model described above.  "eos" and "loop"
reach the branches of nougat's output that "text" never does, page by page and the
same in any batch: pages that end with ``</s>`` at lengths set by their ink, and pages
that loop so that nougat's repetition handling blanks or fails them; see
:func:`_shape_stop`.  tests/test_variants.py compares them with the stock CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:  # heavy imports (torch, nougat) are deferred so --help stays fast
    import torch
    from PIL import Image
    from nougat import NougatModel

__all__ = [
    "CHECKPOINT_FILES",
    "VARIANTS",
    "build_tiny_checkpoint",
    "read_tiny_checkpoint_params",
    "write_ink_pages",
    "main",
]

#: The files nougat's released checkpoint consists of; ``get_checkpoint`` downloads
#: into the directory if it holds fewer than five entries.
CHECKPOINT_FILES: tuple[str, ...] = (
    "config.json",
    "pytorch_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

#: Key under which the build parameters are recorded in config.json.  NougatConfig
#: swallows unknown keys, so it is invisible to nougat.  Bump FORMAT_VERSION whenever
#: the weights produced for a given (seed, max_length) change: directories built by
#: an older version are then rebuilt instead of silently reused.
MARKER_KEY = "nougat_dist_tiny_checkpoint"
FORMAT_VERSION = 2

# --- tokenizer ---------------------------------------------------------------------
# nougat hard-codes these four special tokens (BARTDecoder sets them by name), and
# its real tokenizer uses ids 0..3 for them; MBart's generation defaults
# (bos=0, pad=1, eos=2) rely on the same ids.
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = range(4)
#: Byte b is token BYTE_OFFSET + b: a byte-level BPE without merges, so any text can
#: be encoded and ids map to bytes trivially (which the logit shaping relies on).
BYTE_OFFSET = len(SPECIAL_TOKENS)
VOCAB_SIZE = BYTE_OFFSET + 256

# --- architecture --------------------------------------------------------------------
# input_size is [height, width] (prepare_input thumbnails to (input_size[1],
# input_size[0])).  Swin needs every stage resolution H/4/2^i x W/4/2^i (i = 0..3)
# divisible by window_size: 448x224 -> 112x56, 56x28, 28x14, 14x7, all multiples of 7.
INPUT_SIZE = [448, 224]
WINDOW_SIZE = 7
PATCH_SIZE = 4
EMBED_DIM = 16
ENCODER_LAYER = [1, 1, 1, 1]
NUM_HEADS = [1, 2, 4, 8]
#: Must equal the last Swin stage width, EMBED_DIM * 2**3, because the decoder's
#: cross-attention consumes the encoder output directly.
HIDDEN_DIMENSION = EMBED_DIM * 2 ** (len(ENCODER_LAYER) - 1)
DECODER_LAYER = 1

# --- weight shaping (see _init_weights, _reserve_dims, _calibrate) ---------------------
#: Residual-stream dimensions reserved for the tricks below; all other dims are random.
BIAS_DIM, CLOCK_DIM, ANTI_CLOCK_DIM = 0, 1, 2
RESERVED_DIMS = (BIAS_DIM, CLOCK_DIM, ANTI_CLOCK_DIM)
#: Constant the final layer norm writes into BIAS_DIM, so that a token's embedding
#: entry e in that dim adds e * BIAS_SCALE to its logit, i.e. acts as a per-token
#: logit bias.  Large, so the embedding entries (which the decoder also sees as its
#: *input*) stay small.
BIAS_SCALE = 1000.0
#: Init scales, see _init_weights; chosen by a small search over seeds and sample
#: pages (academic-paper PDFs, plain text pages, shapes) for page-dependent text
#: without long runs of one letter.  The token embeddings are small next to the
#: position embeddings: with tied input/output embeddings a token's own embedding
#: in the residual stream makes it the argmax again, i.e. "aaaaaaa".
TOKEN_EMBEDDING_STD = 0.03
POSITION_EMBEDDING_STD = 1.0
#: Sharp cross-attention (large q/k) but a modest value path: the value path adds a
#: page-constant vector to every position, which on uniform text pages would make
#: one letter win at every step.
CROSS_ATTENTION_QK_GAIN = 3.0
CROSS_ATTENTION_VO_GAIN = 0.7
#: Self-attention averages over the history, which makes runs ("hhhhYYYYaaaa").
SELF_ATTENTION_VO_GAIN = 0.3
#: A dominant MLP mixes page, position and previous token nonlinearly; this is what
#: makes each step's argmax differ (with gain 0.3: runs; 8: median run 3 letters).
DECODER_MLP_OUT_GAIN = 8.0
#: Scale of the final layer norm on the free dims, which sets the spread of the
#: random logits (they would be tiny with the small token embeddings).
LOGIT_GAIN = 3.0
#: Logit bias for tokens that must never be generated (<s>, <pad>, <unk>, control
#: bytes, non-ASCII bytes); random logits are O(few), so this is "never".
FORBIDDEN_BIAS = -100.0
#: Where pages end (see _reserve_dims and _calibrate): </s>'s logit is negative, so
#: it never wins, before MIN_END_FRACTION of max_length on any page, and on average
#: over the synthetic calibration pages it beats the best other token at
#: END_FRACTION of max_length.
CALIBRATION_PAGES = 16
MIN_END_FRACTION = 0.35
END_FRACTION = 0.75

# --- behaviour variants (see _shape_stop) ---------------------------------------------
#: "text" is the model above.  The others reproduce, deterministically and per page,
#: the branches of nougat's output that "text" never reaches:
#:   "eos"  -- every page ends with </s> after a number of tokens that grows with the
#:             page's ink (a nearly blank page stops after a few tokens, a dense one
#:             near max_length);
#:   "loop" -- every page runs to max_length and from a step that grows with the ink
#:             on emits one token forever, so nougat's repetition check marks light
#:             pages [MISSING_PAGE_EMPTY] (loop from the start), medium ones
#:             [MISSING_PAGE_FAIL]; denser ones keep their text, the looped tail cut
#:             by nougat's truncate_repetitions, and the densest never loop.
VARIANTS = ("text", "eos", "loop")
#: Reserved dims of the variants: the page's stop fraction, written by one
#: cross-attention head that averages over the whole page (see _shape_stop).
STOP_DIM, ANTI_STOP_DIM = 3, 4
#: Token the "loop" variant repeats ("x").
LOOP_TOKEN = BYTE_OFFSET + ord("x")
#: Stop fraction of max_length = STOP_AT_NO_INK + STOP_PER_INK * ink coverage (share
#: of dark pixels, ocr/predict.py) as the head estimates it from the encoder features
#: (a ridge regression fitted when the checkpoint is built, so only roughly: Spearman
#: ~0.8 with the true lengths); a dense text page has ~0.06-0.1 ink.
STOP_AT_NO_INK = {"eos": 0.05, "loop": 0.0}
STOP_PER_INK = {"eos": 9.0, "loop": 6.0}
#: Gain of the stop signal in the final layer norm: how fast every other token's logit
#: falls after the stop step (and how much they all gain, equally, before it).
STOP_GAIN = 150.0
#: Random per-step noise on the clock (std, in fractions of max_length).  In "loop" it
#: makes the top logit before the loop vary by several units from step to step, as a
#: real page's does; without it nougat's heuristics find the smooth ramp steady too
#: and blank every looping page instead of failing the ones that loop late.
STOP_JITTER = {"eos": 0.0, "loop": 0.06}
#: The stop signal's entries in the token rows, which are also the decoder's input
#: embeddings: tiny, so the input barely sees them; the final norm scales them back up.
STOP_ROW = 1e-3
#: Pages (of 0-55 lines of box "words", see write_ink_pages) the ink regression is
#: fitted on, and its ridge penalty.
INK_FIT_PAGES = 64
INK_FIT_RIDGE = 1e-3


def _token_logit_biases() -> list[float]:
    """Return the per-token logit bias: printable ASCII, newline and </s> are allowed.

    Lower-case letters and space are favoured and punctuation/newline disfavoured
    so that the gibberish looks vaguely like words rather than line noise.
    """
    biases = [FORBIDDEN_BIAS] * VOCAB_SIZE
    for byte in range(0x20, 0x7F):
        char = chr(byte)
        if char == " ":
            bias = 1.5
        elif char.islower():
            bias = 1.0
        elif char.isalnum():
            bias = 0.0
        else:
            bias = -1.0
        biases[BYTE_OFFSET + byte] = bias
    biases[BYTE_OFFSET + ord("\n")] = -1.5
    biases[EOS_ID] = 0.0  # set by _calibrate
    return biases


def _byte_to_unicode() -> dict[int, str]:
    """Return the reversible byte -> printable-character map of byte-level BPE.

    This is the standard GPT-2 scheme that ``tokenizers``' ByteLevel pre-tokenizer
    and decoder use: printable Latin-1 bytes map to themselves, the other 68 bytes
    to code points 256, 257, ... in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    mapping: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _write_tokenizer(directory: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for byte, char in _byte_to_unicode().items():
        vocab[char] = BYTE_OFFSET + byte
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Registering them as special tokens makes skip_special_tokens=True (used by
    # NougatModel.inference) drop them and keeps them from being split when encoding.
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise AssertionError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(directory))


def _architecture(max_length: int) -> dict[str, Any]:
    """Return the NougatConfig arguments (exactly what goes into config.json)."""
    return {
        "model_type": "nougat",
        "input_size": list(INPUT_SIZE),
        "align_long_axis": False,
        "window_size": WINDOW_SIZE,
        "encoder_layer": list(ENCODER_LAYER),
        "decoder_layer": DECODER_LAYER,
        # Equal on purpose: NougatModel.from_pretrained resizes (interpolates) the
        # position embeddings whenever a max_length kwarg differs from
        # max_position_embeddings, and generation runs to config.max_length.
        "max_position_embeddings": max_length,
        "max_length": max_length,
        "patch_size": PATCH_SIZE,
        "embed_dim": EMBED_DIM,
        "num_heads": list(NUM_HEADS),
        "hidden_dimension": HIDDEN_DIMENSION,
    }


def _params(seed: int, max_length: int, variant: str = "text") -> dict[str, Any]:
    """Return the build parameters recorded in config.json under MARKER_KEY."""
    params: dict[str, Any] = {"format_version": FORMAT_VERSION, "seed": seed,
                              "max_length": max_length}
    if variant != "text":  # "text" builds keep the key set they always had
        params["variant"] = variant
    return params


def _randn(generator: torch.Generator, shape: Sequence[int], std: float) -> torch.Tensor:
    import torch

    return torch.randn(tuple(shape), generator=generator) * std


def _init_weights(model: NougatModel, generator: torch.Generator) -> None:
    """Overwrite every parameter with fresh values drawn from ``generator``.

    We do not rely on the modules' own init: it draws from the global RNG in an order
    that depends on timm/transformers internals, and its scales (std 0.02) make
    the cross-attention contribute almost nothing, so every page decodes the same.
    Instead matrices get std gain/sqrt(fan_in) (O(1) activations), norms are near
    identity and biases small; the per-module gains are explained where they are
    defined.
    """
    import torch

    with torch.no_grad():
        # named_parameters() yields the tied lm_head/embed_tokens weight only once.
        for name, param in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                param.copy_(_randn(generator, param.shape, TOKEN_EMBEDDING_STD))
            elif name.endswith("embed_positions.weight"):
                # Large, so each step sees a clearly different state; otherwise the
                # tied embeddings make greedy decoding repeat its input token.
                param.copy_(_randn(generator, param.shape, POSITION_EMBEDDING_STD))
            elif name.endswith("relative_position_bias_table"):
                param.copy_(_randn(generator, param.shape, 0.5))
            elif param.dim() >= 2:
                gain = 1.0
                if ".encoder_attn.q_proj." in name or ".encoder_attn.k_proj." in name:
                    gain = CROSS_ATTENTION_QK_GAIN
                elif ".encoder_attn." in name:
                    gain = CROSS_ATTENTION_VO_GAIN
                elif ".self_attn.v_proj." in name or ".self_attn.out_proj." in name:
                    gain = SELF_ATTENTION_VO_GAIN
                elif name.endswith("fc2.weight") and name.startswith("decoder."):
                    gain = DECODER_MLP_OUT_GAIN
                fan_in = param[0].numel()
                param.copy_(_randn(generator, param.shape, gain / math.sqrt(fan_in)))
            elif "norm" in name and name.endswith(".weight"):
                param.copy_(1.0 + _randn(generator, param.shape, 0.1))
            else:  # biases, including layer-norm biases
                param.copy_(_randn(generator, param.shape, 0.1))


def _center_cross_attention(model: NougatModel, encoded: torch.Tensor) -> None:
    """Make an average page contribute nothing through the cross-attention values.

    Most of every page is the same (white background, nougat's black padding bars
    around the resized page), so without this the cross-attention output is
    dominated by one constant value vector, every page decodes to similar text and
    the text is runs of the same few letters.  Shifting the value bias by the mean
    value over typical (synthetic) pages leaves only what differs between pages.
    """
    import torch

    with torch.no_grad():
        mean_features = encoded.mean(dim=(0, 1))
        for layer in model.decoder.model.model.decoder.layers:
            v_proj = layer.encoder_attn.v_proj
            v_proj.bias.sub_(v_proj(mean_features))


def _reserve_dims(model: NougatModel) -> list[int]:
    """Wire up the reserved residual dims; return the remaining ("free") dims.

    MBartForCausalLM ties ``lm_head.weight`` to ``embed_tokens.weight`` (the tie is
    re-applied when the checkpoint is loaded, and nougat's MBartConfig cannot be
    changed), and ``lm_head`` has no bias.  So residual dimensions are reserved:

    * BIAS_DIM: the final layer norm outputs the constant BIAS_SCALE there, hence a
      token's embedding entry in that dim is its logit bias divided by BIAS_SCALE.
      This restricts output to printable ASCII + newline + ``</s>``.
    * CLOCK_DIM and ANTI_CLOCK_DIM: a ramp and its negation over the position
      embeddings, carried unchanged to the output (no sublayer writes to them) and
      read only by ``</s>``, as their difference: that cancels the mean the layer
      norms subtract, so ``</s>``'s logit is (page-dependent scale) x (ramp), which
      is negative before MIN_END_FRACTION of the positions on every page and then
      grows.  Its scale is set by :func:`_calibrate`.
    """
    import torch

    decoder = model.decoder.model.model.decoder
    reserved = list(RESERVED_DIMS)
    with torch.no_grad():
        embeddings = decoder.embed_tokens.weight  # == lm_head.weight
        free = [dim for dim in range(embeddings.shape[1]) if dim not in reserved]
        embeddings[:, BIAS_DIM] = torch.tensor(_token_logit_biases()) / BIAS_SCALE
        embeddings[:, [CLOCK_DIM, ANTI_CLOCK_DIM]] = 0.0
        # </s> reads nothing but the clock: where a page ends is set by the ramp
        # versus the (page-dependent) logits of the other tokens.  (Its embedding is
        # never a meaningful decoder input: generate feeds <pad> after it.)
        embeddings[EOS_ID, free] = 0.0
        embeddings[EOS_ID, CLOCK_DIM] = 1.0
        embeddings[EOS_ID, ANTI_CLOCK_DIM] = -1.0

        # The ramp spans the whole table (rows 0-1 are MBart's unused offset), so it
        # is relative to max_length and survives from_pretrained's interpolation
        # when the checkpoint is loaded with another max_length.
        positions = decoder.embed_positions.weight
        ramp = torch.linspace(0.0, 1.0, positions.shape[0]) - MIN_END_FRACTION
        ramp = ramp * (2.0 / (1.0 - MIN_END_FRACTION))  # ends at +2, like a 2-sigma value
        positions[:, BIAS_DIM] = 0.0
        positions[:, CLOCK_DIM] = ramp
        positions[:, ANTI_CLOCK_DIM] = -ramp

        # Nothing may write into the reserved dims after the embedding layer norm.
        for layer in decoder.layers:
            for linear in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
                linear.weight[reserved] = 0.0
                linear.bias[reserved] = 0.0
        embedding_norm = decoder.layernorm_embedding
        embedding_norm.weight[BIAS_DIM] = 0.0
        embedding_norm.weight[[CLOCK_DIM, ANTI_CLOCK_DIM]] = 1.0
        embedding_norm.bias[reserved] = 0.0

        final = decoder.layer_norm
        final.weight[free] *= LOGIT_GAIN
        final.weight[BIAS_DIM] = 0.0
        final.bias[BIAS_DIM] = BIAS_SCALE
        final.weight[[CLOCK_DIM, ANTI_CLOCK_DIM]] = 1.0  # provisional, see _calibrate
        final.bias[[CLOCK_DIM, ANTI_CLOCK_DIM]] = 0.0
    return free


def _synthetic_pages(model: NougatModel, generator: torch.Generator, count: int) -> torch.Tensor:
    """Return encoder inputs for ``count`` synthetic pages that resemble real ones.

    Letter/A4-sized white pages with lines of "words" (small black boxes) and
    sometimes a frame (figure/table), drawn with PIL and passed through nougat's own
    ``prepare_input`` (margin crop, resize, black padding).  The calibration depends
    on how strongly the ink drives the cross-attention, so the amount and layout of
    ink should be realistic.
    """
    import torch
    from PIL import Image, ImageDraw

    def uniform(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    tensors = []
    for _ in range(count):
        width, height = (612, 792) if uniform(0, 1) else (595, 842)
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        left, right = uniform(50, 90), width - uniform(50, 90)
        y = uniform(50, 90)
        # Mostly full pages, sometimes nearly empty ones (titles, end of chapters).
        lines = uniform(25, 50) if uniform(0, 3) else uniform(0, 10)
        for _ in range(lines):
            if y > height - 60:
                break
            if uniform(0, 15) == 0:  # a figure or table frame
                box_height = uniform(60, 250)
                box = [uniform(left, left + 60), y, uniform(right - 60, right), y + box_height]
                draw.rectangle(box, outline="black", width=uniform(1, 3))
                y += box_height + 15
                continue
            x = left
            line_end = right - (uniform(0, right - left) if uniform(0, 6) == 0 else 0)
            while x < line_end:  # "letters" of 10-point text, grouped into words
                for _ in range(uniform(1, 9)):
                    draw.rectangle([x, y + uniform(0, 3), x + uniform(2, 4), y + 7], fill="black")
                    x += uniform(5, 7)
                x += uniform(4, 8)
            y += uniform(11, 14)
        tensors.append(model.encoder.prepare_input(image, random_padding=False))
    return torch.stack(tensors)


def _decoder_outputs(
    model: NougatModel, encoded: torch.Tensor, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced decoder pass; return (final hidden states, logits)."""
    output = model.decoder.model(
        input_ids=input_ids, encoder_hidden_states=encoded, output_hidden_states=True
    )
    return output.hidden_states[-1], output.logits


def _greedy_without_eos(model: NougatModel, encoded: torch.Tensor, length: int) -> torch.Tensor:
    """Greedy-decode ``length`` tokens (starting with <s>) while </s> is banned."""
    import torch

    input_ids = torch.full((encoded.shape[0], 1), BOS_ID, dtype=torch.long)
    past = None
    while input_ids.shape[1] < length:
        output = model.decoder.model(
            input_ids=input_ids[:, -1:],
            encoder_hidden_states=encoded,
            past_key_values=past,
            use_cache=True,
        )
        past = output.past_key_values
        next_logits = output.logits[:, -1]
        next_logits[:, EOS_ID] = -math.inf
        input_ids = torch.cat([input_ids, next_logits.argmax(dim=-1, keepdim=True)], dim=1)
    return input_ids


def _calibrate(
    model: NougatModel,
    free: list[int],
    encoded: torch.Tensor,
    generator: torch.Generator,
    max_length: int,
    eos_clock: bool = True,
) -> None:
    """Tune the output layer on synthetic pages so that every seed behaves alike.

    1. Remove the component of the token embeddings along the mean final hidden
       state.  That component acts as a constant per-token logit bias; left in, one
       to three letters win almost every step and pages read "nnnnnmnnnn".
    2. Set the clock gain so that ``</s>`` ties with the best other token, on
       average over the synthetic pages, at END_FRACTION of max_length.  Without
       this, where pages end depends on the seed: for some seeds every page runs
       to max_length, for others pages end after a few tokens.  Skipped with
       ``eos_clock=False`` (the variants set where pages end by other means).
    """
    import torch

    decoder = model.decoder.model.model.decoder
    embeddings = decoder.embed_tokens.weight
    printable = torch.arange(BYTE_OFFSET + 0x20, BYTE_OFFSET + 0x7F)
    with torch.no_grad():
        # Random printable text as decoder input: the token embeddings are small
        # next to the position embeddings and the image, so any text will do.
        choice = torch.randint(len(printable), (encoded.shape[0], max_length), generator=generator)
        input_ids = printable[choice]
        input_ids[:, 0] = BOS_ID

        hidden, _ = _decoder_outputs(model, encoded, input_ids)
        mean = hidden[..., free].mean(dim=(0, 1))
        direction = mean / mean.norm()
        rows = embeddings[:, free]
        rows = rows - (rows @ direction)[:, None] * direction[None, :]
        # Equal row norms, for the same reason: tokens with longer rows win more.
        target = TOKEN_EMBEDDING_STD * math.sqrt(len(free))
        rows = rows * (target / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
        rows[EOS_ID] = 0.0
        embeddings[:, free] = rows
        if not eos_clock:
            return

        # Calibrate on what greedy decoding actually feeds back (its own argmaxes,
        # which the random text above underestimates), with </s> disabled.
        input_ids = _greedy_without_eos(model, encoded, max_length)
        hidden, logits = _decoder_outputs(model, encoded, input_ids)
        logits[..., EOS_ID] = -math.inf
        end = round(END_FRACTION * (max_length - 1))
        best = float(logits[:, end].max(dim=-1).values.mean())
        clock = float((hidden[:, end, CLOCK_DIM] - hidden[:, end, ANTI_CLOCK_DIM]).mean())
        if best <= 0 or clock <= 0:  # cannot happen: letters have positive biases and
            # END_FRACTION > MIN_END_FRACTION; fail loudly rather than save a broken model
            raise AssertionError(f"cannot calibrate </s> (best logit {best}, clock {clock})")
        decoder.layer_norm.weight[[CLOCK_DIM, ANTI_CLOCK_DIM]] = best / clock


def _shape_stop(
    model: NougatModel, generator: torch.Generator, variant: str, max_length: int
) -> None:
    """Make every page stop (``</s>``) or loop (LOOP_TOKEN) at a step set by its ink.

    The stop step has to be a property of the page, read by the decoder, and the same
    for every batch the page may land in.  So:

    * one cross-attention head gets zero queries, i.e. attends uniformly to the whole
      page, and its value path is a ridge regression, fitted on synthetic pages, from
      the mean encoder features to the page's ink coverage; its output writes the
      page's stop fraction f = STOP_AT_NO_INK + STOP_PER_INK * ink into STOP_DIM (and
      -f into ANTI_STOP_DIM) and nowhere else;
    * the clock dims carry the plain fraction of max_length, t (and -t);
    * every token but the stop token reads (f - t) with the same weight, so before
      the stop step they all gain the same amount (greedy decoding picks the same
      token as without it) and after it they all fall, step by step, below the stop
      token, whose logit is exactly 0 (an all-zero row).

    In "eos" the stop token is ``</s>``.  In "loop" it is LOOP_TOKEN and ``</s>`` is
    never generated: the page repeats one token with a constant top logit, which is
    what nougat's repetition heuristics look for.
    """
    import torch

    from nougat_dist.ocr.predict import ink_coverage  # the ink the render worker measures

    decoder = model.decoder.model.model.decoder
    layer = decoder.layers[-1]
    attention = layer.encoder_attn
    head_dim = attention.head_dim
    head = slice(attention.embed_dim - head_dim, attention.embed_dim)  # the last head
    column = head.start
    pair = [STOP_DIM, ANTI_STOP_DIM]
    clock = [CLOCK_DIM, ANTI_CLOCK_DIM]
    with torch.no_grad():
        rng = random.Random(int(torch.randint(2**31, (1,), generator=generator)))
        # Every line count from blank to full, half of the pages with real glyphs.
        images = [
            _box_text_page(round(55 * i / (INK_FIT_PAGES - 1)), rng, glyphs=i % 2 == 1)
            for i in range(INK_FIT_PAGES)
        ]
        inks = [ink_coverage(image) for image in images]
        pages = torch.stack(
            [model.encoder.prepare_input(image, random_padding=False) for image in images]
        )
        features = model.encoder(pages).mean(dim=1).double()  # (pages, hidden)
        ink = torch.tensor(inks, dtype=torch.float64)
        mean_x, mean_y = features.mean(dim=0), ink.mean()
        x = features - mean_x
        gram = x.T @ x + INK_FIT_RIDGE * len(inks) * torch.eye(x.shape[1], dtype=torch.float64)
        weights = torch.linalg.solve(gram, x.T @ (ink - mean_y))
        intercept = mean_y - mean_x @ weights

        attention.q_proj.weight[head] = 0.0
        attention.q_proj.bias[head] = 0.0
        attention.v_proj.weight[head] = 0.0
        attention.v_proj.bias[head] = 0.0
        attention.v_proj.weight[column] = weights.float()
        attention.v_proj.bias[column] = float(intercept)
        attention.out_proj.weight[:, head] = 0.0
        attention.out_proj.weight[pair] = 0.0
        per_ink, at_no_ink = STOP_PER_INK[variant], STOP_AT_NO_INK[variant]
        attention.out_proj.weight[STOP_DIM, column] = per_ink
        attention.out_proj.weight[ANTI_STOP_DIM, column] = -per_ink
        attention.out_proj.bias[STOP_DIM] = at_no_ink
        attention.out_proj.bias[ANTI_STOP_DIM] = -at_no_ink

        # Nothing else writes into or reads the stop dims before the final norm.
        embeddings = decoder.embed_tokens.weight  # == lm_head.weight
        positions = decoder.embed_positions.weight
        embeddings[:, pair] = 0.0
        positions[:, pair] = 0.0
        decoder.layernorm_embedding.weight[pair] = 0.0
        decoder.layernorm_embedding.bias[pair] = 0.0
        for linear in (layer.self_attn.out_proj, layer.fc2):
            linear.weight[pair] = 0.0
            linear.bias[pair] = 0.0
        # The clock as a plain fraction of max_length (rows 0-1 are MBart's offset).
        fraction = (torch.arange(positions.shape[0], dtype=torch.float32) - 2) / max_length
        fraction += _randn(generator, fraction.shape, STOP_JITTER[variant])
        positions[:, CLOCK_DIM] = fraction
        positions[:, ANTI_CLOCK_DIM] = -fraction

        final = decoder.layer_norm
        final.weight[clock + pair] = STOP_GAIN / STOP_ROW
        final.bias[clock + pair] = 0.0
        # logit += gain/sigma * 2 (f - t) for every token but the stop token.
        embeddings[:, CLOCK_DIM] = -STOP_ROW
        embeddings[:, ANTI_CLOCK_DIM] = STOP_ROW
        embeddings[:, STOP_DIM] = STOP_ROW
        embeddings[:, ANTI_STOP_DIM] = -STOP_ROW
        stop = EOS_ID if variant == "eos" else LOOP_TOKEN
        embeddings[stop] = 0.0
        if variant == "loop":
            embeddings[EOS_ID] = 0.0
            embeddings[EOS_ID, BIAS_DIM] = FORBIDDEN_BIAS / BIAS_SCALE


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch on one thread, restoring the previous setting afterwards.

    Multi-threaded matmuls may sum in a thread-count-dependent order, and the
    calibration writes such sums into the weights; one thread keeps the file
    identical on machines with different core counts (the build takes ~1 s anyway).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write_checkpoint(directory: Path, seed: int, max_length: int, variant: str) -> None:
    """Write the five checkpoint files into the (empty) ``directory``."""
    import torch
    from nougat import NougatConfig, NougatModel

    # BARTDecoder reads <name_or_path>/tokenizer.json while the model is constructed,
    # and a non-empty name_or_path also stops SwinEncoder/BARTDecoder from
    # downloading pretrained timm/mBART weights.
    _write_tokenizer(directory)
    architecture = _architecture(max_length)
    config = NougatConfig(**architecture, name_or_path=str(directory))
    # Module construction consumes the global RNG; isolate it so building a checkpoint
    # does not perturb the caller's random state (all values are overwritten below).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NougatModel(config)
    if len(model.decoder.tokenizer) != VOCAB_SIZE:
        raise AssertionError("decoder did not pick up the tiny tokenizer")
    model.eval()  # prepare_input must use the test transform, not the augmenting one

    generator = torch.Generator().manual_seed(seed)
    with _single_threaded(), torch.no_grad():
        _init_weights(model, generator)
        encoded = model.encoder(_synthetic_pages(model, generator, CALIBRATION_PAGES))
        _center_cross_attention(model, encoded)
        free = _reserve_dims(model)
        _calibrate(model, free, encoded, generator, max_length, eos_clock=variant == "text")
        if variant != "text":
            _shape_stop(model, generator, variant, max_length)

    # Save under the final file name: torch.save's serialization_id hashes the
    # archive's record names, which derive from the file stem.
    state_dict = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    torch.save(state_dict, directory / "pytorch_model.bin")

    config_json = dict(architecture)
    # transformers writes the load path here; NougatConfig ignores it on load and
    # from_pretrained overrides it, so keep it empty rather than leak a temp path.
    config_json["_name_or_path"] = ""
    config_json[MARKER_KEY] = _params(seed, max_length, variant)
    text = json.dumps(config_json, indent=2, sort_keys=True) + "\n"
    (directory / "config.json").write_text(text, encoding="utf-8")


def _box_text_page(lines: int, rng: random.Random, glyphs: bool = False) -> Image.Image:
    """A US-letter page (612 x 792 px) with ``lines`` lines of black box "words", or
    with ``glyphs`` of random lower-case words in PIL's built-in font."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (612, 792), "white")
    draw = ImageDraw.Draw(image)
    y = 60
    for _ in range(lines):
        if y > 792 - 60:
            break
        x = 60
        if glyphs:
            words = ("".join(chr(rng.randint(97, 122)) for _ in range(rng.randint(1, 9)))
                     for _ in range(14))
            draw.text((x, y), " ".join(words), fill="black")
        while not glyphs and x < 540:
            for _ in range(rng.randint(1, 9)):
                draw.rectangle([x, y + rng.randint(0, 3), x + rng.randint(2, 4), y + 7], fill="black")
                x += rng.randint(5, 7)
            x += rng.randint(4, 8)
        y += 13
    return image


def write_ink_pages(
    out_dir: str | os.PathLike[str], lines: Sequence[int], *, seed: int = 0
) -> list[Path]:
    """Write one scan-like PDF page per entry of ``lines``; return the paths in order.

    Page i holds ``lines[i]`` lines of black box "words" (no text layer, like a scan),
    so its ink coverage, and with it where the "eos" and "loop" variants stop, grows
    with the count.  One page per file: the stock CLI writes one .mmd per PDF, which
    makes its output comparable page by page.  The files are byte-identical for the
    same arguments (fixed document dates).
    """
    import time

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.gmtime(1_704_067_200)  # 2024-01-01
    paths = []
    for index, count in enumerate(lines):
        image = _box_text_page(count, random.Random(seed * 1_000_003 + index))
        path = out / f"ink_{index:03d}_{count:02d}lines.pdf"
        # resolution 72: one pixel per PDF point, i.e. a US-letter page
        image.save(path, "PDF", resolution=72.0, creationDate=stamp, modDate=stamp)
        paths.append(path)
    return paths


def read_tiny_checkpoint_params(directory: str | os.PathLike[str]) -> dict[str, int] | None:
    """Return the build parameters recorded in ``directory``/config.json, if any.

    Returns None when config.json is missing, unreadable, or was not written by
    :func:`build_tiny_checkpoint`.
    """
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    params = config.get(MARKER_KEY) if isinstance(config, dict) else None
    return params if isinstance(params, dict) else None


def _is_complete(directory: Path, params: dict[str, int]) -> bool:
    """True if ``directory`` holds all five files of a build with ``params``."""
    if read_tiny_checkpoint_params(directory) != params:
        return False
    return all(
        (directory / name).is_file() and (directory / name).stat().st_size > 0
        for name in CHECKPOINT_FILES
    )


def build_tiny_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    max_length: int = 96,
    variant: str = "text",
    overwrite: bool = False,
) -> Path:
    """Write a tiny random-weight Nougat checkpoint into ``out_dir`` and return it.

    Writes config.json, pytorch_model.bin, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json (about 6.3 MB in total); load it with
    ``nougat.NougatModel.from_pretrained(out_dir)`` from wherever the directory is
    copied to.  The same ``seed`` and ``max_length`` give byte-identical files (same
    torch version and platform).

    ``max_length`` is both ``config.max_length`` (generation length) and
    ``config.max_position_embeddings``.  Pages end with ``</s>`` after at least
    35 % of it, typically after 65-80 %, and a few run to ``max_length``.  Up to
    ~260 tokens that keeps nougat's repetition
    heuristics quiet (``NougatModel.inference`` cannot flag pages shorter than 135
    tokens, and its ``StoppingCriteriaScores`` only looks after 200 tokens).  Longer
    lengths give a deliberately degenerate model: the tiny model's max logits are
    so steady that ``StoppingCriteriaScores`` stops every page at ~200 tokens and
    ``inference`` marks it as a repetition from the start (``repeats`` = 0, blank
    prediction), which predict.py writes as ``[MISSING_PAGE_EMPTY:n]`` (unless
    ``--no-skipping``).  Measured on 8 synthetic pages: every page, seeds 0-3, at
    400; no page at 96 or 180.  The build greedy-decodes ``max_length`` tokens for
    calibration, so it takes longer for long lengths (~1 s at 96, ~4 s at 400).

    ``variant`` picks how pages end (see VARIANTS and :func:`_shape_stop`): "text"
    (the default, described above), "eos" (``</s>`` after a number of tokens that
    grows with the page's ink coverage; keep max_length < 135 for pages that are
    never flagged by the repetition check) or "loop" (the page repeats one token from
    an ink-dependent step on: blank or light pages come out as
    ``[MISSING_PAGE_EMPTY]``, medium ones as ``[MISSING_PAGE_FAIL]``, dense ones keep
    their text, at max_length 256).  The stop step is a property of the page, not of
    its batch, but nougat's repetition check is batch-level (README, Fidelity).

    Idempotent: if ``out_dir`` already holds a complete checkpoint built with the
    same parameters (recorded in config.json under ``MARKER_KEY``), it is returned
    untouched; a tiny checkpoint with the same seed and max_length from an older
    version of this module (``FORMAT_VERSION``) or with a missing file is rebuilt.
    If it holds a config.json from anything else (another seed or
    max_length, a real Nougat checkpoint), ``FileExistsError`` is raised unless
    ``overwrite`` is set, in which case the five files are replaced (other files in
    the directory are left alone).  Files are built in a temporary subdirectory and
    moved into place with config.json last, so an interrupted build is never taken
    for a complete one, and concurrent builds of the same parameters are harmless.

    Raises:
        ValueError: ``seed``, ``max_length`` or ``variant`` out of range.
        FileExistsError: ``out_dir`` holds a different checkpoint and not ``overwrite``.
        NotADirectoryError: ``out_dir`` exists and is not a directory.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")

    out = Path(out_dir)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    params = _params(seed, max_length, variant)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if not overwrite:
        if _is_complete(out, params):
            return out
        existing = read_tiny_checkpoint_params(out)
        # A tiny checkpoint with the same seed and max_length but a missing file or
        # an older format is ours to repair; anything else with a config.json is
        # somebody else's checkpoint.
        ours = existing is not None and all(
            existing.get(key) == params.get(key) for key in ("seed", "max_length", "variant")
        )
        if (out / "config.json").exists() and not ours:
            raise FileExistsError(
                f"{out} already holds a checkpoint ({existing or 'not a tiny checkpoint'}); "
                f"wanted {params}. Pass overwrite=True (--overwrite) to replace it."
            )

    out.mkdir(parents=True, exist_ok=True)
    # The temporary directory lives inside out_dir so os.replace stays on one
    # filesystem (atomic per file); it is removed even if the build fails.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-checkpoint-", dir=out))
    try:
        _write_checkpoint(staging, seed, max_length, variant)
        written = sorted(path.name for path in staging.iterdir())
        if written != sorted(CHECKPOINT_FILES):
            raise AssertionError(f"unexpected checkpoint files: {written}")
        for name in CHECKPOINT_FILES[1:] + CHECKPOINT_FILES[:1]:  # config.json last
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m testing.tiny_checkpoint",
        description=(
            "Write a tiny Nougat checkpoint with RANDOM weights (about 6 MB: a "
            f"{INPUT_SIZE[0]}x{INPUT_SIZE[1]} Swin encoder with embed_dim {EMBED_DIM} and a "
            f"{DECODER_LAYER}-layer {HIDDEN_DIMENSION}-wide mBART decoder over a byte-level "
            "tokenizer). It loads through nougat's real code path "
            "(NougatModel.from_pretrained / predict.py --checkpoint) and produces "
            "page-dependent printable gibberish, which makes it a fast stand-in for the "
            "real model in tests and CPU demos. It is NOT an OCR model. The output is "
            "deterministic for a given seed and max length, and an existing identical "
            "build is reused."
        ),
    )
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", type=Path, help="directory to write the five files into"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the random weights (default: %(default)s)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=96,
        help=(
            "maximum number of generated tokens per page, also the number of position "
            "embeddings (default: %(default)s). Pages typically end after 65-80%% of "
            "it. Above ~260 the model is deliberately degenerate: nougat's repetition "
            "detection blanks every page ([MISSING_PAGE_EMPTY] in predict.py), e.g. "
            "use 400 to exercise that path"
        ),
    )
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="text",
        help=(
            "how pages end (default: %(default)s). text: printable gibberish that usually "
            "ends with </s> after 65-80%% of max length. eos: </s> after a number of tokens "
            "that grows with the page's ink (blank page: a few; dense page: near the max "
            "length). loop: from a step that grows with the ink the page repeats one token "
            "until max length, so nougat's repetition check blanks light pages "
            "([MISSING_PAGE_EMPTY]) and fails medium ones ([MISSING_PAGE_FAIL]) when the "
            "max length is ~170 or more (256 reaches all three outcomes)"
        ),
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the checkpoint files if OUT_DIR already holds a different checkpoint",
    )
    args = parser.parse_args(argv)
    try:
        out = build_tiny_checkpoint(
            args.out_dir,
            seed=args.seed,
            max_length=args.max_length,
            variant=args.variant,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, NotADirectoryError) as error:
        parser.exit(2, f"error: {error}\n")
    print(
        f"tiny Nougat checkpoint with RANDOM weights (seed={args.seed}, "
        f"max_length={args.max_length}, variant={args.variant}; not an OCR model) is in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
