"""One Nougat model per rank: batched inference and nougat's own page postprocessing."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from nougat_dist import hooks
from nougat_dist.errors import SetupError

log = logging.getLogger(__name__)


class PageModel(Protocol):
    """The part of NougatModel a rank uses (an injected model implements the same contract)."""

    def inference(self, image_tensors: torch.Tensor, early_stopping: bool = True) -> dict[str, Any]: ...


#: The hook (hooks.py) that puts another model in Nougat's place: the tests' fake model.
MODEL_ENV = "NOUGAT_DIST_MODEL"


@dataclass(frozen=True)
class ModelSource:
    """The model a rank runs: the name its rows record, the input its render workers prepare
    (known before it loads), and how to load it."""

    model_id: str
    dtype: str
    input_size: list[int]
    align_long_axis: bool
    load: Callable[[int, torch.device], PageModel]  # (rank, device) -> model
    #: Whether the rank divides CPU cores between this model and its render workers (CpuThreads);
    #: a model that computes nothing on the CPU leaves the thread count alone.
    cpu_threads: bool = True


def injected_model() -> ModelSource | None:
    """The model $NOUGAT_DIST_MODEL puts in Nougat's place, or None. It needs no checkpoint."""
    source = hooks.from_env(MODEL_ENV)
    if source is not None and not isinstance(source, ModelSource):
        raise SetupError(f"${MODEL_ENV} made a {type(source).__name__}, not a ModelSource")
    return source


def dtype_name(full_precision: bool) -> str:
    """The dtype a Nougat model runs in, as page rows record it."""
    return "float32" if full_precision else "bfloat16"


def model_source(checkpoint: str, full_precision: bool) -> ModelSource:
    """The injected model if there is one, else Nougat from `checkpoint` as the nougat CLI loads it."""
    injected = injected_model()
    if injected is not None:
        return injected
    path = Path(checkpoint)
    input_size, align = encoder_input_spec(path)
    return ModelSource(checkpoint_name(path), dtype_name(full_precision), input_size, align,
                       load=lambda rank, device: load_model(path, device, full_precision))


class CheckpointError(RuntimeError):
    """The checkpoint cannot be found or loaded; the message says what to do."""


def resolve_checkpoint(checkpoint: str | None, model_tag: str) -> Path:
    """The checkpoint directory to load, downloading it with nougat's own code when absent.

    As the nougat CLI: an existing directory is used as is; otherwise nougat's `get_checkpoint`
    downloads `model_tag` (needs internet) into the given dir, $NOUGAT_CHECKPOINT or torch hub.
    """
    from nougat.utils.checkpoint import get_checkpoint

    required = ("config.json", "pytorch_model.bin", "tokenizer.json")
    if checkpoint is not None and Path(checkpoint).is_dir() and all(
            (Path(checkpoint) / f).exists() for f in required):
        return Path(checkpoint)
    try:
        path = Path(get_checkpoint(checkpoint, model_tag=model_tag))
    except OSError as e:  # requests' and urllib's errors are OSErrors: offline, refused, 404
        raise CheckpointError(
            f"checkpoint not found at {checkpoint or '(default location)'} and downloading nougat "
            f"model {model_tag!r} failed ({type(e).__name__}: {e}). Pass --checkpoint DIR with a "
            "downloaded checkpoint (config.json, pytorch_model.bin, tokenizer.json, ...), or run "
            "once where github.com is reachable so nougat can download it."
        ) from e
    missing = [f for f in required if not (path / f).exists()]
    if missing:
        raise CheckpointError(
            f"checkpoint directory {path} is incomplete (missing {', '.join(missing)}): delete it "
            "and let nougat download it again, or pass --checkpoint with a complete one"
        )
    return path


def checkpoint_name(path: Path) -> str:
    """Name + content hash of a checkpoint, recorded on every page row."""
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "pytorch_model.bin"):
        with open(path / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return f"{path.name}@{h.hexdigest()[:12]}"


def load_model(path: Path, device: torch.device, full_precision: bool) -> torch.nn.Module:
    """Load NougatModel through its real from_pretrained path, cast as the nougat CLI does."""
    from nougat import NougatModel

    model = NougatModel.from_pretrained(path)
    # The CLI casts to bfloat16 unless --full-precision, on CPU too; the cast changes the text.
    if not full_precision:
        model = model.to(torch.bfloat16)
    return model.to(device).eval()


def encoder_input_spec(path: Path) -> tuple[list[int], bool]:
    """input_size and align_long_axis from the checkpoint's config, for the render workers."""
    from nougat import NougatConfig

    cfg = NougatConfig.from_pretrained(path)
    return list(cfg.input_size), bool(cfg.align_long_axis)


@dataclass
class PageResult:
    text: str
    status: str
    n_tokens: int | None
    #: Decode steps of the model batch the page was in (its longest output, in tokens, counted
    #: as n_tokens is): Σ n_tokens / Σ batch_steps over pages is the decode-step efficiency.
    batch_steps: int | None = None


def page_results(output: dict[str, Any], pages: list[int], *, markdown: bool, skipping: bool,
                 pad_token_id: int | None) -> list[PageResult]:
    """Turn one `model.inference` output into per-page text exactly as nougat's predict.py does.

    The one deliberate difference: MISSING_PAGE_EMPTY carries the real page number (the CLI uses
    the global batch index there, a known bug).
    """
    from nougat.postprocessing import markdown_compatible

    results = []
    sequences = output.get("sequences")
    counted = isinstance(sequences, torch.Tensor) and pad_token_id is not None
    # Every page of the batch occupied a decode slot for every step the batch ran.
    steps = int(sequences.shape[1]) if counted else None
    for j, raw in enumerate(output["predictions"]):
        page = pages[j]
        n_tokens = int((sequences[j] != pad_token_id).sum()) if counted else None
        repeats = output["repeats"][j]
        if raw.strip() == "[MISSING_PAGE_POST]":
            text, status = f"\n\n[MISSING_PAGE_EMPTY:{page}]\n\n", "empty"
        elif skipping and repeats is not None:
            if repeats > 0:
                text, status = f"\n\n[MISSING_PAGE_FAIL:{page}]\n\n", "fail"
            else:
                text, status = f"\n\n[MISSING_PAGE_EMPTY:{page}]\n\n", "empty"
        else:
            text, status = (markdown_compatible(raw) if markdown else raw), "ok"
        results.append(PageResult(text, status, n_tokens, steps))
    return results


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


#: Rendering that needs at most this share of one core to keep pace with the model is ignored
#: when the model's CPU threads are chosen.
RENDER_SHARE_IGNORED = 0.25


def model_threads(cores: int, render_ms_per_page: float, model_ms_per_page: float) -> int:
    """Intra-op threads for a CPU model whose render workers share the same cores.

    Rendering needs render/model cores to keep pace with the model. A real Nougat model on CPU
    spends seconds per page against tens of milliseconds of rendering, so it gets every core; a
    model as fast as rendering (the tiny test checkpoint) leaves whole cores to the workers, since
    OpenMP threads that compete with a busy process for a core slow the model down several times.
    """
    demand = render_ms_per_page / model_ms_per_page if model_ms_per_page > 0 else 0.0
    if demand <= RENDER_SHARE_IGNORED:
        return cores
    return max(1, cores - math.ceil(demand))


class CpuThreads:
    """Sets the model's CPU threads: every core at first, then after each of the first batches
    `model_threads` from the measured costs. Only ever lowers the count (fewer threads make the
    model slower per page, which would otherwise argue for more again)."""

    SETTLE_BATCHES = 3

    def __init__(self, cores: int) -> None:
        self.cores = self.threads = cores
        self.batches = 0
        torch.set_num_threads(cores)

    def observe(self, render_ms_per_page: float, model_ms_per_page: float) -> None:
        if self.batches >= self.SETTLE_BATCHES:
            return
        self.batches += 1
        want = model_threads(self.cores, render_ms_per_page, model_ms_per_page)
        if want < self.threads:
            log.info("CPU threads for the model: %d of %d cores (rendering takes %.0f ms per page "
                     "against the model's %.0f ms, so it keeps the rest)", want, self.cores,
                     render_ms_per_page, model_ms_per_page)
            self.threads = want
            torch.set_num_threads(want)
