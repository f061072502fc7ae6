"""Job configuration: one dataclass, mapped onto argparse flags (and YAML keys of the same name)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from nougat_dist.errors import UsageError
from nougat_dist.flags import help_of, option

DEFAULT_MODEL_TAG = "0.1.0-small"


class ConfigError(UsageError):
    """A configuration the job cannot run with; the message says what to change."""


@dataclass(kw_only=True)
class Config:
    """Everything a run needs; each field is a flag, declared with its `--help` text."""

    input: list[str] = option(default_factory=list, help=(
        "PDF files, directories (searched recursively for *.pdf), glob patterns, or list files "
        "(.txt/.lst: one path per line), archives, URLs, hf:// globs, and s3:// / gs:// objects, "
        "globs or prefixes ending in / (pip install 'nougat-dist[s3]' / '[gcs]'). Give as many as "
        "you like."))
    output: str = option("",
        "Output directory, or an s3:// / gs:// prefix (staged on each node's disk in "
        "$NOUGAT_DIST_STAGING and pushed to the bucket as chunks commit). Holds manifest.parquet "
        "(the resume checkpoint), pages/ (one Parquet row per page, committed in chunks), "
        "documents/ (Parquet shards), stats.json and logs/. Run the same command again to resume.")
    checkpoint: str | None = option(None,
        "Nougat checkpoint directory. If it does not exist, nougat's own downloader fetches "
        "--model into it (needs internet). Default: $NOUGAT_CHECKPOINT or torch hub's "
        "nougat-<model> dir.")
    model: str = option(DEFAULT_MODEL_TAG,
        "Nougat model tag to download when no checkpoint is present (as the nougat CLI's "
        "--model).")
    batch_size: int = option(0,
        "Pages per model.inference call on each rank. 0 = automatic: nougat's rule on GPU (0.3 "
        "per GB of memory), 4 on CPU.")
    num_workers: int = option(2,
        "DataLoader worker processes per rank that render pages ahead of the model (0 = render in "
        "the main process).")
    prefetch_factor: int = option(2, "Batches each DataLoader worker prepares ahead.")
    render_timeout: float = option(120.0,
        "Seconds one page may take to render (open, rasterize, prepare_input). A page that takes "
        "longer is stopped inside its render worker, and a page that crashes the renderer kills "
        "only that worker (hostile PDFs can do both): either way that page becomes a render_error "
        "row, the rank's other pages are rendered again by fresh workers, and the job goes on. "
        "Needs --num-workers >= 1.")
    collective_timeout: float = option(0.0,
        "Seconds a rank waits for the other ranks in one collective (a status round, the plan "
        "broadcast, a barrier) before the job fails. 0 = automatic: 1800. Rendering does not "
        "count against it: while pages render the rank keeps trading status rounds (it checks its "
        "render workers every second), and a page over --render-timeout is stopped in its worker; "
        "so it has to cover the longest model batch, model load and manifest build. With "
        "--num-workers 0 pages render inside the rank between two rounds, and automatic adds "
        "--render-timeout x the batch size (64 when automatic).")
    full_precision: bool = option(False,
        "Run the model in float32 instead of bfloat16 (same meaning as the nougat CLI).")
    markdown: bool = option(True,
        "Apply nougat's markdown_compatible postprocessing (default on; --no-markdown as the "
        "CLI).")
    skipping: bool = option(True,
        "Apply nougat's failure-detection heuristic (default on; --no-skipping as the CLI).")
    device: str = option("auto",
        "auto (cuda:LOCAL_RANK when a GPU is visible, else CPU), cuda, or cpu. auto never falls "
        "back to the CPU when the job was given GPUs (CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE, "
        "/dev/nvidia*) that torch cannot use: that exits with code 2 and the reason.")
    control_backend: str = option("auto",
        "Backend of the process group that carries the plan, status rounds, stealing and "
        "barriers: auto = NCCL on GPUs (small CUDA tensors, asynchronous), gloo on CPU. gloo runs "
        "them on the CPU even on GPUs: an escape hatch for a node whose NCCL does not work (set "
        "GLOO_SOCKET_IFNAME on multi-homed nodes).")
    unit_pages: int = option(16,
        "Largest work unit, in pages. Long documents are split into units of at most this many "
        "pages so that one book can be spread over several ranks.")
    steal: bool = option(True,
        "Let idle ranks take queued units from the most loaded rank (--no-steal: static split).")
    commit_pages: int = option(256,
        "Commit a Parquet chunk once this many pages of complete units are buffered.")
    commit_seconds: float = option(60.0,
        "Also commit at least this often (seconds), so a crash loses little work.")
    rebuild_manifest: bool = option(False,
        "Hash and count the pages of every input again instead of trusting unchanged size and "
        "mtime (for file systems whose mtimes cannot be trusted). Committed pages of documents "
        "whose content is unchanged are kept.")
    discard_committed: bool = option(False,
        "Start over: move every committed page of out/pages/ to out/superseded/discarded-<time>/ "
        "and build the manifest from this run's inputs alone.")
    retry_failed: bool = option(False,
        "Do again the pages and documents whose rows have status error, render_error or fail "
        "(after setting a password, fixing a PDF, a download coming back). Their old rows move to "
        "out/superseded/. Unreadable documents are inspected again first.")
    redo_other_model: bool = option(False,
        "Resume an output whose committed pages came from another checkpoint or dtype by doing "
        "those pages again with this one (their rows move to out/superseded/). Without it such a "
        "resume is refused, so no document mixes two models.")
    plan_pages_per_s: float = option(1.0,
        "Pages per second per rank assumed by --plan's wall-time estimate (measure yours: "
        "stats.json's per-rank pages_per_s of an earlier run).")
    # default = inputs.members.DEFAULT_MAX_MEMBER_BYTES
    max_member_bytes: int = option(512 * 2**20,
        "Largest archive member read, by the uncompressed size its header declares (checked "
        "before reading). A larger member becomes an error row. The default (512 MiB) keeps the "
        "copies a rank and its render workers hold inside a 24 GiB node running 8 ranks.")
    max_page_pixels: int = option(40_000_000,
        "Largest page raster rendered at nougat's 96 dpi, in pixels (checked from the page size "
        "before rendering). A larger page becomes a render_error row instead of taking gigabytes; "
        "the default (40 million) admits a 2xA0 poster.")
    # default = store.finalize.DEFAULT_MEMORY_BUDGET
    finalize_memory: int = option(1024 * 2**20,
        "Memory budget in bytes of the end of the job on rank 0 (documents/ built from the "
        "committed pages; spills to OUTPUT/.scratch/ beyond it). The default (1 GiB) holds for "
        "any corpus size; `nougat-dist finalize OUTPUT` redoes that step alone.")
    log_level: str = option("INFO", "Console and log-file level (DEBUG, INFO, WARNING).")
    post: str = option("",
        "Post stages rank 0 runs when the job is complete, comma-separated and in this order: "
        "clean, chunk, upload (as `nougat-dist clean|chunk|upload OUTPUT` with their defaults). "
        "Empty: none.")
    post_repo: str = option("",
        "The Hub dataset repo --post upload sends to (e.g. my-org/papers-ocr; created if missing; "
        "the token from HF_TOKEN or a saved login).")
    overlap_post: bool = option(False,
        "Run the --post stages while OCR runs: every --post-every seconds the documents whose "
        "pages are all committed are cleaned, chunked and uploaded as one increment (one Hub "
        "commit), so the dataset reaches the Hub as documents complete; the end of the job "
        "publishes the rest. A background process of rank 0 at low priority; a crash or a stop "
        "resumes each stage where it was.")
    post_every: float = option(30.0, "Seconds between two increments of --overlap-post.")
    absolute_source: bool = option(False,
        "Store each document's `source` as its absolute local path (or full URL) instead of "
        "relative to the --input it was found under (a directory given: the path inside it; a "
        "file, glob or list file: the path from its folder; a URL or bucket/Hub listing: the path "
        "after its prefix). The relative form keeps /home/... paths out of an uploaded dataset; "
        "manifest.parquet's `location` always has the path read.")
    batching: str = option("length_aware",
        "How each rank groups rendered pages into model batches. length_aware: pages wait in a "
        "window of 4 batches and each batch takes pages of similar predicted length (text layer, "
        "else ink), so short pages do not idle beside long ones (a batch decodes until its "
        "longest page ends); no page waits more than 8 batches. document_order: consecutive "
        "pages, as the stock CLI. Text is the same either way except on pages nougat's "
        "batch-level repetition check flags (docs/fidelity.md).")

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise ConfigError(f"--batch-size must be >= 0 (0 = automatic), got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"--prefetch-factor must be >= 1, got {self.prefetch_factor}")
        if self.render_timeout <= 0:
            raise ConfigError(f"--render-timeout must be > 0 seconds, got {self.render_timeout}")
        if self.collective_timeout < 0:
            raise ConfigError(f"--collective-timeout must be >= 0 seconds (0 = automatic), got "
                              f"{self.collective_timeout}")
        if self.unit_pages < 1:
            raise ConfigError(f"--unit-pages must be >= 1, got {self.unit_pages}")
        if self.commit_pages < 1:
            raise ConfigError(f"--commit-pages must be >= 1, got {self.commit_pages}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.control_backend not in ("auto", "gloo"):
            raise ConfigError(f"--control-backend must be auto or gloo, got {self.control_backend!r}")
        if self.plan_pages_per_s <= 0:
            raise ConfigError(f"--plan-pages-per-s must be > 0, got {self.plan_pages_per_s}")
        if self.max_member_bytes < 1 or self.max_page_pixels < 1:
            raise ConfigError("--max-member-bytes and --max-page-pixels must be >= 1")
        if self.finalize_memory < 64 * 2**20:
            raise ConfigError(f"--finalize-memory must be >= 64 MiB (67108864), got {self.finalize_memory}")
        stages: tuple[str, ...] = ()
        if self.post:
            from nougat_dist.stages.overlap import parse_stages

            try:
                stages = parse_stages(self.post)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if "upload" in stages and not self.post_repo:
            raise ConfigError("--post ...,upload needs --post-repo ORG/NAME (the Hub dataset repo)")
        if self.overlap_post and not stages:
            raise ConfigError("--overlap-post runs the --post stages beside OCR: give --post too")
        if self.post_every <= 0:
            raise ConfigError(f"--post-every must be > 0 seconds, got {self.post_every}")
        if self.batching not in ("length_aware", "document_order"):
            raise ConfigError(f"--batching must be length_aware or document_order, got {self.batching!r}")


_NEGATED = {"markdown": "--no-markdown", "skipping": "--no-skipping", "steal": "--no-steal"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown for options with values only: an on/off flag's help says what it does."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The launcher's argument parser: one flag per Config field."""
    parser = argparse.ArgumentParser(
        prog=prog or "launch.py",
        description="Run the unmodified Nougat OCR model over many PDFs on every GPU (or CPU) of a "
        "torchrun / Slurm job and write a Parquet dataset. Resumable: run the same command again.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file whose keys are flag names "
                        "(e.g. batch-size: 8, no-steal: true); flags given on the command line "
                        "override it.")
    parser.add_argument("--print-config", action="store_true",
                        help="Print the effective configuration as YAML and exit.")
    parser.add_argument("--plan", action="store_true",
                        help="Build (or load) the manifest, print documents, pages, duplicates, "
                        "unreadable inputs, the split over ranks and an estimated wall time, then "
                        "exit without OCR.")
    defaults = Config()
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        help_text = help_of(f)
        if f.name == "input":
            parser.add_argument("--input", "-i", nargs="+", default=[], help=help_text)
        elif f.name in _NEGATED:
            parser.add_argument(_NEGATED[f.name], dest=f.name, action="store_false", help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(_flag(f.name), dest=f.name, action="store_true", help=help_text)
        else:
            kind: Any = type(default) if default is not None else str
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, default=default, help=help_text)
    return parser


_DEFAULTS = Config()

# Flags that act on the run itself, not part of the job's configuration.
ACTION_FLAGS = ("config", "print_config", "plan")


def _yaml_values(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Keys of a YAML config file, validated against the flags (keys = flag names)."""
    import difflib

    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        parser.error(f"cannot read --config {path}: {e}")
    except yaml.YAMLError as e:
        parser.error(f"--config {path} is not valid YAML: {e}")
    if not isinstance(data, dict):
        parser.error(f"--config {path} must be a mapping of flag names to values")
    valid = [f.name for f in dataclasses.fields(Config)]
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name.startswith("no_") and name[3:] in _NEGATED:
            # `no-steal: true` as on the command line; `steal: false` works too
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key}: expected true or false (unquoted), "
                             f"got {value!r}")
            name, value = name[3:], not value
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            parser.error(f"--config {path}: unknown key {key!r}{hint}")
        if name == "input" and isinstance(value, str):
            value = [value]
        problem = _type_problem(name, value)
        if problem:
            parser.error(f"--config {path}: {key}: {problem}, got {value!r}")
        out[name] = value
    return out


def _type_problem(name: str, value: Any) -> str | None:
    """Why a YAML value does not fit its flag, or None when it does.

    YAML values bypass argparse's `type=` conversion, so they are checked here against the type
    of the field's default: a quoted "false" for a switch would otherwise be a true string, and
    2.5 for an int would reach the job.
    """
    default = getattr(_DEFAULTS, name)
    if name == "input":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else "expected a path or a list of paths"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "expected true or false (unquoted)"
    if isinstance(value, bool):  # bool is an int subclass: `batch-size: true` is not 1
        return f"expected {type(default).__name__ if default is not None else 'a string'}"
    if isinstance(default, int):
        return None if isinstance(value, int) else "expected an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) else "expected a number"
    if default is None or isinstance(default, str):
        return None if value is None and default is None or isinstance(value, str) else "expected a string"
    return None


def parse_args(argv: Sequence[str] | None = None,
               prog: str | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse flags (over an optional YAML --config) into a validated Config.

    Precedence: defaults < --config file < command-line flags. Returns the Config and the
    action flags (print_config, plan). Exits with a usage message on error.
    """
    parser = build_parser(prog)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_values(pre.config, parser))
    ns = parser.parse_args(argv)
    actions = argparse.Namespace(**{k: getattr(ns, k) for k in ACTION_FLAGS})
    values = {k: v for k, v in vars(ns).items() if k not in ACTION_FLAGS}
    if not values["input"]:
        parser.error("--input is required (flag or config key): PDF files, directories, globs, "
                     "list files or archives")
    if not values["output"]:
        parser.error("--output is required (flag or config key): the directory for the dataset")
    try:
        return Config(**values), actions
    except (ConfigError, TypeError) as e:
        parser.error(str(e))
    raise AssertionError("unreachable")


def to_yaml(cfg: Config) -> str:
    """The effective config as YAML whose keys are flag names (loadable with --config)."""
    import yaml

    data = {}
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name in _NEGATED:
            data[_NEGATED[f.name][2:]] = not value
        else:
            data[f.name.replace("_", "-")] = value
    return yaml.safe_dump(data, sort_keys=False)

