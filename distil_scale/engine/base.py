"""The engine interface the trainer drives, and the single-process torch engine.

The loop only ever calls: ``module(...)`` inside ``accumulate(last)`` and ``autocast()``,
``backward(micro_loss)``, ``step()``, ``save(dir)``, ``load(dir)``, ``export_module()``.
Each backend (plain, ddp, fsdp, deepspeed) fills these in, so the loop has no backend branches.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import families
from ..checkpoint import load_torch
from ..runtime import autocast, resolve_precision


@dataclass
class StepResult:
    grad_norm: float | torch.Tensor
    skipped: bool  # a non-finite gradient: the update was dropped
    # fp16 only: the loss scaler dropped the update and lowered its scale, as it does while it
    # calibrates from its initial 2^16; that is not a divergence as long as the loss is finite
    scale_backoff: bool = False

    def diverged(self, loss_finite: bool) -> bool:
        """Whether this step counts toward train.max_nonfinite_steps."""
        return self.skipped and not (self.scale_backoff and loss_finite)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (as BERT and DistilBERT train)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The encoder layers (FSDP2 shards each, ``train.compile`` compiles each), where the
    family table says they are; ``model`` is a stock model or a wrapper holding one as
    ``.mlm``."""
    return list(families.layers(model.mlm if hasattr(model, "mlm") else model))


@dataclass(frozen=True)
class OptimSpec:
    """How every loop optimizes: AdamW, a linear warmup then linear decay to zero at
    ``total_steps``, gradient clipping at ``max_grad_norm`` (0: off). One spec for every
    engine, so pretraining, GLUE, teacher preparation and the bench build engines one way."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float = 0.0
    # parameter groups when not the default (every trainable parameter, no weight decay on
    # biases and norms); each may carry its own ``lr``
    groups: list[dict] | None = None

    def param_groups(self, model: nn.Module) -> list[dict]:
        return self.groups if self.groups is not None else param_groups(model, self.weight_decay)


class Engine:
    """Single-process torch engine; DDP and FSDP subclass it."""

    name = "plain"
    layout = ""  # how the model is laid over the ranks, where the backend's name does not say

    def __init__(self, model: nn.Module, optim: OptimSpec, *, precision: str, accum_steps: int,
                 device: torch.device, compile: bool = False):
        from transformers import get_linear_schedule_with_warmup

        self.device = device
        self.precision = resolve_precision(precision, device)
        self.accum_steps = accum_steps
        self.max_grad_norm = optim.max_grad_norm
        self.raw_module = model.to(device)
        if compile:
            # per transformer block (torchtitan's unit): every block has the same code, so one
            # compiled graph serves them all, and the loss and indexing around them stay eager
            for block in transformer_blocks(self.raw_module):
                block.compile()
        self.module = self.wrap(self.raw_module)
        # fused on every device: one kernel per step over all tensors (torch has a CPU one too:
        # 6 against 51 ms foreach for a 3-layer 384-wide student with its 30522-row embedding)
        self.optimizer = torch.optim.AdamW(optim.param_groups(self.raw_module), lr=optim.lr,
                                           eps=optim.adam_eps, fused=True)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, optim.warmup_steps,
                                                         optim.total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")

    # -- hooks for subclasses -----------------------------------------------------------------
    @classmethod
    def resolve_precision(cls, precision: str, device: torch.device,
                          ds_config: dict | None = None) -> str:
        return resolve_precision(precision, device)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    # -- the interface ------------------------------------------------------------------------
    def accumulate(self, last: bool):
        """Context for one micro-step's forward+backward; DDP skips the all-reduce unless last."""
        return contextlib.nullcontext()

    def autocast(self):
        return autocast(self.device, self.precision)

    def backward(self, micro_loss: torch.Tensor) -> None:
        self.scaler.scale(micro_loss / self.accum_steps).backward()

    def clip_and_norm(self) -> torch.Tensor:
        params = [p for p in self.raw_module.parameters() if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step(self) -> StepResult:
        self.scaler.unscale_(self.optimizer)
        norm = self.clip_and_norm()
        finite = bool(torch.isfinite(norm))
        backoff = False
        if finite or self.scaler.is_enabled():
            # GradScaler skips non-finite steps itself and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # below a scale of 1 the gradients overflow unscaled: that is divergence
            backoff = not finite and self.scaler.get_scale() >= 1.0
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.scheduler.step()
        return StepResult(norm, not finite, backoff)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def loss_scale(self) -> float:
        """The fp16 loss scale now (1.0 where there is none)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict:
        return {"model": self.raw_module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.raw_module.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.scaler.load_state_dict(sd["scaler"])

    def save(self, ckpt_dir: Path) -> None:
        if self.rank == 0:
            torch.save(self.state_dict(), Path(ckpt_dir) / "engine.pt")

    def load(self, ckpt_dir: Path) -> None:
        # read in full before anything is applied: a file that cannot be read leaves the
        # engine as it was, so an older checkpoint can still be tried
        self.load_state_dict(load_torch(Path(ckpt_dir) / "engine.pt", map_location=self.device))

    def check_other_world(self, ckpt_dir: Path, saved_world: int) -> None:
        """Raise a UserError where ``ckpt_dir``, written by ``saved_world`` processes, cannot
        be loaded on this number. engine.pt is whole (rank 0 writes it, every rank reads it),
        so any number can."""

    def full_state_dict(self) -> dict | None:
        """The unwrapped model's state, full-size, fp32 and on the CPU, on rank 0 (None
        elsewhere). A collective on sharded engines: every rank calls it."""
        if self.rank != 0:
            return None
        return {k: _cpu_copy(v) for k, v in self.raw_module.state_dict().items()}

    def export_module(self) -> nn.Module | None:
        """The full, unwrapped model on rank 0 (None elsewhere), for the HF export."""
        return self.raw_module if self.rank == 0 else None


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.float() if t.is_floating_point() else t).cpu().clone()
