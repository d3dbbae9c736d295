"""Per-GPU memory plan: python launch/plan.py --ds DS_JSON [--config FILE] --gpu-mem-gib 12

Prints student parameters/gradients/optimizer states under the profile's ZeRO stage and
offload, activations, logits buffers, the teacher, and a last line `fits` or `does not fit`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.errors import main_guard  # noqa: E402
from distil_scale.tools.plan import main  # noqa: E402

if __name__ == "__main__":
    main_guard(main)()
