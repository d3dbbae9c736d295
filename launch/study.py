"""The paper's ablations in miniature, with confidence intervals, on real data, on a CPU:

    python launch/study.py [--quick] [--out DIR] [--seeds N] [--steps N] [--eval-every N]
        [--teacher-steps N] [--draws N] [--probe-train N] [--ft-train N] [--max-eval N]
        [--ft-seeds N] [--with-no-mlm] [--data-dir GLUE_DIR] [key=value ...]

One teacher prepared once; the full recipe, -L_ce, -L_cos and random init pretrained from
several paired seeds; every model scored on the whole held-out set (cross-entropy, accuracy,
KL to the teacher) and an SST-2 probe, beside the teacher, the step-0 control and
DistilBERT(D); paired differences with 95 % intervals. Writes study.md, study.json and
study.png; cells whose settings and code are unchanged are reused.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.tools.study import main  # noqa: E402

if __name__ == "__main__":
    main()
