"""One command that checks a CUDA machine end to end: ``python launch/gpu_check.py``.

A GPU is lent to only some tasks, so everything that needs one is gathered here and runs
offline on a bare node that has only the checkout and the bundle of launch/bundle.py, within a
time budget (default 400 s, 7 minutes with start-up and DeepSpeed's CPU-op build):

1. every backend (plain, DDP x1 and FSDP2 x1 on a one-rank NCCL group, DeepSpeed with each
   shipped profile) trains a few steps of the paper recipe (configs/paper.yaml) at BERT-base
   teacher / 6-layer student shapes (random weights, seq 512) through the real launchers; the
   RTX 4070 profile also at its real micro-batch (16) under a 12 GiB allocator cap; a
   save-reload-continue run and a ``torch.compile`` run; each run's memory, MFU, data wait and
   fp16 loss scale are read back from its metrics.jsonl and set beside launch/plan.py's plan;
2. ``launch/bench.py`` with its default rows (fused and unfused loss);
3. DeepSpeed ZeRO-2's gradient accumulation is checked numerically under each profile's
   ``zero_optimization``/``data_types`` sections (``zero_grad_accum_error``).

Parts run in order of value; what the budget leaves no room for is reported "skipped
(budget)", never failed. Every part is guarded (an exception fails that part, the rest goes on)
and the markdown report (docs/gpu-check-<device>-<date>.md, or --out) is rewritten after each
one, the runs' logs kept beside it. Without CUDA it prints one line and exits 0;
``--cpu-smoke`` runs the same orchestration on the CPU at tiny shapes so that the code is

The package: ``spec`` (what runs: shapes, cases, results), ``proc`` (the subprocesses: their
environment, logs, timeouts, DeepSpeed's op build), ``inputs`` (the random teacher and the
text), ``case`` (one backend run), ``zero`` (the ZeRO accumulation check), ``report`` (the
markdown) and ``cli`` (the parts in order, within the budget).
"""
from .cli import main

__all__ = ["main"]
