"""Process-group bootstrap: which rank am I, on which device, and how do I talk to the others.

Two process groups: the default one (NCCL on GPU, gloo on CPU) carries EP's all-to-all; a gloo group
carries the small host-side traffic (barriers, metric gathering, DWDP's one-time IPC handle exchange).
DWDP's forward pass uses neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass
class RankContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    host_group: Any = None  # gloo
    progress: Callable[[str], None] = field(default=lambda what: None)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.host_group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.host_group)
        return out

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


def init_process_group(
    rank: int, world_size: int, local_rank: int, device_type: str, master_addr: str, master_port: int, timeout_s: float
) -> RankContext:
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} wants GPU {local_rank} but this host has {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # CPU ranks share the cores: without this each would start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    ctx = RankContext(rank, world_size, local_rank, device)
    if world_size == 1:
        return ctx
    # NVLink multicast stays off: on shared hosts it can take the GPUs out of service. All NCCL
    # connections are made at init (see launcher.py), also under mpirun.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("NCCL_RUNTIME_CONNECT", "0")
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    ctx.host_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if device.type == "cuda" else dist.group.WORLD
    return ctx


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
