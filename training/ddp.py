"""Multi-process training through ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=2 -m training.cli fit ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
:func:`setup` then joins the process group (nccl on CUDA, gloo on CPU). Each rank draws its own
data and noise (seed streams offset by rank), gradients are averaged by DDP, and only rank 0
writes logs and checkpoints. Without those variables everything is a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "setup", "cleanup", "gather_objects", "unwrap", "wrap", "barrier"]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "cpu") -> DistInfo:
    """Join the torchrun process group if there is one; choose this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            from runtime.errors import UsageError

            raise UsageError("--device cuda requested but torch sees no CUDA GPU; use --device cpu")
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` as a list indexed by rank (just ``[obj]`` in one process)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap(module: nn.Module | None, info: DistInfo) -> nn.Module | None:
    """``module`` in DistributedDataParallel on this rank's device when distributed, else itself
    (None stays None: the optional discriminators)."""
    if module is None or not info.distributed:
        return module
    dev = info.device
    return nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)
