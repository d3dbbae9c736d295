#!/usr/bin/env python
"""GLUE runs as a markdown table beside the paper's BERT-base and DistilBERT, plus a bar chart.

    python launch/report.py runs/glue/rte/minilm runs/glue/sst2/minilm ... [--out DIR]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.errors import main_guard  # noqa: E402
from distil_scale.glue.report import report_main  # noqa: E402

if __name__ == "__main__":
    main_guard(report_main)()
