#!/usr/bin/env python
"""Fine-tune a checkpoint on one GLUE task.

    python launch/finetune.py --task rte --model DIR_OR_HUB_ID --data-dir ../shared/data/glue \\
        [--config FILE] [--seeds 5] [--protocol dev|carved] [--output-dir DIR] [key=value ...]

Also under torchrun: OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 launch/finetune.py ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.errors import main_guard  # noqa: E402
from distil_scale.glue.cli import finetune_main  # noqa: E402

if __name__ == "__main__":
    main_guard(finetune_main)()
