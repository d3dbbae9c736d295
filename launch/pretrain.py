"""Distillation pretraining: python launch/pretrain.py [--config FILE] [--ds DS_JSON] [key=value ...]

Also the target of `deepspeed launch/pretrain.py --ds ds_configs/rtx4070.json` and
`torchrun --nproc_per_node N launch/pretrain.py parallel.backend=ddp`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.pretrain_cli import main  # noqa: E402

if __name__ == "__main__":
    main()
