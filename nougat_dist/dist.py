"""Process-group setup and the device of each rank.

The only module that reads the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE, ...): everything
below it gets rank and world size as arguments.

One process group, the default one: NCCL when the ranks run on GPUs, gloo on CPU. Every control
message (plan broadcast, manifest exchange, status rounds, barriers) uses it, with tensors on
`DistInfo.comm_device`, so the CPU tests run the same code as a GPU job. `--control-backend gloo`
starts the default group on gloo even on GPUs (an escape hatch for a broken NCCL setup); then no
NCCL communicator exists at all.
"""

from __future__ import annotations

import datetime
import glob
import logging
import os
import platform
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

CONTROL_BACKENDS = ("auto", "gloo")


class DeviceError(RuntimeError):
    """The requested device is not usable; the message says what to check."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    #: ranks on this node (torchrun's LOCAL_WORLD_SIZE): they share its /dev/shm
    local_world_size: int = 1
    #: backend of the default group ("" when world_size == 1)
    backend: str = ""
    #: how long a collective waits for the other ranks (seconds)
    timeout_s: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def control_group(self) -> None:
        """The group control messages use: always the default one (None)."""
        return None

    @property
    def comm_device(self) -> torch.device:
        """Where tensors of collectives live: the rank's GPU on NCCL, the CPU on gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _allocated_gpus(env: Mapping[str, str]) -> list[str]:
    """Signs that this process was given GPUs, each as a readable reason (empty: none)."""
    reasons = []
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    # "" and "-1" are the usual ways to hide every GPU on purpose.
    if visible and visible not in ("-1", "none", "NoDevFiles"):
        reasons.append(f"CUDA_VISIBLE_DEVICES={visible}")
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        value = env.get(var, "").strip()
        if value and value not in ("0", "(null)"):
            reasons.append(f"{var}={value}")
            break
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if nodes:
        reasons.append(f"this node has NVIDIA devices ({', '.join(nodes[:4])})")
    return reasons


def _cuda_unavailable_reason() -> str:
    """Why torch sees no GPU, as torch itself explains it."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build"
    try:
        torch.cuda.init()
    except (RuntimeError, AssertionError) as e:
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use CUDA: {e}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees 0 GPUs"


def pick_device(requested: str, local_rank: int, env: Mapping[str, str] | None = None) -> torch.device:
    """This rank's device. Never falls back to the CPU silently: with GPUs allocated to the job
    and none usable, that is an error (a CPU rank beside NCCL ranks would hang the job, and a
    whole job on CPUs would run a hundred times slower without saying so)."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DeviceError(
                f"LOCAL_RANK {local_rank} but only {count} GPU(s) are visible to this process: "
                f"start torchrun with --nproc-per-node <= {count} (one rank per GPU), or check "
                "CUDA_VISIBLE_DEVICES / the job's GPU allocation")
        return torch.device("cuda", local_rank)
    env = os.environ if env is None else env
    allocated = _allocated_gpus(env)
    if requested == "cuda" or allocated:
        why = f"GPUs are allocated ({'; '.join(allocated)}) but" if allocated else \
            "--device cuda was requested but"
        raise DeviceError(
            f"{why} {_cuda_unavailable_reason()}. Check nvidia-smi, the driver and "
            "CUDA_VISIBLE_DEVICES; run with --device cpu to use the CPU on purpose.")
    return torch.device("cpu")


#: The collective timeout when rendering cannot delay a status round (render workers in use).
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
#: The batch size assumed for --num-workers 0 with an automatic batch size (nougat's rule gives
#: 0.3 pages per GB: 64 covers a 213 GB GPU).
AUTO_BATCH_BOUND = 64


def collective_timeout_s(requested: float, render_timeout: float, num_workers: int,
                         batch_size: int) -> float:
    """Seconds a collective waits for the other ranks (`--collective-timeout`; 0 = automatic).

    A peer's collective fails when this rank goes that long without posting a status round. With
    render workers the rank waits for rendering at most POLL_S at a time and keeps posting, and a
    page over `render_timeout` is stopped in its worker: rendering never stretches the gap, which
    is one model batch at most. Without workers (num_workers 0) the rank renders a whole batch
    between two rounds, each page allowed `render_timeout`: that is added.
    """
    if requested > 0:
        return requested
    if num_workers > 0:
        return DEFAULT_COLLECTIVE_TIMEOUT_S
    return DEFAULT_COLLECTIVE_TIMEOUT_S + render_timeout * (batch_size or AUTO_BATCH_BOUND)


def init(device: str = "auto", timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
         control_backend: str = "auto") -> DistInfo:
    """Join the job's process group (if started by torchrun) and pick this rank's device.

    The device is selected with torch.cuda.set_device before any model or communicator exists:
    NCCL, the object collectives (which put their bytes on torch.cuda.current_device()) and every
    later allocation then land on cuda:LOCAL_RANK rather than all ranks piling onto cuda:0.
    """
    if control_backend not in CONTROL_BACKENDS:
        raise DeviceError(f"--control-backend must be one of {CONTROL_BACKENDS}, got {control_backend!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistInfo(rank=0, local_rank=0, world_size=1, device=dev, timeout_s=timeout_s)
    backend = "nccl" if dev.type == "cuda" and control_backend == "auto" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # device_id binds the NCCL communicator to this rank's GPU (eager init): the barriers and
    # collectives then need no guess of which GPU a rank owns.
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    log.debug("rank %d/%d joined (%s, device %s)", rank, world_size, backend, dev)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev,
                    local_world_size=local_world, backend=backend, timeout_s=timeout_s)


def describe(info: DistInfo) -> str:
    """Host, rank, device (GPU name and memory), backend and torch/CUDA/NCCL versions, one line."""
    dev = str(info.device)
    if info.device.type == "cuda":
        props = torch.cuda.get_device_properties(info.device)
        dev += f" ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    versions = f"torch {torch.__version__}"
    if torch.version.cuda:
        versions += f", CUDA {torch.version.cuda}"
        nccl = nccl_version()
        if nccl:
            versions += f", NCCL {nccl}"
    timeout = f" (collective timeout {info.timeout_s:g}s)" if info.distributed else ""
    return (f"host {platform.node()} rank {info.rank}/{info.world_size} device {dev} "
            f"backend {info.backend or 'none'}{timeout}; {versions}")


def nccl_version() -> str | None:
    """NCCL's version as torch links it, or None where torch has no NCCL."""
    if not dist.is_nccl_available():
        return None
    try:
        v = torch.cuda.nccl.version()
    except (RuntimeError, AttributeError):
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def restart_count() -> int:
    """How many times torchrun has restarted this job (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def teardown() -> None:
    """Leave the process group; safe to call when none was created or it is already gone."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
