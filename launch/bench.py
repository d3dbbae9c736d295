"""Distillation throughput: python launch/bench.py [--shapes demo|base] [--device cpu|cuda] [--steps N]

Measures the trainer's default step against the original DistilBERT reference step in one
process, on the same data, interleaved, with one row per optimisation; prints a table and, last,
`default/reference tokens/s: X.XX  peak-mem: Y.YY  MFU: Z.Z%  (reference grouped by length)`.
On a CPU the ratio depends on how large tensors get their pages (glibc's malloc settings,
THP_MEM_ALLOC_ENABLE): see docs/performance.md.

python launch/bench.py --data [--source SRC] [--data-dir DIR] [--workers N] [--seconds S]
measures the data loader alone (seq 512, micro 16, masking included): prepared shards and the
streaming path, last line `loader tokens/s: shards N  streaming M  (H100 paper-shape demand
~900000)`.

python launch/bench.py --inference [--teacher DIR --student DIR] [--limit N] [--batch 32]
[--device cpu|cuda] [--glue-dir DIR] is the paper's Table 3: teacher and student forward passes
(eval, inference mode) over the STS-B dev pairs at batch 1 and batch 32, interleaved; by default
bert-base and 6-layer DistilBERT shapes with random weights; a table (params, batch-1 pass
seconds, sentences/s at both batch sizes) beside the paper's figures, last line
`student/teacher: params 0.61  batch-1 speed X.XXx  batch-32 speed Y.YYx`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.tools.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
