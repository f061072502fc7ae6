"""Process-group setup. The only module that reads the torchrun environment (RANK, LOCAL_RANK, ...)."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested device is not usable; the message says what to check."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    #: Small CPU messages (status rounds, stealing, manifest exchange) travel on this gloo group so
    #: they never queue behind model work on a CUDA stream; None when world_size == 1.
    control_group: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                "start torchrun with --nproc_per_node <= the number of GPUs"
            )
        return torch.device("cuda", local_rank)
    if requested == "cuda":
        raise DeviceError(
            "--device cuda was requested but no GPU is visible to PyTorch "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES, or run with --device cpu."
        )
    return torch.device("cpu")


def init(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the job's process group (if started by torchrun) and pick this rank's device.

    The device is selected with torch.cuda.set_device before any model is created, so NCCL and
    every later allocation land on cuda:LOCAL_RANK rather than all ranks piling onto cuda:0.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistInfo(rank=0, local_rank=0, world_size=1, device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    log.debug("rank %d/%d joined (%s, device %s)", rank, world_size, backend, dev)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev,
                    control_group=control)


def restart_count() -> int:
    """How many times torchrun has restarted this job (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def teardown() -> None:
    """Leave the process group; safe to call when none was created or it is already gone."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
