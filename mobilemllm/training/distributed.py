"""Process-group helpers: one code path for a single process and for ``torchrun`` (DDP / FSDP2).

``torchrun`` sets WORLD_SIZE, RANK and LOCAL_RANK; with WORLD_SIZE > 1 the trainer joins a process
group (gloo on CPU, nccl on GPUs). A single process never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    return DistEnv(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                   int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """Join the process group once (no-op for a single process or when already joined)."""
    if not env.distributed:
        return

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(env: DistEnv) -> None:
    if env.distributed:
        init_distributed(env, pick_device(env))
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
