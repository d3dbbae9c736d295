"""Distillation throughput: python launch/bench.py [--shapes demo|base] [--device cpu|cuda] [--steps N]

Measures the trainer's default step (the fast path) against the original DistilBERT reference
step in one process, on the same data, interleaved, with one row per optimisation; prints a table
and, last, `fast/reference tokens/s: X.XX  peak-mem: Y.YY  MFU: Z.Z%`. See docs/performance.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
