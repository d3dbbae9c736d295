"""torchrun data parallelism: the plain engine with the student inside DistributedDataParallel.

``torchrun --nproc_per_node N launch/pretrain.py parallel.backend=ddp`` (nccl on CUDA, gloo on
CPU). Only the student is wrapped; the frozen teacher stays a plain module on every rank.
Gradients are all-reduced once per optimizer step: micro-steps before the last run under
``no_sync()``. Checkpoints are the plain engine's (rank 0 writes engine.pt; every rank loads it).
"""
from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import ensure_process_group
from .base import Engine


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
