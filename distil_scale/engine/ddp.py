"""torchrun data parallelism: the plain engine with the student inside DistributedDataParallel.

``torchrun --nproc_per_node N launch/pretrain.py parallel.backend=ddp`` (nccl on CUDA, gloo on
CPU). Only the student is wrapped; the frozen teacher stays a plain module on every rank.
Gradients are all-reduced once per optimizer step: micro-steps before the last run under
``no_sync()``. Checkpoints are the plain engine's (rank 0 writes engine.pt; every rank loads it).
"""
from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Engine


def world_of_one_env() -> None:
    """torchrun with one process, or plain ``python``, sets up no process group (the trainer
    only does for WORLD_SIZE > 1); these variables let the engine make a world of one."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def ensure_process_group(device: torch.device) -> None:
    if not dist.is_initialized():
        world_of_one_env()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


class DDPEngine(Engine):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        ensure_process_group(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # every parameter of the student takes part in each step (logits are computed at the
        # selected positions only, but the whole head runs), so no unused-parameter search
        self.ddp = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        return self.ddp

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last else self.ddp.no_sync()
