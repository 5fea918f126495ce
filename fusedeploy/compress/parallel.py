"""Several processes on one compression run, through torch.distributed (`torchrun --nproc-per-node N`).

The split, and why it reproduces the one-process run:
- Scoring: candidate blocks are dealt out to ranks (i % world); each score is computed by exactly
  one rank and summed with zeros from the others, so every rank holds the same exact scores and
  removes the same block.
- Distillation: every mini-batch is cut into `world` equal slices, one per rank. The KL's softmax
  runs over the batch dimension, so the loss needs the whole mini-batch: each rank gathers the
  others' student outputs (detached) around its own live slice and computes the same loss value as
  one process would. Its gradient is the part of the full gradient that flows through its slice;
  summing over ranks (all-reduce) gives the full gradient, so every rank takes the same step.
- Forward passes over the fine-tuning set (group inputs, the teacher, evaluations) are cheap next
  to training and are computed whole on every rank, which keeps every rank's data identical.
- Rank 0 writes the state and the output; every rank resumes from that state.

With one process every call below is the identity, so the plain run does not change.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def mine(self, n: int) -> list[int]:
        """The candidate indices this rank scores."""
        return list(range(self.rank, n, self.world))

    def share_scores(self, scores: dict[int, float], n: int) -> list[float]:
        """Every rank's scores, on every rank (each index was computed by exactly one rank)."""
        if not self.active:
            return [scores[i] for i in range(n)]
        t = torch.zeros(n, dtype=torch.float64)
        for i, v in scores.items():
            t[i] = v
        dist.all_reduce(t)
        return t.tolist()

    def my_slice(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's equal share of one mini-batch's row indices."""
        return index.chunk(self.world)[self.rank] if self.active else index

    def whole_batch(self, local: torch.Tensor) -> torch.Tensor:
        """The mini-batch's student outputs: the others' detached, this rank's own still differentiable."""
        if not self.active:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[self.rank] = local
        return torch.cat(parts)

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def from_environment(device_type: str) -> Ranks:
    """Join the process group torchrun describes in the environment; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device, ranks: Ranks) -> torch.device:
    """One GPU per process: rank r of a node uses cuda:LOCAL_RANK."""
    if device.type == "cuda" and ranks.active and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", ranks.rank)))
    return device
