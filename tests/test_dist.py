"""The GPU path as far as a CPU machine can check it: which device and process group a rank gets,
that a job given GPUs never falls back to the CPU, the start line, pinned batches, /dev/shm."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist

from conftest import ROOT, run_launch
from testing import fake_model, faults
from nougat_dist import dist as ndist
from nougat_dist.errors import SetupError
from nougat_dist.ocr import render
from nougat_dist.sched.steal import STATUS_LEN, StatusRounds

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU paths")


@pytest.fixture
def no_gpu(monkeypatch):
    """torch sees no GPU and the node has no NVIDIA device files, whatever this machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ndist.glob, "glob", lambda pattern: [])


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("env", [{}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"},
                                 {"SLURM_GPUS_ON_NODE": "0"}])
def test_auto_is_cpu_when_no_gpu_was_given(no_gpu, env):
    assert ndist.pick_device("auto", 0, env) == torch.device("cpu")


@pytest.mark.parametrize("env, named", [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
    ({"SLURM_JOB_GPUS": "2,3"}, "SLURM_JOB_GPUS=2,3"),
])
def test_allocated_gpus_that_torch_cannot_see_are_an_error(no_gpu, env, named):
    with pytest.raises(ndist.DeviceError) as e:
        ndist.pick_device("auto", 0, env)
    assert named in str(e.value) and "--device cpu" in str(e.value)
    # --device cpu is the way to use the CPU on purpose on such a node
    assert ndist.pick_device("cpu", 0, env) == torch.device("cpu")


def test_nvidia_device_files_count_as_allocated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ndist.glob, "glob", lambda pattern: ["/dev/nvidia0", "/dev/nvidia1"])
    with pytest.raises(ndist.DeviceError, match="/dev/nvidia0"):
        ndist.pick_device("auto", 0, {})


def test_cuda_requested_without_gpu(no_gpu):
    with pytest.raises(ndist.DeviceError, match="--device cuda was requested"):
        ndist.pick_device("cuda", 0, {})


def test_local_rank_beyond_the_gpus(two_gpus):
    assert ndist.pick_device("auto", 1, {}) == torch.device("cuda", 1)
    with pytest.raises(ndist.DeviceError, match=r"LOCAL_RANK 2 but only 2 GPU\(s\).*--nproc-per-node <= 2"):
        ndist.pick_device("cuda", 2, {})


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def record(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))


@pytest.mark.parametrize("control, backend", [("auto", "nccl"), ("gloo", "gloo")])
def test_gpu_ranks_use_one_group(monkeypatch, two_gpus, control, backend):
    """On GPUs the default group is NCCL, bound to the rank's GPU, which is made current first
    (object collectives put their bytes on the current device); no side group is created.
    --control-backend gloo makes it gloo, with no NCCL communicator at all."""
    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "set_device", rec.record("set_device"))
    monkeypatch.setattr(tdist, "init_process_group", rec.record("init_process_group"))
    monkeypatch.setattr(tdist, "new_group", rec.record("new_group"))
    for k, v in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    info = ndist.init("auto", control_backend=control)
    names = [c[0] for c in rec.calls]
    assert names == ["set_device", "init_process_group"]
    assert rec.calls[0][1] == (torch.device("cuda", 1),)
    kwargs = rec.calls[1][2]
    assert kwargs["backend"] == backend
    assert kwargs.get("device_id") == (torch.device("cuda", 1) if backend == "nccl" else None)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (3, 1, 4, 2)
    assert info.backend == backend and info.control_group is None
    assert info.comm_device == (torch.device("cuda", 1) if backend == "nccl" else torch.device("cpu"))


def test_cpu_ranks_use_gloo(monkeypatch, no_gpu):
    rec = _Recorder()
    monkeypatch.setattr(tdist, "init_process_group", rec.record("init_process_group"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    info = ndist.init("cpu")
    assert rec.calls[0][2]["backend"] == "gloo" and "device_id" not in rec.calls[0][2]
    assert info.comm_device == torch.device("cpu")


def test_status_rounds_keep_their_tensors_on_the_comm_device(monkeypatch):
    posted = {}

    class Work:
        done = False

        def is_completed(self):
            return self.done

        def wait(self):
            self.done = True

    def fake_all_gather(out, mine, group=None, async_op=False):
        posted["devices"] = {t.device for t in [*out, mine]}
        for r, t in enumerate(out):
            t.copy_(mine + r)
        posted["work"] = Work()
        return posted["work"]

    monkeypatch.setattr(tdist, "all_gather", fake_all_gather)
    rounds = StatusRounds(2, None, torch.device("cpu"))
    rounds.post(list(range(STATUS_LEN)))
    assert posted["devices"] == {torch.device("cpu")}
    assert not rounds.ready()
    posted["work"].done = True
    assert rounds.ready()
    got = rounds.collect()
    assert got == [list(range(STATUS_LEN)), [v + 1 for v in range(STATUS_LEN)]]


@needs_no_gpu
def test_launcher_exits_2_when_gpus_are_allocated_but_unusable(tmp_path, sample_pdfs):
    """The silent CPU fallback, end to end: the job was given a GPU, torch has none."""
    proc = run_launch(["--input", str(sample_pdfs[0]), "--output", str(tmp_path / "out")],
                      env={"CUDA_VISIBLE_DEVICES": "0"}, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "GPUs are allocated (CUDA_VISIBLE_DEVICES=0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.parquet").exists()


@needs_no_gpu
def test_launcher_exits_2_for_local_rank_beyond_the_gpus(tmp_path, sample_pdfs):
    code = ("import sys, torch; torch.cuda.is_available = lambda: True; "
            "torch.cuda.device_count = lambda: 1; from nougat_dist.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--input", str(sample_pdfs[0]),
                           "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "LOCAL_RANK": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "LOCAL_RANK 1 but only 1 GPU(s)" in proc.stderr and "Traceback" not in proc.stderr


def test_every_rank_logs_its_start_line(tmp_path, sample_pdfs):
    out = tmp_path / "out"
    run_launch(["--input", *map(str, sample_pdfs), "--output", str(out), "--device", "cpu",
                "--batch-size", "3", "--num-workers", "1"], nproc=2, env=fake_model.env("delay=0"))
    for rank in (0, 1):
        lines = [ln for ln in (out / "logs" / f"rank{rank}.log").read_text().splitlines()
                 if " backend " in ln]
        assert len(lines) == 1, lines
        line = lines[0]
        for part in (f"rank {rank}/2", "device cpu", "backend gloo", "torch ", "dtype none",
                     "batch size 3", "1 render worker(s) x prefetch 2", "checkpoint fake", "host "):
            assert part in line, (part, line)


def test_describe_names_host_rank_device_and_versions():
    info = ndist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    line = ndist.describe(info)
    assert "rank 0/1" in line and "device cpu" in line and f"torch {torch.__version__}" in line


def _batch(images: torch.Tensor | None) -> render.Batch:
    return render.Batch(keys=[(0, 1), (0, 2)], images=images, ok_index=[0, 1] if images is not None else [],
                        errors={}, render_ms=[1.0, 2.0])


def test_batches_are_pinned_by_the_dataloader_pin_path(monkeypatch):
    """DataLoader's pin-memory thread calls `pin_memory(data)` from this module on every batch;
    it pins only what has a pin_memory() method. Tensor.pin_memory needs CUDA, so it is mocked:
    the test is that the batch's images go through it and everything else survives."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []

    def fake_pin(self):
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    images = torch.rand(2, 3, 4, 4)
    out = pin_memory(_batch(images))
    assert isinstance(out, render.Batch)
    assert len(pinned) == 1 and pinned[0] is images
    assert out.images is not images and torch.equal(out.images, images)
    assert out.keys == [(0, 1), (0, 2)] and out.render_ms == [1.0, 2.0]
    empty = _batch(None)
    assert pin_memory(empty) is empty


def test_shm_need_at_the_real_input_size():
    # batch 43 (nougat's rule on a 141 GB GPU), 2 workers, prefetch 2: 1.2 GB per rank
    need = render.shm_needed([896, 672], 43, 2, 2)
    assert need == 3 * 896 * 672 * 4 * 43 * 4
    assert render.shm_needed([896, 672], 43, 2, 2, ranks_on_node=8) == 8 * need


def test_shm_too_small_is_a_setup_error_that_says_what_to_do():
    need = render.shm_needed([896, 672], 43, 2, 2)
    with pytest.raises(SetupError) as e:
        render.check_shm(need, 64 * 2**20, 2, 2)
    msg = str(e.value)
    assert "64 MiB free" in msg and "--ipc=host" in msg and "--shm-size" in msg
    assert "--num-workers" in msg and "--prefetch-factor" in msg
    render.check_shm(need, need, 2, 2)  # enough
    render.check_shm(need, 1, 0, 2)  # no workers: nothing goes through /dev/shm
    render.check_shm(need, None, 2, 2)  # no /dev/shm to check (not Linux)
    assert render.shm_free("/nonexistent-shm") is None


# --- timeouts: a hung page never makes a peer's collective time out -------------------------------

def test_collective_timeout_is_the_flag_or_derived_from_how_ranks_render():
    assert ndist.collective_timeout_s(600, 120, 2, 8) == 600  # the flag wins
    # render workers: the rank polls them and keeps posting rounds, rendering adds nothing
    assert ndist.collective_timeout_s(0, 120, 2, 8) == ndist.DEFAULT_COLLECTIVE_TIMEOUT_S
    assert ndist.collective_timeout_s(0, 9999, 1, 8) == ndist.DEFAULT_COLLECTIVE_TIMEOUT_S
    # no workers: a whole batch renders between two rounds
    assert ndist.collective_timeout_s(0, 120, 0, 8) == ndist.DEFAULT_COLLECTIVE_TIMEOUT_S + 960
    assert ndist.collective_timeout_s(0, 10, 0, 0) == \
        ndist.DEFAULT_COLLECTIVE_TIMEOUT_S + 10 * ndist.AUTO_BATCH_BOUND


def test_hung_page_in_a_two_rank_run_is_an_error_row_and_no_collective_times_out(tmp_path):
    """Collectives time out after 20 s; the hung page is stopped after 4 s. Before, the rank
    waited render timeout x batch (4 x 8 = 32 s) for the batch without posting a status round,
    so its idle peer's round failed at 20 s and the job crashed."""
    import pandas as pd

    from conftest import stats
    from testing.samples import write_sample_pdfs

    pdfs = write_sample_pdfs(tmp_path / "in", n_docs=2, seed=0)
    out = tmp_path / "out"
    proc = run_launch(["--input", str(tmp_path / "in"), "--output", str(out), "--device", "cpu",
                       "--num-workers", "1", "--batch-size", "8",
                       "--unit-pages", "2", "--render-timeout", "4", "--collective-timeout", "20"],
                      nproc=2, env={**fake_model.env("delay=0.1"),
                                    **faults.env(f"render-hang:{pdfs[0].name}:2")},
                      timeout=300)
    assert "collective timeout 20s" in proc.stderr
    df = pd.read_parquet(out / "pages")
    bad = df[df.status != "ok"]
    assert [(s, p, st) for s, p, st in zip(bad.source, bad.page, bad.status)] == [
        (pdfs[0].name, 2, "render_error")]  # source: relative to the input dir
    assert "did not finish within 4s" in bad.error.iloc[0]
    assert len(df) == pd.read_parquet(out / "manifest.parquet").n_pages.sum() == 9
    assert len(set(zip(df.doc_id, df.page))) == len(df)
    s = stats(out)
    assert s["world_size"] == 2 and s["failed_pages"] == 1
    assert sum(r["render_recoveries"] for r in s["per_rank"]) == 1
