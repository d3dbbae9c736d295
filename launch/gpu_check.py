"""Everything that needs a GPU, in one command: python launch/gpu_check.py [--quick] [--out FILE]

Trains a few steps on every backend (plain, DDP x1, FSDP2 x1, DeepSpeed with each shipped
profile) at BERT-base teacher / 6-layer student shapes in bf16 and fp16, compares peak memory
with launch/plan.py, checks ZeRO-2 gradient accumulation precision, runs
`launch/bench.py --shapes base --device cuda`, and writes docs/gpu-check-<device>-<date>.md.
Without CUDA it prints why it skipped and exits 0; --cpu-smoke runs the same steps on the CPU
at tiny shapes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.errors import main_guard  # noqa: E402
from distil_scale.tools.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    main_guard(main)()
