"""The DeepSpeed JSON, reconciled with the YAML: batch sizes, clipping and learning rate are
stated once. ``"auto"`` fields are filled from the config; an explicit value that contradicts
it is a one-line error rather than a silently different run."""
from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError
from .runtime import accumulation


def load_ds_config(path: str, cfg, world: int) -> dict:
    """The pretraining config's --ds JSON."""
    t = cfg.train
    return reconcile(read_ds_json(path), path, micro=t.micro_batch, glob=t.global_batch,
                     world=world, max_grad_norm=t.max_grad_norm, lr=t.lr,
                     weight_decay=t.weight_decay, eps=t.adam_eps, precision=t.precision)


def read_ds_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds: no such file '{path}'")
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--ds: '{path}' is not valid JSON ({e}); fix the file") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds: '{path}' must hold a JSON object")
    return ds


def reconcile(ds: dict, path: str, *, micro: int, glob: int, world: int, max_grad_norm: float,
              lr: float, weight_decay: float, eps: float, precision: str) -> dict:
    """Fill the JSON's "auto" fields from the run's settings; refuse contradictions."""
    wanted = {"train_micro_batch_size_per_gpu": (micro, "train.micro_batch"),
              "gradient_accumulation_steps": (accumulation(glob, micro, world),
                                              "train.global_batch / (micro_batch x world)"),
              "train_batch_size": (glob, "train.global_batch"),
              "gradient_clipping": (max_grad_norm, "train.max_grad_norm")}
    for key, (value, source) in wanted.items():
        _reconcile(ds, key, value, source, path, key)
    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        params = opt.setdefault("params", {})
        for key, value, source in (("lr", lr, "train.lr"),
                                   ("weight_decay", weight_decay, "train.weight_decay"),
                                   ("eps", eps, "train.adam_eps")):
            _reconcile(params, key, value, source, path, f"optimizer.params.{key}")
    for half in ("bf16", "fp16"):
        sect = ds.get(half)
        if isinstance(sect, dict) and sect.get("enabled") == "auto":
            sect["enabled"] = precision == half
    return ds


def _reconcile(section: dict, key: str, value, source: str, path: str, label: str) -> None:
    have = section.get(key, "auto")
    if have == "auto":
        section[key] = value
    elif have != value:
        raise ConfigError(f"--ds: {label}={have} in '{path}' contradicts {source}={value}; "
                          f"set it to \"auto\" or make them agree")
