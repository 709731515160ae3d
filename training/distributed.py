"""Data-parallel training across processes with torchrun and DistributedDataParallel.

torchrun starts one process per GPU (or per CPU share) and sets RANK, WORLD_SIZE and LOCAL_RANK; each process
reads the log, trains on its users' windows (users are dealt round-robin), and DistributedDataParallel
averages the gradients (NCCL on GPUs, gloo on CPUs), so every process holds the same weights. Validation
figures are summed across processes before early stopping decides, so every process decides the same.
Only rank 0 evaluates on the test cases and writes the artifact.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.errors import TrainingError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def users(self, n_users: int) -> np.ndarray | None:
        """(U,) bool, this process's users (every size-th user from its rank); None: all of them."""
        if not self.distributed:
            return None
        return np.arange(n_users) % self.size == self.rank


def from_env() -> World:
    """The world torchrun describes in the environment (a single process without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device) -> None:
    """Join the process group (NCCL for GPUs, gloo for CPUs); nothing for a single process."""
    if not world.distributed or dist.is_initialized():
        return
    if not dist.is_available():
        raise TrainingError("torch.distributed is not available in this torch build")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> World:
    """The running world: from the process group when one is joined, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all processes (the values themselves for one process)."""
    if not current().distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_min(value: int, device: torch.device) -> int:
    """The smallest `value` over all processes: every process runs the same number of steps."""
    if not current().distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class _TrainingLoss(nn.Module):
    """The training forward and loss (`loss(model, inputs, targets)`, training/losses.py) as a module's forward,
    which DDP's gradient hooks need: every parameter the loss reads is reached through this forward."""

    def __init__(self, model: nn.Module, loss: Callable[..., tuple[torch.Tensor, int]]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.loss(self.model, inputs, targets)


def training_step(
    model: nn.Module, device: torch.device, loss: Callable[..., tuple[torch.Tensor, int]]
) -> nn.Module:
    """A module computing (mean loss, scored positions) from (inputs, targets): DDP-wrapped when distributed."""
    step = _TrainingLoss(model, loss)
    if not current().distributed:
        return step
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=ids, broadcast_buffers=False)
