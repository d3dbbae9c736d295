"""An offline install for an air-gapped GPU node, in one folder:
python launch/bundle.py --out DIR [--python-version 3.12] [--platform TAG ...] [--have PKG,...]

Writes the wheels the node lacks (this package included; pure-Python wheels built here from
sdists such as deepspeed), the tokenizer files the checks need and DIR/install.sh, which installs
them with no package index. On the node: ``sh DIR/install.sh`` then ``python launch/gpu_check.py``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.errors import main_guard  # noqa: E402
from distil_scale.tools.bundle import main  # noqa: E402

if __name__ == "__main__":
    main_guard(main)()
