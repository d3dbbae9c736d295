"""A GLUE run's output directory and the runtime that holds it: refused when it holds another
task's (or mode's) run or a pretraining run, locked before any data is read, cleared of a
replaced run's metrics, and written: results.json and the best epoch's model, each whole."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .. import runtime
from ..config import dump_yaml
from ..ds_config import read_ds_json
from ..engine import engine_class
from ..errors import UserError
from ..fsio import atomic_write, claim_output_dir, replace_dir
from .config import GlueConfig
from .tasks import Task

if TYPE_CHECKING:  # annotations only: runner imports this module
    from .runner import Prepared

RESULTS = "results.json"
RUN_FILE = "glue_run.json"  # which task and mode a GLUE output directory holds
PRETRAIN_MARKERS = ("checkpoints", "student")
OUT_FLAG = "--output-dir (run.output_dir)"


def default_out_dir(task: Task, model_spec: str, suffix: str = "") -> Path:
    name = Path(model_spec.rstrip("/")).name or "model"
    name = name.replace(":", "_")
    return Path("runs") / "glue" / task.name / f"{name}{suffix}"


def check_output_dir(out: Path, task: Task, mode: str) -> None:
    """Refuse, before any data is read, a directory that holds another task's (or mode's) run
    or a pretraining run: a rerun of the same task replaces it, nothing else may."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{OUT_FLAG}: '{out}' is a file, not a directory; choose another")
    held = None
    for name in (RUN_FILE, RESULTS):
        try:
            held = json.loads((out / name).read_text())
            break
        except (OSError, ValueError):
            continue
    if isinstance(held, dict) and (held.get("task"), held.get("mode", mode)) != (task.name, mode):
        raise UserError(f"{OUT_FLAG}: '{out}' holds a {held.get('mode', '?')} run of "
                        f"{held.get('task')}; this is a {mode} run of {task.name}: choose "
                        "another output directory")
    if any((out / m).exists() for m in PRETRAIN_MARKERS):
        raise UserError(f"{OUT_FLAG}: '{out}' holds a pretraining run; choose another output "
                        "directory")


def setup_runtime(cfg: GlueConfig):
    """Join the launcher's process group (torchrun, deepspeed, accelerate launch) and resolve
    device and precision once; ``parallel.backend=auto`` is ddp under a launcher, else plain."""
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "plain"
    ds = None
    if backend == "deepspeed":
        ds = read_ds_json(cfg.parallel.ds_config, "parallel.ds_config")
    rt = runtime.resolve(engine=engine_class(backend), precision=cfg.train.precision,
                         ds_config=ds)
    return rt, backend, ds


@contextlib.contextmanager
def claimed_runtime(cfg: GlueConfig, out: Path, task: Task, mode: str):
    """The runtime (process group, device, precision), with ``out`` checked and its lock
    taken before any data or model is read: a second run into a busy directory exits 2 at
    once, on every rank (rank 0 takes the lock and tells the others). Both are given back on
    any exit."""
    check_output_dir(out, task, mode)
    d, backend, ds = setup_runtime(cfg)
    lock = None
    try:
        lock = claim_output_dir(out, OUT_FLAG)
        yield d, backend, ds
    finally:
        if lock:
            lock.release()
        d.close()


def start_output_dir(prep: Prepared, cfg: GlueConfig, mode: str, d) -> None:
    """Say what the (locked) directory holds and clear a replaced run's metrics (a rerun of
    the same task must not append to the old one's)."""
    out = prep.out_dir
    if d.is_main:
        for name in ("metrics.jsonl", "tb"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        atomic_write(out / RUN_FILE, json.dumps({"task": prep.task.name, "mode": mode}) + "\n")
        dump_yaml(cfg, out / "config.yaml")


def save_run(out_dir: Path, result: dict, model, prep: Prepared, cfg: GlueConfig) -> None:
    """results.json, and the best epoch's model with its tokenizer (run.save_model), each
    written whole before it replaces the previous one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.run.save_model:
        tmp = out_dir / "model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
        prep.tokenizer.save_pretrained(tmp)
        (tmp / "glue_task.json").write_text(json.dumps(
            {"task": prep.task.name, "num_labels": prep.task.num_labels,
             "metrics": result["metrics"], "source_model": prep.model_name}, indent=2))
        replace_dir(tmp, out_dir / "model")
    write_results(out_dir, result)


def write_results(out_dir: Path, result: dict) -> None:
    atomic_write(out_dir / RESULTS, json.dumps(result, indent=2) + "\n")
