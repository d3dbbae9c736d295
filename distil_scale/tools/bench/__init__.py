"""The bench: ``launch/bench.py`` (``cli``) and its three measurements.

- ``step``, ``peak_memory``, ``run``, ``report``: the distillation step, the trainer's default
  against the original DistilBERT reference, one row per optimisation (the default mode);
- ``data``: the data loader alone (``--data``);
- ``inference``: teacher vs student inference, the paper's Table 3 (``--inference``).

The names below are the bench's public surface (the launcher, the console script and the tests
reach them through ``distil_scale.tools.bench``).
"""
from .cli import main, parse_args, parse_seqs
from .common import SOURCE, TEACHER
from .data import DATA_MICRO, DATA_SEQ, H100_DEMAND_TOKENS_S, data_bench, loader_throughput
from .inference import inference_bench, stsb_pairs
from .step import (REFERENCE, SHAPES, Runner, Setup, Variant, build_teacher, grouped_order,
                   natural_rows, reference_loss, variants)

__all__ = ["DATA_MICRO", "DATA_SEQ", "H100_DEMAND_TOKENS_S", "REFERENCE", "SHAPES", "SOURCE",
           "TEACHER", "Runner", "Setup", "Variant", "build_teacher", "data_bench",
           "grouped_order", "inference_bench", "loader_throughput", "main", "natural_rows",
           "parse_args", "parse_seqs", "reference_loss", "stsb_pairs", "variants"]
