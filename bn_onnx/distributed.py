"""DistributedDataParallel support for `train`: process group, sharding, rank-0 decisions.

Under `torchrun` (WORLD_SIZE, RANK, LOCAL_RANK set) `context()` joins the process group:
gloo on CPU, nccl on CUDA. Batch norm: on CUDA the hidden BN layers become SyncBatchNorm
(statistics over the global batch). On CPU, where SyncBatchNorm does not run, each process
normalizes with its own batch statistics and DDP's buffer broadcast (from rank 0, before every
forward) keeps rank 0's running statistics on every process - those are the ones saved.
Outside torchrun everything here is a no-op.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bn_onnx.errors import UsageError


@dataclass
class DistContext:
    """The process's place in a training job (a single process when not `active`)."""

    active: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: reports progress and writes the checkpoint."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP-wrap `model`; on CUDA its hidden BN layers become SyncBatchNorm first.

        The input normalization stays a frozen BatchNorm1d (it never uses batch statistics).
        """
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            model.blocks = nn.SyncBatchNorm.convert_sync_batchnorm(model.blocks)
            return DistributedDataParallel(model, device_ids=[self.device.index])
        return DistributedDataParallel(model)

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's share of a shuffled index order (padded like DistributedSampler).

        Every rank gets the same number of rows, so every rank runs the same number of steps.
        """
        if not self.active:
            return order
        total = math.ceil(len(order) / self.world_size) * self.world_size
        if total > len(order):
            repeats = math.ceil(total / len(order))
            order = torch.cat([order, order.repeat(repeats)[: total - len(order)]])
        return order[self.rank : total : self.world_size]

    def broadcast_float(self, value: float) -> float:
        """Rank 0's value on every rank (so all ranks take the same decisions)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written the checkpoint)."""
        if self.active:
            torch.distributed.barrier()

    def describe(self) -> dict[str, Any]:
        """What `config.json["training"]["distributed"]` records."""
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "batch_norm": "SyncBatchNorm"
            if self.device.type == "cuda"
            else "per-process, rank 0 running statistics kept (DDP buffer broadcast)",
        }

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


_CONTEXT: DistContext | None = None


def launched_by_torchrun() -> bool:
    """Whether this process is a worker of `torchrun` (even a single one)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "LOCAL_RANK" in os.environ


def context(device: str = "auto") -> DistContext:
    """The distributed context of this process, joining the process group on first call.

    Args:
        device: auto (CUDA and nccl when a GPU is visible, else CPU and gloo), cpu or cuda.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    if not launched_by_torchrun():
        _CONTEXT = DistContext()
        return _CONTEXT
    world_size = int(os.environ["WORLD_SIZE"])
    if not torch.distributed.is_available():
        raise UsageError("this torch build has no torch.distributed; run without torchrun")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but this torch has no usable CUDA GPU")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    _CONTEXT = DistContext(
        active=True,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        backend=backend,
        device=device,
    )
    return _CONTEXT


def shutdown() -> None:
    """Leave the process group (end of a torchrun job)."""
    global _CONTEXT
    if _CONTEXT is not None and _CONTEXT.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _CONTEXT = None
