"""Everything that needs a GPU, in one command: python launch/gpu_check.py [--out FILE]

Trains a few steps on every backend (plain, DDP x1 and FSDP2 x1 on a one-rank NCCL group,
DeepSpeed with each shipped profile; the RTX 4070 profile at micro-batch 16 under a 12 GiB cap;
save-reload-continue; torch.compile) at BERT-base teacher / 6-layer student shapes, compares
memory with launch/plan.py, runs launch/bench.py and the ZeRO-2 accumulation check, in order of
value within --budget (default 400 s), and rewrites one report after every part (default
docs/gpu-check-<device>-<date>.md, logs beside it). Needs only the checkout and the bundle of
launch/bundle.py. Without CUDA it prints why it skipped and exits 0; --cpu-smoke runs the same
steps on the CPU at tiny shapes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.errors import main_guard  # noqa: E402
from distil_scale.tools.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    main_guard(main)()
