"""``--data``: the trainer's data loader alone, masking included, from prepared shards and
from the streaming path, against what one H100 consumes at the paper's shapes; no models."""
from __future__ import annotations

import os
import tempfile
import time

import torch

from ...config import DataConfig, MaskingConfig
from ...data.loader import BatchLoader
from ...data.stream import is_shard_dir, open_pretrain_stream
from ...data.masking import make_masker
from ...data.shards import PrepareConfig, prepare_shards
from ...errors import UserError
from .common import TEACHER, load_average

# Tokens/s one H100 consumes at the paper's shapes: BERT-base teacher forward + 6-layer student
# forward/backward at seq 512, vocabulary projections at the 15 % masked positions (the
# masked-only objective, the cheapest step) =
# metrics.distill_flops_per_token(BertConfig(), DistilBertConfig(n_layers=6), 512, 0.15)
# = 2·(85.0M weights + 9.4M attention) + 0.15·48.1M head for the teacher, 3x the same for the
# student's 6 layers: ~0.50 GFLOP per token; at 45 % MFU of the H100's bf16 dense peak
# (989 TFLOP/s, SXM datasheet) that is 0.45 · 989e12 / 0.50e9 ~ 0.9M tokens/s per GPU.
# (tests/integration/test_bench.py recomputes it.) The default objective's logits at every
# position (~0.66 GFLOP/token) lower the demand, so this is the figure a loader has to meet.
H100_DEMAND_TOKENS_S = 900_000
DATA_MICRO = 16
DATA_SEQ = 512


def loader_throughput(source: str, tokenizer, seq_len: int = 512, micro: int = 16,
                      seconds: float = 10.0, workers: int = 0, *, shuffle_buffer: int = 1024,
                      prefetch: int = 2, masker=None, encoding_errors: str = "replace",
                      text_field: str = "text") -> float:
    """Tokens per second handed out by the trainer's loader (shards when ``source`` is a shard
    directory, else the stream with ``workers`` tokenizer processes), after the first batch
    (buffer fill, worker start-up). With ``masker`` the batches are also masked in the loader's
    thread, as the trainer has them (``masker(ids, ones, k)``)."""
    cfg = DataConfig(source=source, max_seq_len=seq_len, shuffle_buffer=shuffle_buffer,
                     encoding_errors=encoding_errors, text_field=text_field, prefetch=prefetch)
    stream = open_pretrain_stream(cfg, tokenizer, micro, seed=0, workers=workers)
    loader = BatchLoader(stream, prefetch, transform=None if masker is None else (
        lambda ids, k: masker(ids, torch.ones_like(ids), k)))
    try:
        next(loader)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            next(loader)
            n += 1
        return n * micro * seq_len / (time.perf_counter() - t0)
    finally:
        loader.close()


def data_bench(args, tokenizer, say) -> int:
    """Tokens/s of the trainer's loader at seq 512, micro 16, masking included, on two paths:
    prepared shards (launch/prepare_data.py's format, read by ShardStream) and the streaming
    path (tokenizing in ``--workers`` processes); no models."""
    seq = DATA_SEQ
    if args.seq:
        try:
            seq = int(args.seq)
        except ValueError:
            raise UserError(f"--seq: '{args.seq}'; --data takes one sequence length") from None
    if seq < 16:
        raise UserError(f"--seq: {seq}; use 16 or more")
    if args.workers < 0:
        raise UserError(f"--workers: {args.workers}; must be >= 0")
    if not args.seconds > 0:
        raise UserError(f"--seconds: {args.seconds}; must be > 0")
    if is_shard_dir(args.source):
        raise UserError(f"--source: '{args.source}' is a prepared shard directory; give it as "
                        "--data-dir with the text it was prepared from as --source")
    micro = DATA_MICRO
    say(f"distil-scale bench --data: the trainer's data loader only (no models), seq {seq}, "
        f"micro batch {micro}, {args.seconds:g} s per path, source {args.source}, "
        f"tokenizer {TEACHER}")
    tmp = None
    if args.data_dir:
        out = args.data_dir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-shards-")
        out = tmp.name
    try:
        t0 = time.perf_counter()
        pc = PrepareConfig(source=args.source, tokenizer=TEACHER, seq_len=seq,
                           encoding_errors="replace", seed=args.seed)
        try:
            m = prepare_shards(pc, out, workers=args.workers, say=say)
        except UserError as e:  # prepare_data's flags, as this command spells them
            raise UserError(str(e).replace("--out", "--data-dir")
                            .replace("--seq-len", "--seq")) from None
        say(f"  shards: {m['n_sequences']} sequences of {seq} tokens in '{out}' "
            f"({time.perf_counter() - t0:.1f}s to prepare or open)")

        def measure(source: str, workers: int) -> float:
            masker = make_masker(tokenizer, MaskingConfig(), seed=args.seed)
            return loader_throughput(source, tokenizer, seq_len=seq, micro=micro,
                                     seconds=args.seconds, workers=workers, masker=masker)

        shards = measure(out, 0)
        streaming = measure(args.source, args.workers)
    finally:
        if tmp is not None:
            tmp.cleanup()
    demand = H100_DEMAND_TOKENS_S
    say("")
    say(f"{'path':<11}{'workers':>8}{'tokens/s':>12}  {'masked':<7}vs H100 demand {demand}")
    say("-" * 66)
    for name, workers, rate in (("shards", "-", shards),
                                ("streaming", str(args.workers), streaming)):
        verdict = "meets" if rate >= demand else "MISSES"
        say(f"{name:<11}{workers:>8}{rate:>12.0f}  {'yes':<7}{verdict} ({rate / demand:.2f}x)")
    say("")
    say("  shards: pre-tokenized sequences read from memory-mapped .npy files in the loader's "
        "thread (workers unused); streaming: source -> tokenize in worker processes -> pack "
        "-> shuffle buffer; both masked per micro-batch as the training step does; the first "
        "batch (buffer fill, worker start-up) is not timed")
    load = load_average()
    say(f"  machine load (1-min average) {load:.1f} on {os.cpu_count()} cores")
    say(f"loader tokens/s: shards {shards:.0f}  streaming {streaming:.0f}  "
        f"(H100 paper-shape demand ~{demand})")
    return 0
