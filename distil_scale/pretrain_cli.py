"""Command line of launch/pretrain.py."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .assets import CONFIGS
from .config import ConfigError, load_config
from .ds_config import load_ds_config
from .errors import main_guard
from .launchers import apply_launcher_env
from .train import TrainingError, train


DEMO = str(CONFIGS / "demo.yaml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="launch/pretrain.py",
        description="Distil a DistilBERT student from a BERT teacher. With no arguments: the "
                    "offline CPU demo (all-MiniLM-L6-v2 teacher, BBC news text).")
    p.add_argument("--config", help="YAML config (default: configs/demo.yaml; the paper: configs/paper.yaml)")
    p.add_argument("--ds", help="DeepSpeed JSON (ds_configs/*.json); implies "
                                "parallel.backend=deepspeed")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in run.output_dir")
    p.add_argument("--restart-data", action="store_true",
                   help="with --resume on another number of processes than the checkpoint's: "
                        "read a text stream again from its start (its per-rank position "
                        "cannot be re-dealt; prepared shards need no flag)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in run.output_dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.max_steps=100 run.output_dir=runs/x")
    return p.parse_intermixed_args(argv)  # flags may sit between the overrides


@main_guard
def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar: the run's
    # srun without a launcher, accelerate launch: their settings in this CLI's words
    overrides, args.ds = apply_launcher_env(list(args.overrides), args.ds)
    if args.restart_data:
        overrides.append("data.restart_on_world_change=true")
    if args.ds and not any(o.startswith("parallel.backend=") for o in overrides):
        overrides.append("parallel.backend=deepspeed")
    cfg = load_config(args.config or (DEMO if os.path.isfile(DEMO) else None), overrides)
    ds_config = None
    if args.ds:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        ds_config = load_ds_config(args.ds, cfg, world)
    elif cfg.parallel.backend == "deepspeed":
        raise ConfigError("parallel.backend: 'deepspeed' needs --ds DS_JSON "
                          "(e.g. --ds ds_configs/rtx4070.json)")
    cmd = " ".join([os.path.basename(sys.executable), *sys.argv])
    if "--resume" not in cmd:
        cmd += " --resume"
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite, ds_config=ds_config,
                        resume_command=cmd)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0 if summary else 1
