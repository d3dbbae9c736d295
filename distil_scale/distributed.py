"""Agreement between ranks: a dead data stream, a preemption, which checkpoint to resume.

A rank that acts on a local event alone strands the others in the next all-reduce, or resumes
from another step than they do. Each such decision here is one small collective that every
rank makes at the same point. On NCCL runs they go over a gloo group of their own: a flag on
the host costs a network round-trip, not a device synchronisation.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

_control = None


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world_of_one_env() -> None:
    """torchrun with one process, or plain ``python``, sets up no process group; these
    variables let an engine make a world of one (DeepSpeed would otherwise look for MPI)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def ensure_process_group(device: torch.device, *, deepspeed: bool = False) -> None:
    """A process group for engines that need one, a world of one when no launcher made it."""
    if dist.is_initialized():
        return
    world_of_one_env()
    comm = "nccl" if device.type == "cuda" else "gloo"
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=comm)
    else:
        dist.init_process_group(comm)


def init_control_group() -> None:
    """Create the host-side group; a collective itself, so every rank calls it at start-up."""
    global _control
    if _control is None and world_size() > 1 and dist.get_backend() != "gloo":
        _control = dist.new_group(backend="gloo")


def _reduce(value: int, op) -> int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=op, group=_control)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    return bool(_reduce(int(flag), dist.ReduceOp.MAX))


def every_rank(flag: bool) -> bool:
    return bool(_reduce(int(flag), dist.ReduceOp.MIN))


def from_rank0(obj):
    """Rank 0's value of ``obj`` on every rank (e.g. its list of checkpoints)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def rank0_first(fn):
    """``fn()`` on rank 0, then on the others, which read back what rank 0 built and cached
    (the eval set, token counts) instead of each reading the corpus. A failure on rank 0 still
    reaches the barrier, so the others meet the same error instead of waiting forever."""
    if world_size() == 1:
        return fn()
    if rank() == 0:
        try:
            value = fn()
        finally:
            dist.barrier(group=_control)
        return value
    dist.barrier(group=_control)
    return fn()
