"""nougat-dist benchmarks, measured side by side in one invocation (`make bench`).

Prints a table and writes bench/results.json. Nothing here asserts on time: the machine's speed
swings several-fold between runs, so every comparison is between runs interleaved in this one
invocation (repetitions rotate the order), and ratios are medians of per-repetition ratios.

Scenarios (--only picks a subset, comma-separated):
  throughput  (1)-(3) model-only bound, launcher 1 rank, stock `nougat` CLI: tiny checkpoint
  realistic   (1)-(2) with the real 0.1.0-small architecture (random weights, short max_length)
  ranks       (4) launcher with 2 ranks (torchrun --standalone, CPU) vs 1 rank
  memory      (5) peak RSS of the whole process tree, 5-page vs 500-page PDF, launcher vs CLI
  skew        (6) bench/skew.py's scenario: stealing on/off with a 10x slower rank
  scale       (7) scheduler on a synthetic 1,000,000-document manifest: seconds and peak RSS

Launcher pages/s is reported two ways: "work" = stats.json pages_this_run / makespan_s (from the
first rank starting work to the last finishing it: setup, model load and manifest excluded) and
"wall" = pages / wall time of the whole command, startup included. The issue's acceptance ratios
use "work" for the model-only comparison (the model-only bound excludes model load too) and
"wall" for the stock CLI comparison (the CLI has no work-phase figure; both pay their startup).

    python bench/run.py [--only throughput,memory] [--reps 3] [--quick]
    python bench/run.py --launcher-root /tmp/scratch   # measure a modified copy of the launcher
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

CACHE = ROOT / ".cache" / "bench"
RESULTS = BENCH / "results.json"
SCENARIOS = ("throughput", "realistic", "ranks", "memory", "skew", "scale")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
GIB = 1 << 30


# --------------------------------------------------------------------------------------------
# Process-tree memory and timed commands
# --------------------------------------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    """ppid -> child pids, from one scan of /proc (processes may vanish mid-scan)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces or parentheses: fields start after the last ')'
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over pid and all its descendants.

    RSS counts pages shared between a rank and its forked DataLoader workers once per process
    (what the brief asks for, and what a naive cgroup-less monitor shows); PSS splits shared
    pages between the sharers, so it is closer to what the tree really occupies.
    """
    kids = _children_map()
    todo, rss, pss = [pid], 0, 0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, ()))
        try:
            with open(f"/proc/{p}/statm") as f:
                rss += int(f.read().split()[1]) * PAGE_SIZE
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue  # exited between the scan and the read
    return rss, pss


@dataclass
class Timed:
    wall_s: float
    peak_rss: int = 0
    peak_pss: int = 0
    stdout: str = ""


def run_cmd(cmd: Sequence[str], *, env: dict[str, str], cwd: Path, sample_memory: bool = False,
            interval: float = 0.05) -> Timed:
    """Run cmd to completion; optionally sample the tree's memory every `interval` seconds."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # Own session, so an interrupted benchmark can take the whole tree (torchrun ranks,
        # DataLoader workers) down with it instead of leaving it to load the shared machine.
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=err,
                                start_new_session=True)
        peak_rss = peak_pss = 0
        try:
            while proc.poll() is None:
                if sample_memory:
                    rss, pss = tree_memory(proc.pid)
                    peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
                time.sleep(interval)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        wall = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return Timed(wall, peak_rss, peak_pss, stdout)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    tiny: Path
    tiny_short: Path  # tiny architecture, max_length 16: memory runs, where decoding is not the point
    realistic: Path | None
    papers: list[Path]
    realistic_papers: list[Path]
    long5: Path
    long500: Path


def prepare_inputs(args: argparse.Namespace, scenarios: set[str]) -> Inputs:
    """Build (or reuse from .cache/bench) checkpoints and PDFs; deterministic, so cached."""
    from testing.samples import write_long_pdf, write_sample_pdfs
    from testing.tiny_checkpoint import build_tiny_checkpoint

    CACHE.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_checkpoint(CACHE / "tiny-ml96", max_length=96)
    tiny_short = build_tiny_checkpoint(CACHE / "tiny-ml16", max_length=16)
    realistic = None
    if "realistic" in scenarios:
        from realistic_checkpoint import build_realistic_checkpoint

        realistic = build_realistic_checkpoint(CACHE / f"small-ml{args.real_max_length}",
                                               max_length=args.real_max_length)
    papers = write_sample_pdfs(CACHE / f"papers-{args.docs}", n_docs=args.docs)
    real_papers = [CACHE / f"long-{args.real_pages}.pdf"]
    long5 = CACHE / "long-5.pdf"
    long500 = CACHE / f"long-{args.long_pages}.pdf"
    for path, n in ((long5, 5), (long500, args.long_pages), (real_papers[0], args.real_pages)):
        if not path.exists():
            write_long_pdf(path, n)
    return Inputs(tiny, tiny_short, realistic, papers, real_papers, long5, long500)


def count_pages(pdfs: Sequence[Path]) -> int:
    import pypdfium2

    total = 0
    for p in pdfs:
        doc = pypdfium2.PdfDocument(str(p))
        total += len(doc)
        doc.close()
    return total


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ.copy()
    # nltk's `words` corpus changes the text, and without it nougat tries a download per page.
    env.setdefault("NLTK_DATA", str(ROOT / "tests" / "fixtures" / "nltk_data"))
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------------------------
# The three ways to OCR the same PDFs
# --------------------------------------------------------------------------------------------

@dataclass
class Variant:
    """A modified launcher run beside the default one: extra flags, environment, or code root."""

    name: str
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    root: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """NAME=ITEM ITEM...: an item is a launcher flag, env:KEY=VALUE, or root:DIR."""
        name, _, rest = text.partition("=")
        v = cls(name)
        for item in rest.split():
            if item.startswith("env:"):
                k, _, val = item[4:].partition("=")
                v.env[k] = val
            elif item.startswith("root:"):
                v.root = item[5:]
            else:
                v.flags.append(item)
        return v


@dataclass
class Runner:
    args: argparse.Namespace
    tmp: Path
    seq: int = 0

    def _out(self, tag: str) -> Path:
        self.seq += 1
        out = self.tmp / f"{self.seq:03d}-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        return out

    def launcher_cmd(self, pdfs: Sequence[Path], ckpt: Path, out: Path, ranks: int,
                     batch: int) -> list[str]:
        root = Path(self.args.launcher_root)
        base = [str(root / "launch.py"), "--input", *map(str, pdfs), "--output", str(out),
                "--checkpoint", str(ckpt), "--device", "cpu", "--batch-size", str(batch),
                *self.args.launcher_arg]
        if ranks == 1:
            return [sys.executable, *base]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={ranks}", *base]

    def launcher(self, pdfs: Sequence[Path], ckpt: Path, *, ranks: int = 1, batch: int,
                 memory: bool = False, flags: Sequence[str] = (), variant: Variant | None = None,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
        out = self._out(f"launch{ranks}")
        extra = dict(env or {})
        extra.update(kv.split("=", 1) for kv in self.args.launcher_env)
        root = Path(self.args.launcher_root)
        cmd = self.launcher_cmd(pdfs, ckpt, out, ranks, batch) + list(flags)
        if variant is not None:
            extra.update(variant.env)
            cmd += variant.flags
            if variant.root is not None:
                cmd = [str(Path(variant.root) / "launch.py") if c == str(root / "launch.py") else c
                       for c in cmd]
                root = Path(variant.root)
        t = run_cmd(cmd, env=bench_env(extra), cwd=root, sample_memory=memory)
        stats = json.loads((out / "stats.json").read_text())
        pages = stats["pages_this_run"]
        shutil.rmtree(out, ignore_errors=True)
        return {"pages": pages, "wall_s": t.wall_s, "makespan_s": stats["makespan_s"],
                "work_pps": pages / stats["makespan_s"], "wall_pps": pages / t.wall_s,
                "idle_fraction": stats["idle_fraction"], "peak_rss": t.peak_rss,
                "peak_pss": t.peak_pss}

    def cli(self, pdfs: Sequence[Path], ckpt: Path, *, batch: int, memory: bool = False,
            env: dict[str, str] | None = None) -> dict[str, Any]:
        out = self._out("cli")
        nougat = Path(sys.executable).parent / "nougat"
        t = run_cmd([str(nougat), *map(str, pdfs), "-o", str(out), "--checkpoint", str(ckpt),
                     "-b", str(batch)], env=bench_env(env), cwd=ROOT, sample_memory=memory)
        written = len(list(out.glob("*.mmd")))
        shutil.rmtree(out, ignore_errors=True)
        if written != len(pdfs):
            raise RuntimeError(f"the nougat CLI wrote {written} of {len(pdfs)} documents")
        pages = count_pages(pdfs)
        return {"pages": pages, "wall_s": t.wall_s, "wall_pps": pages / t.wall_s,
                "peak_rss": t.peak_rss, "peak_pss": t.peak_pss}

    def model_only(self, pdfs: Sequence[Path], ckpt: Path, *, batch: int, threads: int = 0,
                   full_precision: bool = False) -> dict[str, Any]:
        spec = {"pdfs": [str(p) for p in pdfs], "checkpoint": str(ckpt), "batch": batch,
                "threads": threads, "unit_pages": self.args.unit_pages,
                "full_precision": full_precision}
        t = run_cmd([sys.executable, str(BENCH / "run.py"), "--_model-only", json.dumps(spec)],
                    env=bench_env(), cwd=ROOT)
        res = json.loads(t.stdout.strip().splitlines()[-1])
        res["pps"] = res["pages"] / res["inference_s"]
        return res


def model_only_worker(spec: dict[str, Any]) -> None:
    """Child process: pages/s of model.inference alone on pre-rendered, pre-batched tensors.

    Pages are rendered by the launcher's own PageDataset and batched in the launcher's order
    (units, longest-first assignment, batches across unit boundaries), so the batches are the
    same ones the launcher feeds the model: Nougat stops a batch only when all its pages have
    stopped, so batch composition matters for the tiny model's cost. The process uses the
    launcher's allocator setting (`alloc.keep_freed_memory`): the bound is the model's best
    configuration here, so that the ratio measures the pipeline, not the allocator.
    """
    from nougat_dist.alloc import keep_freed_memory

    keep_freed_memory()
    import torch

    from nougat_dist.store.manifest import inspect, make_units, unique_docs
    from nougat_dist.ocr.render import EncoderInput, PageDataset
    from nougat_dist.ocr.model import encoder_input_spec, load_model
    from nougat_dist.sched.steal import assign
    from nougat_dist.inputs.sources import Source

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    ckpt = Path(spec["checkpoint"])
    docs = unique_docs([inspect(Source(p)) for p in spec["pdfs"]])
    units = make_units(docs, spec["unit_pages"])
    (queue,) = assign([u.n_pages for u in units], 1)
    keys = [(units[i].doc, p) for i in queue for p in units[i].pages()]
    ds = PageDataset(docs, EncoderInput(*encoder_input_spec(ckpt)))
    t0 = time.perf_counter()
    tensors = [ds[k].image for k in keys]
    render_s = time.perf_counter() - t0
    ds.close()
    b = spec["batch"]
    batches = [torch.stack(tensors[i:i + b]) for i in range(0, len(tensors), b)]
    model = load_model(ckpt, torch.device("cpu"), full_precision=spec.get("full_precision", False))
    per_batch = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            tb = time.perf_counter()
            model.inference(image_tensors=x, early_stopping=True)
            per_batch.append(time.perf_counter() - tb)
    total = time.perf_counter() - t0
    print(json.dumps({"pages": len(keys), "inference_s": total, "render_prepare_s": render_s,
                      "threads": torch.get_num_threads(), "per_batch_s": per_batch}))


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------

def interleave(reps: int, cases: dict[str, Callable[[], dict[str, Any]]],
               log: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """Run every case once per repetition, rotating the order so no case always goes first."""
    names = list(cases)
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            res = cases[n]()
            out[n].append(res)
            log(f"  rep {r + 1}/{reps} {n}: " + ", ".join(
                f"{k}={v:.3g}" for k, v in res.items() if isinstance(v, float)))
    return out


def med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def paired(a: list[dict[str, Any]], ka: str, b: list[dict[str, Any]], kb: str) -> float:
    """Median over repetitions of a[i][ka] / b[i][kb]: runs of one repetition ran back to back."""
    return statistics.median(x[ka] / y[kb] for x, y in zip(a, b))


def scenario_throughput(run: Runner, inp: Inputs, args: argparse.Namespace, log) -> dict[str, Any]:
    b = args.batch_size
    cases = {
        "model_only": lambda: run.model_only(inp.papers, inp.tiny, batch=b),
        "model_only_1thread": lambda: run.model_only(inp.papers, inp.tiny, batch=b, threads=1),
        "launcher": lambda: run.launcher(inp.papers, inp.tiny, batch=b),
        "cli": lambda: run.cli(inp.papers, inp.tiny, batch=b),
    }
    if args.cli_1thread:
        # The stock CLI with one intra-op thread, as the launcher's model runs here: separates
        # what the launcher's design buys from what its thread setting buys.
        cases["cli_1thread"] = lambda: run.cli(inp.papers, inp.tiny, batch=b,
                                               env={"OMP_NUM_THREADS": "1"})
    if args.skip_cli:
        del cases["cli"]
    for v in map(Variant.parse, args.variant):
        cases[f"launcher[{v.name}]"] = lambda v=v: run.launcher(inp.papers, inp.tiny, batch=b, variant=v)
    r = interleave(args.reps, cases, log)
    # The bound is the model's best configuration on this machine: on 2 shared cores one
    # intra-op thread often beats two (OpenMP threads wait on each other whenever another
    # process holds a core), so it is the faster of the two, per repetition.
    r["model_only_all_threads"] = r["model_only"]
    r["model_only"] = [max(a, c, key=lambda x: x["pps"])
                       for a, c in zip(r["model_only_all_threads"], r["model_only_1thread"])]
    res: dict[str, Any] = {"pages": r["launcher"][0]["pages"], "batch_size": b, "runs": r,
                           "model_only_pps": med(r["model_only"], "pps"),
                           "model_only_all_threads_pps": med(r["model_only_all_threads"], "pps"),
                           "model_only_1thread_pps": med(r["model_only_1thread"], "pps"),
                           "launcher_work_pps": med(r["launcher"], "work_pps"),
                           "launcher_wall_pps": med(r["launcher"], "wall_pps"),
                           "launcher_work_vs_model": paired(r["launcher"], "work_pps", r["model_only"], "pps"),
                           "launcher_wall_vs_model": paired(r["launcher"], "wall_pps", r["model_only"], "pps")}
    res["variants"] = {n[9:-1]: {"work_pps": med(x, "work_pps"), "wall_pps": med(x, "wall_pps"),
                                 "work_vs_default": paired(x, "work_pps", r["launcher"], "work_pps"),
                                 "work_vs_model": paired(x, "work_pps", r["model_only"], "pps")}
                       for n, x in r.items() if n.startswith("launcher[")}
    if "cli" in r:
        res.update(cli_wall_pps=med(r["cli"], "wall_pps"),
                   launcher_wall_vs_cli=paired(r["launcher"], "wall_pps", r["cli"], "wall_pps"),
                   launcher_work_vs_cli=paired(r["launcher"], "work_pps", r["cli"], "wall_pps"))
    if "cli_1thread" in r:
        res.update(cli_1thread_wall_pps=med(r["cli_1thread"], "wall_pps"),
                   launcher_wall_vs_cli_1thread=paired(r["launcher"], "wall_pps", r["cli_1thread"], "wall_pps"))
    return res


def scenario_realistic(run: Runner, inp: Inputs, args: argparse.Namespace, log) -> dict[str, Any]:
    assert inp.realistic is not None
    b = args.real_batch_size
    fp32 = not args.real_bf16
    cases = {
        "model_only": lambda: run.model_only(inp.realistic_papers, inp.realistic, batch=b,
                                             full_precision=fp32),
        "model_only_1thread": lambda: run.model_only(inp.realistic_papers, inp.realistic, batch=b,
                                                     full_precision=fp32, threads=1),
        "launcher": lambda: run.launcher(inp.realistic_papers, inp.realistic, batch=b,
                                         flags=["--full-precision"] if fp32 else []),
    }
    for v in map(Variant.parse, args.variant):
        cases[f"launcher[{v.name}]"] = lambda v=v: run.launcher(
            inp.realistic_papers, inp.realistic, batch=b, variant=v,
            flags=["--full-precision"] if fp32 else [])
    r = interleave(args.real_reps, cases, log)
    r["model_only_all_threads"] = r["model_only"]
    r["model_only"] = [max(a, c, key=lambda x: x["pps"])
                       for a, c in zip(r["model_only_all_threads"], r["model_only_1thread"])]
    variants = {n[9:-1]: {"work_pps": med(x, "work_pps"),
                          "work_vs_default": paired(x, "work_pps", r["launcher"], "work_pps"),
                          "work_vs_model": paired(x, "work_pps", r["model_only"], "pps")}
                for n, x in r.items() if n.startswith("launcher[")}
    return {"pages": r["launcher"][0]["pages"], "batch_size": b, "max_length": args.real_max_length,
            "dtype": "float32" if fp32 else "bfloat16", "variants": variants,
            "runs": r, "model_only_pps": med(r["model_only"], "pps"),
            "model_only_all_threads_pps": med(r["model_only_all_threads"], "pps"),
            "model_only_1thread_pps": med(r["model_only_1thread"], "pps"),
            "launcher_work_pps": med(r["launcher"], "work_pps"),
            "launcher_wall_pps": med(r["launcher"], "wall_pps"),
            "launcher_work_vs_model": paired(r["launcher"], "work_pps", r["model_only"], "pps"),
            "launcher_wall_vs_model": paired(r["launcher"], "wall_pps", r["model_only"], "pps")}


def scenario_ranks(run: Runner, inp: Inputs, args: argparse.Namespace, log) -> dict[str, Any]:
    b = args.batch_size
    cases = {"one": lambda: run.launcher(inp.papers, inp.tiny, batch=b),
             "two": lambda: run.launcher(inp.papers, inp.tiny, ranks=2, batch=b)}
    r = interleave(args.ranks_reps, cases, log)
    return {"pages": r["one"][0]["pages"], "runs": r,
            "one_work_pps": med(r["one"], "work_pps"), "two_work_pps": med(r["two"], "work_pps"),
            "one_wall_pps": med(r["one"], "wall_pps"), "two_wall_pps": med(r["two"], "wall_pps"),
            "two_vs_one_work": paired(r["two"], "work_pps", r["one"], "work_pps"),
            "two_vs_one_wall": paired(r["two"], "wall_pps", r["one"], "wall_pps"),
            "two_idle_fraction": med(r["two"], "idle_fraction")}


def scenario_memory(run: Runner, inp: Inputs, args: argparse.Namespace, log) -> dict[str, Any]:
    b = args.batch_size
    ck = inp.tiny_short
    # One intra-op thread for both: peak memory does not depend on it, and on 2 shared cores two
    # threads made the CLI's 500 pages take many minutes (see the throughput scenario).
    one = {"OMP_NUM_THREADS": "1"}
    cases: dict[str, Callable[[], dict[str, Any]]] = {
        "launcher_5": lambda: run.launcher([inp.long5], ck, batch=b, memory=True, env=one),
        "launcher_long": lambda: run.launcher([inp.long500], ck, batch=b, memory=True, env=one),
        "cli_5": lambda: run.cli([inp.long5], ck, batch=b, memory=True, env=one),
        "cli_long": lambda: run.cli([inp.long500], ck, batch=b, memory=True, env=one),
    }
    if args.skip_cli:
        del cases["cli_5"], cases["cli_long"]
    r = interleave(args.memory_reps, cases, log)
    res: dict[str, Any] = {"long_pages": args.long_pages, "runs": r}
    for tool in ("launcher", "cli"):
        if f"{tool}_5" not in r:
            continue
        for k in ("peak_rss", "peak_pss"):
            res[f"{tool}_5_{k}"] = med(r[f"{tool}_5"], k)
            res[f"{tool}_long_{k}"] = med(r[f"{tool}_long"], k)
            res[f"{tool}_{k}_ratio"] = paired(r[f"{tool}_long"], k, r[f"{tool}_5"], k)
        res[f"{tool}_long_wall_pps"] = med(r[f"{tool}_long"], "wall_pps")
    return res


def scenario_skew(run: Runner, inp: Inputs, args: argparse.Namespace, log) -> dict[str, Any]:
    from skew import run as skew_run  # bench/skew.py: the same command line it prints for

    ideal = args.skew_pages / (1 / args.skew_fast + 1 / args.skew_slow)
    pdf = CACHE / f"long-{args.skew_pages}.pdf"
    if not pdf.exists():
        from testing.samples import write_long_pdf

        write_long_pdf(pdf, args.skew_pages)
    res: dict[str, Any] = {"pages": args.skew_pages, "fast_s_per_page": args.skew_fast,
                           "slow_s_per_page": args.skew_slow, "ideal_s": ideal}
    for steal in (True, False):
        s = skew_run(pdf, run._out(f"skew-{steal}"), args.skew_fast, args.skew_slow, steal)
        key = "on" if steal else "off"
        res[key] = {"makespan_s": s["makespan_s"], "vs_ideal": s["makespan_s"] / ideal,
                    "idle_fraction": s["idle_fraction"],
                    "stolen": sum(p["units_stolen"] for p in s["per_rank"]),
                    "pages_per_rank": [p["pages"] for p in s["per_rank"]]}
        log(f"  stealing {key}: makespan {s['makespan_s']:.2f}s = {s['makespan_s'] / ideal:.2f}x ideal")
    return res


def scenario_scale(run: Runner, inp: Inputs, args: argparse.Namespace, log) -> dict[str, Any]:
    spec = {"docs": args.scale_docs, "world": args.scale_world}
    t = run_cmd([sys.executable, str(BENCH / "run.py"), "--_scale", json.dumps(spec)],
                env=bench_env(), cwd=ROOT)
    res = json.loads(t.stdout.strip().splitlines()[-1])
    log("  " + ", ".join(f"{k}={v:.3g}" for k, v in res["seconds"].items()))
    return res


def scale_worker(spec: dict[str, Any]) -> None:
    """Child process: what rank 0 does with a 1M-document manifest, stage by stage, through the
    job's own functions; then, in a process of its own, what every other rank does with the plan.

    DocEntry objects are built directly (no hashing or PDF parsing: that work is spread over all
    ranks and bounded by I/O). Page counts follow a long tail like real collections: mostly
    papers, some books. The manifest is written (a new job) and read back (a resumed one).
    """
    import pickle
    import random

    from nougat_dist.sched import plan as plan_mod
    from nougat_dist.store import manifest
    from nougat_dist.store.manifest import DocEntry
    from nougat_dist.sched.steal import ST_CLAIMED, ST_RATE_MILLI, ST_RESERVE, STATUS_LEN, plan_steals

    n, world = spec["docs"], spec["world"]
    rng = random.Random(0)
    sec: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        sec[name] = time.perf_counter() - t0
        return out

    def make_entries() -> list[DocEntry]:
        out = []
        for i in range(n):
            h = f"{i:064x}"
            pages = rng.randint(200, 900) if rng.random() < 0.01 else rng.randint(1, 30)
            out.append(DocEntry(h, f"/data/papers/{i // 1000:04d}/doc{i:07d}.pdf", None, pages,
                                pages * 60_000, h))
        return out

    with tempfile.TemporaryDirectory(prefix="nougat-scale-") as tmp:
        out_dir = Path(tmp)
        entries = stage("entries", make_entries)
        stage("manifest_write", lambda: manifest.write(out_dir, entries))
        del entries
        entries = stage("manifest_load", lambda: manifest.load(out_dir))
        plan = stage("decide_plan", lambda: plan_mod.decide_plan(out_dir, entries, 16, world))
        # what broadcast_object_list does with the message on rank 0
        blob = stage("plan_message_pickle", lambda: pickle.dumps(plan_mod.plan_message(plan)))
        weights = plan_mod.unit_weights(plan)
        # one round early in the job: every rank claimed a few units, rank 0 is idle, rates differ
        status = []
        for r in range(world):
            row = [0] * STATUS_LEN
            row[ST_CLAIMED] = len(plan.queues[r]) if r == 0 else 2
            row[ST_RATE_MILLI] = 2000 + 100 * r
            row[ST_RESERVE] = 1
            status.append(row)
        steals = stage("plan_steals_round", lambda: plan_steals(plan.queues, status, weights))
        peak = _vm_hwm()
        (out_dir / "plan.pickle").write_bytes(blob)
        other = subprocess.run([sys.executable, str(BENCH / "run.py"), "--_scale-other",
                                json.dumps({"blob": str(out_dir / "plan.pickle"), "unit_pages": 16})],
                               capture_output=True, text=True, check=True, env=bench_env(), cwd=ROOT)
        other_res = json.loads(other.stdout.strip().splitlines()[-1])
    sec.update({f"other_rank_{k}": v for k, v in other_res["seconds"].items()})
    # the critical path to the first page: rank 0 decides, then every other rank rebuilds
    total = sum(v for k, v in sec.items() if k != "entries")
    print(json.dumps({"docs": n, "units": len(plan.units), "world": world, "seconds": sec,
                      "total_s_excl_entries": total, "peak_rss": peak, "steals": len(steals),
                      "plan_message_bytes": len(blob),
                      "other_rank_total_s": sum(other_res["seconds"].values()),
                      "other_rank_peak_rss": other_res["peak_rss"]}))


def scale_other_worker(spec: dict[str, Any]) -> None:
    """Child of scale_worker: a rank other than 0 receiving the plan (unpickle, rebuild units)."""
    import pickle

    from nougat_dist.sched import plan as plan_mod

    blob = Path(spec["blob"]).read_bytes()
    sec: dict[str, float] = {}
    t0 = time.perf_counter()
    msg = pickle.loads(blob)
    sec["unpickle"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = plan_mod.plan_from_message(msg, spec["unit_pages"])
    sec["plan_from_message"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan_mod.unit_weights(plan)
    sec["unit_weights"] = time.perf_counter() - t0
    print(json.dumps({"seconds": sec, "peak_rss": _vm_hwm()}))


def _vm_hwm() -> int:
    """This process's peak RSS. Not ru_maxrss: Linux carries that over from the parent across
    fork and exec, so a child started by a big process reports the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "throughput": scenario_throughput, "realistic": scenario_realistic, "ranks": scenario_ranks,
    "memory": scenario_memory, "skew": scenario_skew, "scale": scenario_scale,
}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _mib(x: float) -> str:
    return f"{x / (1 << 20):,.0f} MiB"


def table(res: dict[str, Any]) -> tuple[list[tuple[str, str, str]], list[tuple[str, bool, str]]]:
    """Rows (what, measured, ratio) and acceptance checks (target, passed, value)."""
    rows: list[tuple[str, str, str]] = []
    checks: list[tuple[str, bool, str]] = []
    t = res.get("throughput")
    if t:
        rows += [
            (f"(1) model-only bound, tiny, batch {t['batch_size']}, {t['pages']} pages",
             f"{t['model_only_pps']:.2f} pages/s", "1.00"),
            (f"    model-only, {res['machine']['cores']} threads / 1 thread (bound = faster per rep)",
             f"{t['model_only_all_threads_pps']:.2f} / {t['model_only_1thread_pps']:.2f} pages/s", ""),
            ("(2) launcher 1 rank, work phase (pages/makespan)", f"{t['launcher_work_pps']:.2f} pages/s",
             f"{t['launcher_work_vs_model']:.2f} x model-only"),
            ("    launcher 1 rank, total wall (startup incl.)", f"{t['launcher_wall_pps']:.2f} pages/s",
             f"{t['launcher_wall_vs_model']:.2f} x model-only"),
        ]
        for name, v in t.get("variants", {}).items():
            rows.append((f"    variant {name}: launcher 1 rank, work phase", f"{v['work_pps']:.2f} pages/s",
                         f"{v['work_vs_model']:.2f} x model-only, {v['work_vs_default']:.2f} x default"))
        checks.append(("launcher 1 rank >= 0.9x model-only (tiny, work phase)",
                       t["launcher_work_vs_model"] >= 0.9, f"{t['launcher_work_vs_model']:.2f}"))
        if "cli_wall_pps" in t:
            rows += [("(3) stock nougat CLI, total wall", f"{t['cli_wall_pps']:.2f} pages/s",
                      f"launcher {t['launcher_wall_vs_cli']:.2f} x CLI (wall), "
                      f"{t['launcher_work_vs_cli']:.2f} x (work)")]
            if "cli_1thread_wall_pps" in t:
                rows.append(("    stock CLI with OMP_NUM_THREADS=1, total wall",
                             f"{t['cli_1thread_wall_pps']:.2f} pages/s",
                             f"launcher {t['launcher_wall_vs_cli_1thread']:.2f} x (wall)"))
            checks.append(("launcher 1 rank >= 1.3x stock CLI (tiny, both total wall)",
                           t["launcher_wall_vs_cli"] >= 1.3, f"{t['launcher_wall_vs_cli']:.2f}"))
    r = res.get("realistic")
    if r:
        rows += [
            (f"(1') model-only bound, 0.1.0-small arch, max_length {r['max_length']}, "
             f"{r['dtype']}, batch {r['batch_size']}, {r['pages']} pages", f"{r['model_only_pps']:.3f} pages/s", "1.00"),
            (f"    model-only, {res['machine']['cores']} threads / 1 thread (bound = faster per rep)",
             f"{r['model_only_all_threads_pps']:.3f} / {r['model_only_1thread_pps']:.3f} pages/s", ""),
            ("(2') launcher 1 rank, work phase", f"{r['launcher_work_pps']:.3f} pages/s",
             f"{r['launcher_work_vs_model']:.2f} x model-only"),
            ("    launcher 1 rank, total wall", f"{r['launcher_wall_pps']:.3f} pages/s",
             f"{r['launcher_wall_vs_model']:.2f} x model-only"),
        ]
        for name, v in r.get("variants", {}).items():
            rows.append((f"    variant {name}: launcher 1 rank, work phase", f"{v['work_pps']:.3f} pages/s",
                         f"{v['work_vs_model']:.2f} x model-only, {v['work_vs_default']:.2f} x default"))
        checks.append(("realistic arch: launcher >= 0.95x model-only (work phase)",
                       r["launcher_work_vs_model"] >= 0.95, f"{r['launcher_work_vs_model']:.2f}"))
    k = res.get("ranks")
    if k:
        rows += [
            ("(4) launcher 2 ranks (torchrun, CPU), work phase", f"{k['two_work_pps']:.2f} pages/s",
             f"{k['two_vs_one_work']:.2f} x 1 rank ({k['one_work_pps']:.2f})"),
            ("    launcher 2 ranks, total wall", f"{k['two_wall_pps']:.2f} pages/s",
             f"{k['two_vs_one_wall']:.2f} x 1 rank ({k['one_wall_pps']:.2f})"),
        ]
    m = res.get("memory")
    if m:
        for tool, name in (("launcher", "launcher"), ("cli", "stock CLI")):
            if f"{tool}_5_peak_rss" not in m:
                continue
            rows.append((f"(5) peak RSS tree, {name}: 5 pages -> {m['long_pages']} pages",
                         f"{_mib(m[f'{tool}_5_peak_rss'])} -> {_mib(m[f'{tool}_long_peak_rss'])}",
                         f"{m[f'{tool}_peak_rss_ratio']:.2f} x"))
            rows.append((f"    peak PSS tree, {name}",
                         f"{_mib(m[f'{tool}_5_peak_pss'])} -> {_mib(m[f'{tool}_long_peak_pss'])}",
                         f"{m[f'{tool}_peak_pss_ratio']:.2f} x"))
        checks.append((f"launcher {m['long_pages']}-page peak RSS <= 1.5x 5-page",
                       m["launcher_peak_rss_ratio"] <= 1.5, f"{m['launcher_peak_rss_ratio']:.2f}"))
    s = res.get("skew")
    if s:
        for key in ("on", "off"):
            rows.append((f"(6) skew ({s['pages']} p, rank 1 {s['slow_s_per_page'] / s['fast_s_per_page']:.0f}x "
                         f"slower), stealing {key}",
                         f"makespan {s[key]['makespan_s']:.1f} s, idle {s[key]['idle_fraction']:.0%}",
                         f"{s[key]['vs_ideal']:.2f} x ideal ({s['ideal_s']:.1f} s)"))
        checks.append(("skew: makespan <= 1.15x ideal with stealing", s["on"]["vs_ideal"] <= 1.15,
                       f"{s['on']['vs_ideal']:.2f}"))
    c = res.get("scale")
    if c:
        rows.append((f"(7) scheduler, {c['docs']:,} docs -> {c['units']:,} units, {c['world']} ranks, rank 0",
                     f"{c['total_s_excl_entries']:.1f} s, peak RSS {_mib(c['peak_rss'])}",
                     "; ".join(f"{k} {v:.1f}s" for k, v in c["seconds"].items()
                               if not k.startswith("other_rank_"))))
        if "other_rank_total_s" in c:
            rows.append(("    every other rank: receive the plan",
                         f"{c['other_rank_total_s']:.1f} s, peak RSS {_mib(c['other_rank_peak_rss'])}",
                         f"message {_mib(c['plan_message_bytes'])}; " + "; ".join(
                             f"{k[len('other_rank_'):]} {v:.2f}s" for k, v in c["seconds"].items()
                             if k.startswith("other_rank_"))))
        checks.append((f"{c['docs']:,}-document manifest < 30 s and < 2 GiB", c["total_s_excl_entries"] < 30
                       and c["peak_rss"] < 2 * GIB,
                       f"{c['total_s_excl_entries']:.1f} s, {c['peak_rss'] / GIB:.2f} GiB"))
    return rows, checks


def print_report(res: dict[str, Any]) -> str:
    rows, checks = table(res)
    lines = ["| what | measured | ratio |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| acceptance target | value | |", "|---|---|---|"]
    lines += [f"| {name} | {val} | {'PASS' if ok else 'FAIL'} |" for name, ok, val in checks]
    text = "\n".join(lines)
    print(text)
    return text


def machine() -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE / GIB, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    ap.add_argument("--quick", action="store_true",
                    help="fewer pages and repetitions (a smoke run, numbers are noisier)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the tiny throughput runs")
    ap.add_argument("--docs", type=int, default=100,
                    help="sample papers for throughput (2-6 pages each; ~400 pages at 100, so that "
                    "the ~7 s of imports and setup that the launcher and the CLI both pay do not "
                    "decide the wall-clock comparison)")
    ap.add_argument("--batch-size", type=int, default=4, help="same for launcher, CLI and model-only")
    ap.add_argument("--unit-pages", type=int, default=16, help="must match the launcher's --unit-pages")
    ap.add_argument("--real-pages", type=int, default=4)
    ap.add_argument("--real-bf16", action="store_true",
                    help="realistic runs in bfloat16 (default float32: this AVX2-only CPU has no "
                    "bf16 instructions and bf16 is several times slower than fp32 here)")
    ap.add_argument("--real-batch-size", type=int, default=4)
    ap.add_argument("--real-max-length", type=int, default=32)
    ap.add_argument("--real-reps", type=int, default=1)
    ap.add_argument("--ranks-reps", type=int, default=2)
    ap.add_argument("--long-pages", type=int, default=500)
    ap.add_argument("--memory-reps", type=int, default=1)
    ap.add_argument("--skew-pages", type=int, default=120)
    ap.add_argument("--skew-fast", type=float, default=0.1)
    ap.add_argument("--skew-slow", type=float, default=1.0)
    ap.add_argument("--scale-docs", type=int, default=1_000_000)
    ap.add_argument("--scale-world", type=int, default=64)
    ap.add_argument("--skip-cli", action="store_true", help="leave out the stock CLI runs")
    ap.add_argument("--cli-1thread", action="store_true",
                    help="also run the stock CLI with OMP_NUM_THREADS=1 in the throughput scenario")
    ap.add_argument("--launcher-root", default=str(ROOT),
                    help="directory holding launch.py + nougat_dist/ to measure (e.g. a patched copy)")
    ap.add_argument("--launcher-arg", action="append", default=[],
                    help="extra flag for every launcher run, e.g. --launcher-arg=--num-workers=1")
    ap.add_argument("--launcher-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for every launcher run, e.g. OMP_NUM_THREADS=2")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ITEMS",
                    help="an extra launcher case in throughput/realistic, interleaved with the "
                    "default one; ITEMS: launcher flags, env:KEY=VALUE, root:DIR (a patched copy), "
                    "e.g. --variant 'w1=--num-workers=1 env:OMP_NUM_THREADS=1'")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--_model-only", dest="model_only", help=argparse.SUPPRESS)
    ap.add_argument("--_scale", dest="scale", help=argparse.SUPPRESS)
    ap.add_argument("--_scale-other", dest="scale_other", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.ranks_reps, args.real_reps, args.docs, args.real_pages = 1, 1, 1, 4, 2
        args.long_pages, args.skew_pages = 100, 40
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model_only:
        model_only_worker(json.loads(args.model_only))
        return 0
    if args.scale:
        scale_worker(json.loads(args.scale))
        return 0
    if args.scale_other:
        scale_other_worker(json.loads(args.scale_other))
        return 0
    scenarios = [s for s in args.only.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.monotonic()
    log("preparing checkpoints and PDFs (cached in .cache/bench)")
    inp = prepare_inputs(args, set(scenarios))
    res: dict[str, Any] = {"machine": machine(), "args": {k: v for k, v in vars(args).items()
                                                           if k not in ("model_only", "scale", "scale_other")}}
    with tempfile.TemporaryDirectory(prefix="nougat-bench-") as tmp:
        run = Runner(args, Path(tmp))
        for name in scenarios:
            log(f"[{name}]")
            ts = time.monotonic()
            res[name] = RUNNERS[name](run, inp, args, log)
            res[name]["scenario_s"] = time.monotonic() - ts
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["total_s"] = time.monotonic() - t0
    rows, checks = table(res)
    res["table"] = [list(r) for r in rows]
    res["acceptance"] = [{"target": n, "pass": ok, "value": v} for n, ok, v in checks]
    Path(args.results).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print_report(res)
    log(f"total {res['total_s']:.0f} s; results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
