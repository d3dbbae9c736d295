"""Agreement between ranks: a dead data stream, a preemption, which checkpoint to resume.

A rank that acts on a local event alone strands the others in the next all-reduce, or resumes
from another step than they do. Each such decision here is one small collective that every
rank makes at the same point. On NCCL runs they go over a gloo group of their own: a flag on
the host costs a network round-trip, not a device synchronisation.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import socket
from pathlib import Path

import torch
import torch.distributed as dist

_control = None

# a separate gloo group for the host-side agreement even on a gloo world: the CPU tests then run
# the code path an NCCL job takes (its own group, its own ordering of collectives)
FORCE_CONTROL_ENV = "DISTIL_SCALE_CONTROL_GROUP"
# minutes a collective may wait for the slowest rank before the job fails (checkpoint writes,
# a first-step compile and a rank's data scan all happen between collectives)
DEFAULT_TIMEOUT_MIN = 30.0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    """A TCP port that is free on this host now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_of_one_env() -> None:
    """torchrun with one process, or plain ``python``, sets up no process group; these
    variables let an engine make a world of one (DeepSpeed would otherwise look for MPI)."""
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def init_process_group(device: torch.device, *, deepspeed: bool = False,
                       timeout_min: float = DEFAULT_TIMEOUT_MIN) -> None:
    """The one place a process group is made: NCCL on CUDA (bound to this rank's device, so
    its communicator is created eagerly and a wrong device fails here), gloo on a CPU."""
    comm = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_min)
    if deepspeed:
        import deepspeed as ds  # DeepSpeed's import is slow: only runs that use it pay for it

        ds.init_distributed(dist_backend=comm, timeout=timeout)
        if device.type == "cpu":
            unlink_deepspeed_shm()
    else:
        dist.init_process_group(comm, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)


def deepspeed_shm_name(rank_: int) -> str:
    """The POSIX shared-memory name of ``rank_``'s buffer for DeepSpeed's CPU all-reduce (set
    up when every rank is on one host), as its shm.cpp spells it."""
    return (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank_}")


def unlink_deepspeed_shm() -> None:
    """Remove this rank's DeepSpeed CPU all-reduce buffer's name once every rank has mapped it.
    DeepSpeed creates one 67 MiB segment per rank and never unlinks it: each CPU run left them
    in /dev/shm, which is memory, until reboot (245 of them, 16 GiB, filled a 24 GiB test
    machine). The peers open the segments by name while DeepSpeed initialises, so the barrier
    comes first; the mappings outlive the name, so the run keeps its buffers."""
    barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / deepspeed_shm_name(rank()))


def ensure_process_group(device: torch.device, *, deepspeed: bool = False) -> None:
    """A process group for engines that need one, a world of one when no launcher made it."""
    if dist.is_initialized():
        return
    world_of_one_env()
    init_process_group(device, deepspeed=deepspeed)


def init_control_group() -> None:
    """Create the host-side group; a collective itself, so every rank calls it at start-up."""
    global _control
    forced = os.environ.get(FORCE_CONTROL_ENV, "") == "1"
    if _control is None and world_size() > 1 and (forced or dist.get_backend() != "gloo"):
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


class Agreement:
    """Flags each rank raises on its own (a dead stream, a signal, the wall clock), agreed by
    every rank without stalling the step: posted before a micro-batch's forward as an
    asynchronous all-reduce on the host-side group, read after its backward, by which time the
    round trip has long finished. Every rank reads the same answer at the same micro-batch."""

    def __init__(self):
        self._flags: torch.Tensor | None = None
        self._work = None

    def post(self, flags: list[int]) -> None:
        self._flags = torch.tensor(flags, dtype=torch.int64)
        if world_size() > 1:
            self._work = dist.all_reduce(self._flags, op=dist.ReduceOp.MAX, group=_control,
                                         async_op=True)

    def result(self) -> list[int]:
        """The element-wise maximum over the ranks of the last post."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._flags.tolist()


def min_max(value: float) -> tuple[float, float]:
    """(smallest, largest) of ``value`` over the ranks: one host-side all-reduce."""
    if world_size() == 1:
        return value, value
    t = torch.tensor([value, -value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return -float(t[1]), float(t[0])


def all_gather(obj) -> list:
    """Every rank's ``obj``, in rank order (host-side)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control)
    return out


# the node's index as each launcher names it: torchrun, the deepspeed launcher, SLURM
NODE_RANK_ENVS = ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")


def node_rank() -> int:
    """This process's node, as its launcher numbers it (else rank // LOCAL_WORLD_SIZE)."""
    for var in NODE_RANK_ENVS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return rank() // local if local else 0


def who() -> str:
    """rank, node and host of this process, for lines every rank prints."""
    return f"rank {rank()} (node {node_rank()}, {socket.gethostname()} pid {os.getpid()})"


def unshared(path: Path) -> list[str]:
    """The ranks that do not see rank 0's directory ``path`` (made if absent) as the same
    directory, each as :func:`who` says it: empty when every rank shares it.

    Rank 0 writes a file of a random name there and every rank looks for it: a node-local disk
    mounted under the same name on each node fails this, where comparing names cannot tell."""
    if world_size() == 1:
        return []
    token = from_rank0(secrets.token_hex(8))
    probe = Path(path) / f".shared-{token}"
    if rank() == 0:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            probe.write_text(token)
        except OSError:  # unwritable: then no rank sees it, rank 0 included
            pass
    barrier_control()
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    missing = [w for ok, w in all_gather((seen, who())) if not ok]
    barrier_control()
    if rank() == 0:
        probe.unlink(missing_ok=True)
    return missing


def barrier_control() -> None:
    if world_size() > 1:
        dist.barrier(group=_control)


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
            barrier_control()
        return value
    barrier_control()
    return fn()
