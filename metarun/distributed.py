"""One run over several processes (torchrun, or SLURM tasks through submitit): who does what.

- Each rank draws its own share of the meta-batch, from its own generator stream (`seed`).
- The meta-gradients meet in one all-reduce per step (`average_gradients`), after the last chunk
  of the rank's tasks: the mean over ranks of the ranks' mean gradients is the whole meta-batch's.
  Not DistributedDataParallel: the learners run the backbone through `torch.func.functional_call`
  with adapted weights and backpropagate several chunks per step, so DDP's per-parameter hooks
  would fire on every chunk's backward (or need `no_sync` around all but the last) and its
  forward wrapper is bypassed; one flat all-reduce is what DDP would do, with nothing to bypass.
- Buffers (batch norm's running statistics) follow rank 0's, as DDP's `broadcast_buffers` does.
- Rank 0 alone writes logs, TensorBoard, checkpoints and results (`main`); the training metrics it
  logs are first averaged over every rank's tasks (`mean_over_tasks`, one all-reduce per logged step).
- Evaluation episodes are split across ranks by batch and gathered in episode order.

With one process every method is a no-op, and `Processes()` is that single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from metarun.errors import MetarunError

# Rank r's training generator is seeded with seed + r * SEED_STRIDE: rank 0 keeps the run's own
# seed (a one-process run is unchanged), and no two ranks' streams start at the same place. Under
# 2**32: a CPU generator (mt19937) keeps only a seed's low 32 bits, so with a stride of 2**32 every
# rank of a CPU run drew rank 0's tasks. A prime, so seeds a few apart never share a stream.
SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device_type: str) -> Processes:
        """The processes torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or the
        tasks of a SLURM job started through submitit; one process otherwise. Joins the process
        group: NCCL for CUDA, gloo for the CPU."""
        if "WORLD_SIZE" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            import submitit

            if submitit.JobEnvironment().num_tasks > 1:
                submitit.helpers.TorchDistributedEnvironment().export()
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device_type != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank, world_size, local_rank)

    def share(self, meta_batch_size: int) -> int:
        """This rank's number of tasks per step."""
        if meta_batch_size % self.world_size:
            raise MetarunError(
                f"episode.meta_batch_size={meta_batch_size} does not split over {self.world_size} processes; "
                f"use a multiple of {self.world_size} or another --nproc_per_node"
            )
        return meta_batch_size // self.world_size

    def seed(self, seed: int) -> int:
        """The seed of this rank's training generator."""
        return seed + self.rank * SEED_STRIDE

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace each `.grad` by its mean over the ranks: one all-reduce of all gradients."""
        if not self.several:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, reduced in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(reduced.view_as(grad))

    def mean_over_tasks(
        self, metrics: dict[str, torch.Tensor], tasks: int
    ) -> dict[str, torch.Tensor]:
        """Each of this rank's metrics (means over its `tasks` tasks) as the mean over every rank's
        tasks, each rank weighted by its share: one all-reduce of all of them."""
        if not self.several:
            return metrics
        names = list(metrics)
        device = next(iter(metrics.values())).device
        weighted = [
            torch.as_tensor(metrics[name], device=device).float().reshape(()) * tasks
            for name in names
        ]
        sums = torch.stack([*weighted, torch.tensor(float(tasks), device=device)])  # [metrics + 1]
        dist.all_reduce(sums)
        return {name: total / sums[-1] for name, total in zip(names, sums)}

    def broadcast(self, module: nn.Module, buffers_only: bool = False) -> None:
        """Rank 0's parameters (unless `buffers_only`) and buffers on every rank."""
        if not self.several:
            return
        tensors = list(module.buffers()) + ([] if buffers_only else list(module.parameters()))
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is set on any rank (all ranks get the same answer)."""
        if not self.several:
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.several:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def agree(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (e.g. the run directory, whose name holds the time)."""
        if not self.several:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.several:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (torch warns about, and may abort on, a process that exits in it)."""
        if self.several and dist.is_initialized():
            dist.destroy_process_group()
