"""Backends behind one interface (see base.Engine); the trainer picks one by name only."""
from __future__ import annotations

import importlib

from ..config import ConfigError
from .base import Engine, StepResult, resolve_precision

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


__all__ = ["Engine", "StepResult", "engine_class", "resolve_precision"]
