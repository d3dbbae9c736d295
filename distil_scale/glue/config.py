"""Typed GLUE run configuration: one shared default (configs/glue/default.yaml), one small YAML per
task over it, then ``--config FILE``, then dotted ``key=value`` overrides (last wins).

Unknown keys and wrong types are refused by :func:`distil_scale.config.from_dict` with a one-line
error naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..assets import CONFIGS
from ..config import ConfigError, deep_merge, from_dict, parse_overrides, read_yaml

CONFIG_DIR = CONFIGS / "glue"


@dataclass
class GlueRunConfig:
    # dev: train on train, select and report on the official dev set (the paper's protocol).
    # carved: train+dev pooled, shuffled with data.carve_seed, cut 80/10/10 into train/val/test;
    # select on val, report on test (the reimplementation report's protocol).
    protocol: Literal["dev", "carved"] = "dev"
    seed: int = 42
    # N > 1 runs seeds seed, seed+1, ... and reports the median (the paper: median of 5)
    seeds: int = 1
    # empty: runs/glue/<task>/<model name>[-distill]
    output_dir: str = ""
    # save the best epoch's model (+ tokenizer) under <output_dir>/model (a teacher for
    # launch/distill_task.py)
    save_model: bool = True


@dataclass
class GlueDataConfig:
    # a local GLUE directory in the original tsv layout; empty: the hub's nyu-mll/glue
    data_dir: str = ""
    # smoke-size runs: a fixed random subset of the training split (0 = all)
    max_train_samples: int = 0
    # a fixed random subset of each evaluation split (0 = all; never for reported numbers)
    max_eval_samples: int = 0
    max_length: int = 128
    # seeds the subsets above (not the training seed: every seed sees the same subset)
    sample_seed: int = 0
    # seeds the carved protocol's shuffle (fixed: every run sees the same 80/10/10 split)
    carve_seed: int = 0


@dataclass
class GlueTrainConfig:
    lr: float = 5e-5
    # global batch (split across DDP ranks)
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: int = 3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # auto: bf16 where the device does bf16 natively; on a V100 fp16 with loss scaling; on a
    # CPU without bf16 matmuls fp32 (the same rule as pretraining: distil_scale.runtime)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # consecutive non-finite steps before the run stops (fp16 scale calibration not counted)
    max_nonfinite_steps: int = 5
    progress_bar: bool = True
    tensorboard: bool = True


@dataclass
class GlueParallelConfig:
    # auto: ddp under torchrun/deepspeed (WORLD_SIZE > 1), else plain; or plain, ddp, fsdp,
    # deepspeed, as for pretraining
    backend: Literal["auto", "plain", "ddp", "fsdp", "deepspeed"] = "auto"
    # the DeepSpeed JSON (backend deepspeed), e.g. ds_configs/cpu.json; ZeRO stages 0-2
    ds_config: str = ""


@dataclass
class GlueDistillConfig:
    """launch/distill_task.py: loss = alpha·KL(T)·T² + (1 − alpha)·CE (+ alpha_cos·cosine on [CLS])."""

    alpha: float = 0.5
    temperature: float = 2.0
    alpha_cos: float = 0.0
    # --student init:teacher-layers / init:random: which teacher layers the student keeps;
    # empty: half the teacher's layers, spread as in pretraining (0,2,4,7,9,11 of 12)
    student_layers: list[int] = field(default_factory=list)


@dataclass
class GlueConfig:
    run: GlueRunConfig = field(default_factory=GlueRunConfig)
    data: GlueDataConfig = field(default_factory=GlueDataConfig)
    train: GlueTrainConfig = field(default_factory=GlueTrainConfig)
    distill: GlueDistillConfig = field(default_factory=GlueDistillConfig)
    parallel: GlueParallelConfig = field(default_factory=GlueParallelConfig)

    def validate(self) -> "GlueConfig":
        t, d, k = self.train, self.data, self.distill
        _check(t.lr > 0, "train.lr", f"must be > 0 (got {t.lr})")
        _check(t.batch_size > 0, "train.batch_size", "must be > 0")
        _check(t.eval_batch_size > 0, "train.eval_batch_size", "must be > 0")
        _check(t.epochs > 0, "train.epochs", "must be > 0")
        _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 = off)")
        _check(d.max_train_samples >= 0, "data.max_train_samples", "must be >= 0 (0 = all)")
        _check(d.max_eval_samples >= 0, "data.max_eval_samples", "must be >= 0 (0 = all)")
        _check(8 <= d.max_length <= 512, "data.max_length", "must be in [8, 512]")
        _check(self.run.seeds >= 1, "run.seeds", "must be >= 1")
        _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
        _check(self.parallel.backend != "deepspeed" or bool(self.parallel.ds_config),
               "parallel.ds_config", "the deepspeed backend needs a DeepSpeed JSON; set "
               "parallel.ds_config=ds_configs/cpu.json (or another profile)")
        _check(0 <= k.alpha <= 1, "distill.alpha", f"must be in [0, 1] (got {k.alpha})")
        _check(k.temperature > 0, "distill.temperature", "must be > 0")
        _check(k.alpha_cos >= 0, "distill.alpha_cos", "must be >= 0")
        _check(all(i >= 0 for i in k.student_layers), "distill.student_layers",
               "layer indices must be >= 0")
        return self


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def load_glue_config(task: str, config_file: Optional[str] = None,
                     overrides: Optional[list[str]] = None,
                     config_dir: Path = CONFIG_DIR) -> GlueConfig:
    """default.yaml <- <task>.yaml <- --config FILE <- key=value overrides."""
    data: dict = {}
    for p in (config_dir / "default.yaml", config_dir / f"{task}.yaml"):
        if p.is_file():
            data = deep_merge(data, read_yaml(p))
    if config_file:
        data = deep_merge(data, read_yaml(config_file))
    data = deep_merge(data, parse_overrides(overrides or []))
    return from_dict(GlueConfig, data).validate()
