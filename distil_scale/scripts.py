"""Console scripts (pyproject's [project.scripts]): each runs what its launch/*.py runs, with
the same one-line errors.

Each command's module is imported by name when the command runs, not at the top: this module
is imported for every console script, and importing all of them would load the bench, the GLUE
runner and DeepSpeed's world for ``distil-plan --help``.
"""
from __future__ import annotations

import importlib

from .errors import main_guard


def _run(module: str, fn: str, guarded: bool = False) -> None:
    """``guarded``: the function is a ``main_guard``-wrapped main already (it exits itself)."""
    main = getattr(importlib.import_module(f"distil_scale.{module}"), fn)
    if guarded:
        main()
    else:
        main_guard(main)()


def finetune() -> None:
    _run("glue.cli", "finetune_main")


def distill_task() -> None:
    _run("glue.cli", "distill_main")


def report() -> None:
    _run("glue.report", "report_main")


def plan() -> None:
    _run("tools.plan", "main")


def gpu_check() -> None:
    _run("tools.gpu_check", "main")


def bench() -> None:
    _run("tools.bench", "main", guarded=True)


def study() -> None:
    _run("tools.study", "main", guarded=True)


def prepare_data() -> None:
    _run("data.prepare_cli", "main", guarded=True)
