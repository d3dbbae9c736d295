#!/usr/bin/env python
"""Task-specific distillation from a fine-tuned teacher.

    python launch/distill_task.py --task rte --teacher runs/glue/rte/bert/model \\
        --student init:teacher-layers --data-dir ../shared/data/glue [key=value ...]

loss = distill.alpha * KL(T) * T^2 + (1 - distill.alpha) * CE (+ distill.alpha_cos * cosine).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.errors import main_guard  # noqa: E402
from distil_scale.glue.cli import distill_main  # noqa: E402

if __name__ == "__main__":
    main_guard(distill_main)()
