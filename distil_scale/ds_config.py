"""The DeepSpeed JSON, reconciled with the YAML: batch sizes, clipping and learning rate are
stated once. ``"auto"`` fields are filled from the config; an explicit value that contradicts
it is a one-line error rather than a silently different run."""
from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError


def load_ds_config(path: str, cfg, world: int) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds: no such file '{path}'")
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--ds: '{path}' is not valid JSON ({e}); fix the file") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--ds: '{path}' must hold a JSON object")
    micro = cfg.train.micro_batch
    glob = cfg.train.global_batch
    if glob % (micro * world):
        raise ConfigError(f"train.global_batch: {glob} is not divisible by train.micro_batch "
                          f"{micro} x {world} processes = {micro * world}; make it a multiple")
    wanted = {"train_micro_batch_size_per_gpu": (micro, "train.micro_batch"),
              "gradient_accumulation_steps": (glob // (micro * world),
                                              "train.global_batch / (micro_batch x world)"),
              "train_batch_size": (glob, "train.global_batch"),
              "gradient_clipping": (cfg.train.max_grad_norm, "train.max_grad_norm")}
    for key, (value, source) in wanted.items():
        _reconcile(ds, key, value, source, path, key)
    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        params = opt.setdefault("params", {})
        for key, value, source in (("lr", cfg.train.lr, "train.lr"),
                                   ("weight_decay", cfg.train.weight_decay,
                                    "train.weight_decay"),
                                   ("eps", cfg.train.adam_eps, "train.adam_eps")):
            _reconcile(params, key, value, source, path, f"optimizer.params.{key}")
    for half in ("bf16", "fp16"):
        sect = ds.get(half)
        if isinstance(sect, dict) and sect.get("enabled") == "auto":
            sect["enabled"] = cfg.train.precision == half
    return ds


def _reconcile(section: dict, key: str, value, source: str, path: str, label: str) -> None:
    have = section.get(key, "auto")
    if have == "auto":
        section[key] = value
    elif have != value:
        raise ConfigError(f"--ds: {label}={have} in '{path}' contradicts {source}={value}; "
                          f"set it to \"auto\" or make them agree")
