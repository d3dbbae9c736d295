"""torchrun with FSDP2: ``fully_shard`` on each transformer block and on the root.

``torchrun --nproc_per_node N launch/pretrain.py parallel.backend=fsdp``. Parameters, gradients
and AdamW states are sharded over the ranks (dim 0 of every tensor); each block is gathered for
its forward and its backward and freed after. bf16 runs use a ``MixedPrecisionPolicy``: bf16
compute weights, fp32 gradient reduction and fp32 sharded master weights. Gradients are
reduce-scattered at every micro-step, so the accumulated gradient stays sharded (skipping the
sync before the last micro-step would keep a full unsharded fp32 gradient per rank, which is
what FSDP is there to avoid). The word embeddings and the tied output projection live in the
root group, so the tie survives sharding.

Checkpoints are Distributed Checkpoint (DCP) directories: every rank writes its own shards of
the model and optimizer under ``dcp/`` and reads back what its shards need, so DCP reshards a
checkpoint onto another number of processes as it loads (2 -> 1 and 1 -> 2 are tested); the
small replicated rest (scheduler, scaler) is ``engine_rest.pt``.
The frozen teacher is not sharded: it stays a plain replicated module on every rank.

``parallel.fsdp_shard_degree=k`` (k the GPUs per node) is hybrid sharding (HSDP): a 2-D mesh of
world/k replicas x k shards, so the gathers and reduce-scatters of every micro-step stay inside
a node and only the gradient all-reduce across replicas crosses nodes. DCP saves each shard
once (the replicas' copies are deduplicated) and loads onto either layout.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..checkpoint import agree_readable, load_torch_agreed
from ..errors import first_line
from ..config import ConfigError
from ..distributed import ensure_process_group
from ..models import rebuild_student
from .base import Engine, OptimSpec, transformer_blocks


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, model: nn.Module, optim: OptimSpec, *, shard_degree: int = 0, **kw):
        self.shard_degree = shard_degree
        super().__init__(model, optim, **kw)

    def wrap(self, model: nn.Module) -> nn.Module:
        ensure_process_group(self.device)
        if self.precision == "fp16":
            raise ConfigError("train.precision: fp16 is not supported with parallel.backend="
                              "fsdp here; use bf16 (or the deepspeed backend, whose fp16 has "
                              "loss scaling)")
        self.mesh = fsdp_mesh(self.device.type, dist.get_world_size(), self.shard_degree)
        if self.mesh.ndim == 2:
            self.layout = (f" (hybrid: {self.mesh.size(0)} replicas x {self.mesh.size(1)} "
                           "shards)")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision == "bf16" else MixedPrecisionPolicy()
        for block in transformer_blocks(model):
            fully_shard(block, mesh=self.mesh, mp_policy=mp)
        fully_shard(model, mesh=self.mesh, mp_policy=mp)
        return model

    def clip_and_norm(self) -> torch.Tensor:
        params = [p for p in self.raw_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):  # a partial sum per rank: the all-reduce happens here
            norm = norm.full_tensor()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        return norm

    # -- checkpoints: DCP shards + the small replicated rest -----------------------------------
    def _rest(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def save(self, ckpt_dir: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.raw_module, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd},
                 checkpoint_id=str(Path(ckpt_dir) / "dcp"))
        if self.rank == 0:
            torch.save(self._rest(), Path(ckpt_dir) / "engine_rest.pt")

    def load(self, ckpt_dir: Path) -> None:
        # read and checked before anything changes: dcp.load copies into the live parameters
        # and optimizer states item by item, so a file failing half-way would leave a mixture
        rest = load_torch_agreed(Path(ckpt_dir) / "engine_rest.pt")
        agree_readable(dcp_problem(Path(ckpt_dir) / "dcp"))
        model_sd, optim_sd = get_state_dict(self.raw_module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(Path(ckpt_dir) / "dcp"))
        set_state_dict(self.raw_module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(rest["scheduler"])
        self.scaler.load_state_dict(rest["scaler"])

    def full_state_dict(self) -> dict | None:
        """All ranks gather (a collective); rank 0 gets the full fp32 state on the CPU."""

        full = get_model_state_dict(
            self.raw_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        return {k: v.float() if v.is_floating_point() else v for k, v in full.items()}

    def export_module(self) -> nn.Module | None:
        """All ranks gather (a collective); rank 0 gets a fresh fp32 copy of the student."""
        full = self.full_state_dict()
        return None if full is None else rebuild_student(self.raw_module, full)


def fsdp_mesh(device_type: str, world: int, shard_degree: int):
    """1-D over every rank, or (replicate, shard) for hybrid sharding; fully_shard takes both."""
    if not shard_degree or shard_degree == world:
        return init_device_mesh(device_type, (world,))
    if world % shard_degree:
        raise ConfigError(f"parallel.fsdp_shard_degree: {shard_degree} does not divide the "
                          f"{world} processes; use the processes per node (a divisor of "
                          f"{world}) or 0 to shard over every rank")
    return init_device_mesh(device_type, (world // shard_degree, shard_degree),
                            mesh_dim_names=("replicate", "shard"))


def dcp_problem(dcp_dir: Path) -> str | None:
    """Why DCP could not read ``dcp_dir`` back ("dcp/file: why"), or None. DCP keeps no
    checksums; what can be seen before reading is its ``.metadata`` failing to unpickle and a
    file missing or ending before the last item the metadata places in it (a truncation)."""

    try:
        storage = FileSystemReader(str(dcp_dir)).read_metadata().storage_data or {}
    except Exception as e:  # missing, truncated, garbage
        return f"dcp/.metadata: cannot be read ({type(e).__name__}: {first_line(e, 120)})"
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0),
                                       info.offset + info.length)
    for rel, end in sorted(ends.items()):
        try:
            size = (dcp_dir / rel).stat().st_size
        except OSError as e:
            return f"dcp/{rel}: cannot be read ({e.strerror})"
        if size < end:
            return (f"dcp/{rel}: cannot be read (truncated: {size} bytes, its items end at "
                    f"byte {end})")
    return None

