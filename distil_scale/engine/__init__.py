"""Backends behind one interface (see base.Engine); the trainer picks one by name only."""
from __future__ import annotations

import importlib

from ..config import ConfigError
import torch
from torch import nn

from .base import Engine, OptimSpec, StepResult, resolve_precision

_BACKENDS = {
    "plain": ("distil_scale.engine.base", "Engine"),
    "ddp": ("distil_scale.engine.ddp", "DDPEngine"),
    "fsdp": ("distil_scale.engine.fsdp", "FSDPEngine"),
    "deepspeed": ("distil_scale.engine.deepspeed", "DeepSpeedEngine"),
}


def engine_class(backend: str) -> type[Engine]:
    if backend not in _BACKENDS:
        raise ConfigError(f"parallel.backend: unknown '{backend}'; one of {', '.join(_BACKENDS)}")
    mod, cls = _BACKENDS[backend]
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError as e:
        raise ConfigError(f"parallel.backend: '{backend}' is not available here ({e})") from None


def make_engine(backend: str, model: nn.Module, optim: OptimSpec, *, precision: str,
                accum_steps: int, device: torch.device, compile: bool = False,
                **options) -> Engine:
    """The one way an engine is built: the model, how it is optimized, where it runs; and
    what only one backend takes (``ds_config`` for deepspeed, ``shard_degree`` for fsdp)."""
    return engine_class(backend)(model, optim, precision=precision, accum_steps=accum_steps,
                                 device=device, compile=compile, **options)


__all__ = ["Engine", "OptimSpec", "StepResult", "engine_class", "make_engine",
           "resolve_precision"]
