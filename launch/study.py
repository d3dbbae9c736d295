"""The paper's ablations in miniature, on real data, on a CPU:

    python launch/study.py [--quick] [--out runs/study] [--steps N] [--seeds N] [--tasks a,b]
        [--max-train N] [--epochs N] [--data-dir GLUE_DIR] [key=value ...]

From the demo teacher: the full recipe, -L_ce, -L_cos, -L_mlm and random init pretrained with
the same steps, then scored on held-out masked-token accuracy and GLUE dev sets beside the
teacher, task-specific distillation and the majority class. Writes study.md and study.png;
finished cells are not run again.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.tools.study import main  # noqa: E402

if __name__ == "__main__":
    main()
