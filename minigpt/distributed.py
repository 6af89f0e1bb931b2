"""DistributedDataParallel: the process group torchrun describes, where this process
sits in it, and the few collective operations the training loop needs.

A process run alone is rank 0 of 1, and every operation here then returns at once
without communicating, so the trainer can call them either way. Under torchrun each
process runs its own batch streams; DDP averages the gradients in the backward pass,
and the loop shares the loss, a signal and the clock through `mean_`, so every rank
stops and schedules in step (see train.py).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Distributed:
    """Where this process sits in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    started_here: bool = False
    """Whether `setup_distributed` started the process group (and `close` ends it)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def gather(self, obj: object) -> list:
        """`obj` from every process, in rank order (all ranks must call it)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is true on any process (every process must ask together)."""
        if not self.enabled:
            return flag
        shared = torch.tensor(float(flag), device=device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        return bool(shared.item())

    def sum_(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over every process, in place."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean_(self, tensor: Tensor) -> Tensor:
        """`tensor` averaged over every process, in place."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def share_step(
        self, loss: Tensor, signum: int, now: float
    ) -> tuple[Tensor, float, bool, float]:
        """One small all-reduce a step: the mean loss over all ranks (as a tensor, and
        read as a float), whether any rank got a signal, and a clock they share."""
        shared = torch.tensor([0.0, float(signum), now], dtype=torch.float64, device=loss.device)
        shared[0] = loss
        self.mean_(shared)
        loss_value, signals, elapsed = shared.tolist()
        return shared[0].float(), loss_value, signals != 0, elapsed

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` inside DDP when there are several processes, else as it is."""
        if not self.enabled:
            return model
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def close(self, together: bool = False) -> None:
        """End the process group if `setup_distributed` started it.

        together: every process got here the normal way, so they first wait for each
        other (rank 0 still draws loss.png when the others are done): a process
        that tears down its connections while a peer still holds them open can make
        the peer's backend abort the whole job."""
        if self.started_here and dist.is_initialized():
            if together:
                dist.barrier()
            gc.collect()  # a DDP wrapper no one holds, caught in a cycle, lets go of the group
            dist.destroy_process_group()


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    started_here = False
    if not dist.is_initialized():
        use_cuda = device_name.startswith("cuda") or (
            device_name == "auto" and torch.cuda.is_available()
        )
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started_here = True
    return Distributed(rank, local_rank, world_size, started_here)
