"""torch.distributed helpers shared by harvesting and training (a no-op on a single process)."""

from __future__ import annotations

import atexit
import os

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size); initialises torch.distributed (NCCL on GPUs, gloo on CPU) under torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(shutdown)  # featurelens made the group, so it takes it down
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown() -> None:
    """Wait for every rank, then destroy the default process group (a no-op when there is none).

    Run at exit for groups featurelens created: a rank that leaves with the group alive can abort in
    gloo's teardown ("terminate called without an active exception") while its peer is still finishing.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce(t: torch.Tensor, world: int, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` over ranks (``sum``, ``mean``, ``min`` or ``max``); a no-op on one process."""
    if world > 1:
        import torch.distributed as dist

        red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(t, op=red)
        if op == "mean":
            t /= world
    return t


def all_gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (the global batch); ``x`` itself on one process."""
    if world == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
