"""``--inference``: the paper's Table 3, teacher and student forward passes (eval, inference
mode) over the STS-B dev sentence pairs at batch 1 and at ``--batch``, interleaved."""
from __future__ import annotations

import importlib.util
import inspect
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification)

from ...errors import UserError, first_line
from ...glue.data import read_tsv
from ...glue.tasks import get_task
from ...hub import resolve_model_path
from ...models import count_params
from .common import load_average, thread_warning

# DistilBERT paper, Table 3: "a full pass of GLUE task STS-B on CPU with a batch size of 1":
# (model, params in millions, seconds)
PAPER_TABLE3 = {"teacher": ("BERT-base", 110, 668), "student": ("DistilBERT", 66, 410)}
# <repo>/../shared/data/glue (this file is <repo>/distil_scale/tools/bench/inference.py)
GLUE_DIR = str(Path(os.path.abspath(__file__)).parents[4] / "shared" / "data" / "glue")
INFER_WARMUP = 8  # untimed batch-1 forwards per model (and 2 at the large batch size)


def stsb_pairs(glue_dir: str, limit: int = 0) -> list[tuple[str, str]]:
    """The STS-B dev sentence pairs (1,500), in file order; the first ``limit`` when > 0."""
    task = get_task("stsb")
    path = os.path.join(glue_dir, task.dir_name, "dev.tsv")
    if not os.path.isfile(path):
        raise UserError(f"--glue-dir: no '{path}' (expected the original GLUE layout "
                        "<glue-dir>/STS-B/dev.tsv, e.g. --glue-dir ../shared/data/glue)")
    pairs = [(e.text_a, e.text_b) for e in read_tsv(task, path, "dev")]
    return pairs[:limit] if limit > 0 else pairs


def inference_model(role: str, path: str, attn: str, device: torch.device, dtype: torch.dtype,
                    min_vocab: int):
    """(model in eval mode on ``device``, one-line description). No path: the paper's shapes
    with random weights (speed does not depend on weight values): bert-base for the teacher, a
    6-layer DistilBERT for the student; a path: that checkpoint with a sequence-classification
    head (random where it has none). One regression output, as STS-B."""
    if not path:
        if role == "teacher":
            model = BertForSequenceClassification(BertConfig(num_labels=1,
                                                             attn_implementation=attn))
            what = "BERT-base shapes, BertForSequenceClassification(BertConfig()), random weights"
        else:
            model = DistilBertForSequenceClassification(DistilBertConfig(
                n_layers=6, num_labels=1, attn_implementation=attn))
            what = ("DistilBERT shapes, DistilBertForSequenceClassification("
                    "DistilBertConfig(n_layers=6)), random weights")
    else:
        local = resolve_model_path(path)
        try:
            cfg = AutoConfig.from_pretrained(local)
        except (OSError, ValueError) as e:
            raise UserError(f"--{role}: cannot load '{path}' "
                            f"({first_line(e, 160)})") from None
        if getattr(cfg, "vocab_size", 0) < min_vocab:
            raise UserError(f"--{role}: '{path}' has a {cfg.vocab_size}-token vocabulary; the "
                            f"bench tokenizes with the {min_vocab}-token BERT uncased one")
        model = AutoModelForSequenceClassification.from_pretrained(
            local, num_labels=1, attn_implementation=attn)
        c = model.config
        layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", "?")
        width = getattr(c, "hidden_size", None) or getattr(c, "dim", "?")
        what = f"{type(model).__name__}, {layers} layers x {width}, from '{path}'"
    return model.to(device=device, dtype=dtype).eval(), what


def _feeds(model, encs: list[dict], batch: int, pad_id: int, device: torch.device) -> list[dict]:
    """Input dicts for ``model``: ``batch`` pairs each, padded to the batch's longest."""
    keys = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        keys.append("token_type_ids")
    out = []
    for i in range(0, len(encs), batch):
        chunk = encs[i:i + batch]
        L = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), L), dtype=torch.long)
        tt = torch.zeros((len(chunk), L), dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[j, :n] = torch.tensor(e["input_ids"])
            att[j, :n] = 1
            tt[j, :n] = torch.tensor(e["token_type_ids"])
        full = {"input_ids": ids, "attention_mask": att, "token_type_ids": tt}
        out.append({k: full[k].to(device) for k in keys})
    return out


def timed_passes(models: list, feeds: list[list[dict]], sync, progress=None) -> list[float]:
    """One pass over every batch for every model, interleaved batch by batch (the order
    alternating, so neither model always runs on the other's warm caches); each model's summed
    forward seconds. Load that comes and goes during the run hits both models alike.
    ``progress(done, total)`` is called after each quarter of a pass of 100 batches or more."""
    totals = [0.0] * len(models)
    idx = list(range(len(models)))
    nb = len(feeds[0])
    marks = {nb * q // 4 for q in (1, 2, 3)} if progress is not None and nb >= 100 else set()
    with torch.inference_mode():
        for b in range(nb):
            if b in marks:
                progress(b, nb)
            for j in (idx if b % 2 == 0 else idx[::-1]):
                sync()
                t0 = time.perf_counter()
                models[j](**feeds[j][b])
                sync()
                totals[j] += time.perf_counter() - t0
    return totals



def inference_bench(args, tokenizer, say) -> int:
    """The paper's Table 3: teacher and student forward passes (eval, inference mode) over the
    STS-B dev pairs at batch 1 and at ``--batch`` (padded to the batch's longest), interleaved;
    tokenization and host-to-device copies are done before the timing."""
    if args.limit < 0:
        raise UserError(f"--limit: {args.limit}; must be >= 0 (0: the whole dev set)")
    if args.batch < 1:
        raise UserError(f"--batch: {args.batch}; must be >= 1")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    attn = "sdpa" if cuda else "eager"  # the trainer's choice: eager measured faster on CPU
    dname = args.dtype if args.dtype != "auto" else ("bf16" if cuda else "fp32")
    if dname != "fp32" and not cuda:
        raise UserError(f"--dtype {dname}: fp32 only on CPU")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dname]
    every = stsb_pairs(args.glue_dir)
    pairs = every[:args.limit] if args.limit else every
    n = len(pairs)
    load0 = load_average()
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    models, whats = [], []
    for role, path in (("teacher", args.teacher), ("student", args.student)):
        m, what = inference_model(role, path, attn, device, dtype, len(tokenizer))
        models.append(m)
        whats.append(what)
    max_len = min(512, *(getattr(m.config, "max_position_embeddings", 512) for m in models))
    encs = [tokenizer(a, b, truncation=True, max_length=max_len) for a, b in pairs]
    lens = [len(e["input_ids"]) for e in encs]
    say(f"distil-scale bench --inference: STS-B dev, "
        f"{f'the first {n} of {len(every)}' if n < len(every) else f'all {n}'} sentence pairs "
        f"(tokens per pair: mean {statistics.mean(lens):.1f}, max {max(lens)}), device {device}, "
        f"{dname}, {attn} attention, eval + inference_mode, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
    for role, what in zip(("teacher", "student"), whats):
        say(f"  {role}: {what}")
    thread_warning(device, say)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    b1 = [_feeds(m, encs, 1, tokenizer.pad_token_id, device) for m in models]
    bb = [_feeds(m, encs, args.batch, tokenizer.pad_token_id, device) for m in models]
    warm = [[f[i % len(f)] for i in range(INFER_WARMUP)] for f in b1]
    timed_passes(models, warm, sync)
    timed_passes(models, [[f[i % len(f)] for i in range(2)] for f in bb], sync)
    say(f"  warm-up: {INFER_WARMUP} batch-1 and 2 batch-{args.batch} forwards per model")
    t0 = time.perf_counter()
    s1 = timed_passes(models, b1, sync, lambda d, t: say(
        f"  batch 1: {d}/{t} pairs, {time.perf_counter() - t0:.0f}s"))
    say(f"  batch 1: {n} forwards per model, interleaved, {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    sb = timed_passes(models, bb, sync)
    say(f"  batch {args.batch}: {len(bb[0])} forwards per model (padded to each batch's "
        f"longest), interleaved, {time.perf_counter() - t0:.0f}s")
    load1 = load_average()
    params = [count_params(m) / 1e6 for m in models]
    colb = f"sent/s b{args.batch}"
    say("")
    head = (f"{'model':<9}{'params (M)':>11}{f'batch-1 pass s ({n})':>22}{'sent/s b1':>11}"
            f"{colb:>12}")
    say(head)
    say("-" * len(head))
    for role, p, t1, tb in zip(("teacher", "student"), params, s1, sb):
        say(f"{role:<9}{p:>11.2f}{t1:>22.2f}{n / t1:>11.1f}{n / tb:>12.1f}")
    say("")
    (tn, tp, ts), (sn, sp, ss) = PAPER_TABLE3["teacher"], PAPER_TABLE3["student"]
    say(f"paper (Table 3, CPU, batch 1, full STS-B pass): {tn} {tp}M {ts} s, {sn} {sp}M {ss} s "
        f"-> student/teacher params {sp / tp:.2f}, batch-1 speed {ts / ss:.2f}x "
        "(40 % smaller, 60 % faster)")
    say("  times are forward passes only (tokenization and copies to the device done before); "
        "each model's time is the sum of its forwards, the two models alternating batch by "
        "batch in one process")
    say(f"  machine load (1-min average) {load0:.1f} -> {load1:.1f} on {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, {time.perf_counter() - t_start:.0f}s")
    have_onnx = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
    say("  ONNX: not timed ("
        + ("onnx and onnxruntime are importable, but this bench times PyTorch only)"
           if have_onnx else "onnx/onnxruntime not installed; optional)"))
    say(f"student/teacher: params {params[1] / params[0]:.2f}  batch-1 speed "
        f"{s1[0] / s1[1]:.2f}x  batch-{args.batch} speed {sb[0] / sb[1]:.2f}x")
    return 0

