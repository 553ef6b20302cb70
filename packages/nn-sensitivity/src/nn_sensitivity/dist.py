"""Data-parallel accumulation: sums and counts are all-reduced when torch.distributed is
initialised (e.g. under ``accelerate launch``); a single process is left untouched."""

from __future__ import annotations

import os

import torch


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum every tensor in place across ranks."""
    if not active():
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_count(n: float) -> float:
    """Sum a Python number across ranks (token and batch counts)."""
    if not active():
        return n
    t = torch.tensor([float(n)], dtype=torch.float64, device=_comm_device())
    all_reduce_([t])
    return float(t.item())


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: list, *, ws: int | None = None, rk: int | None = None) -> list:
    """This rank's share of ``items`` (round robin), everything in a single process."""
    ws = world_size() if ws is None else ws
    rk = rank() if rk is None else rk
    return items[rk::ws]


def maybe_init_from_env() -> bool:
    """Start the process group when launched by torchrun/accelerate (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return active()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True
