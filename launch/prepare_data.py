"""Tokenize a corpus once into packed fixed-length shards for pretraining:

    python launch/prepare_data.py --source SRC --tokenizer TOK --out DIR [--seq-len 128]
        [--workers N] [--shard-sequences K] [--config-name C] [--split S] [--text-field F]
        [--heldout-fraction 0.05] [--encoding-errors strict|replace|ignore] [--max-docs N]

then train with data.source=DIR (and data.max_seq_len equal to --seq-len). Re-running the same
command after an interruption continues where it stopped. The demo corpus needs
--encoding-errors replace (one of its files is Latin-1).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distil_scale.data.prepare_cli import main  # noqa: E402

if __name__ == "__main__":
    main()
