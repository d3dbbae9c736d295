"""Distillation throughput: python launch/bench.py [--shapes demo|base] [--device cpu|cuda] [--steps N]

Measures the trainer's default step (the fast path) against the original DistilBERT reference
step in one process, on the same data, interleaved, with one row per optimisation; prints a table
and, last, `fast/reference tokens/s: X.XX  peak-mem: Y.YY  MFU: Z.Z%`. See docs/performance.md.

python launch/bench.py --data [--source SRC] [--data-dir DIR] [--workers N] [--seconds S]
measures the data loader alone (seq 512, micro 16, masking included): prepared shards and the
streaming path, last line `loader tokens/s: shards N  streaming M  (H100 paper-shape demand
~900000)`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
