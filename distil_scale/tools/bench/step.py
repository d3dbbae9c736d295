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
"""
from __future__ import annotations

import bisect
import copy
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, get_linear_schedule_with_warmup

from ...config import DataConfig, LossConfig, MaskingConfig, StudentConfig
from ...data.loader import BatchLoader
from ...data.stream import PretrainStream
from ...data.masking import MaskedBatch, make_masker
from ...data.sources import is_heldout, iter_texts, open_from_config
from ...engine import OptimSpec, make_engine
from ...errors import UserError
from ...families import load_mlm
from ...losses import LossWeights
from ...metrics import encoder_flops_per_token, head_flops_per_position
from ...models import build_student, wrap_for_distillation
from ...runtime import resolve_attention, resolve_precision, resolve_teacher_dtype
from ...train import distill_step, train_step
from .common import minor_faults, teacher_path

REFERENCE = "reference, grouped by length"  # the headline's denominator
MEMORY_ROWS = (REFERENCE, "default", "default, unfused loss", "masked-only KL")
SHAPES = {
    "tiny": dict(seqs=[32], micro=4, student_layers=1, steps=2, warmup=1),
    "demo": dict(seqs=[128], micro=16, student_layers=3, steps=6, warmup=1),
    "base": dict(seqs=[128, 512], micro=16, student_layers=6, steps=10, warmup=3),
}


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
    fused_adamw: bool | None = None  # None: the engine's choice (fused)
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
        Variant("default, unfused AdamW", "fused AdamW", fused_adamw=False),
    ]
    if cuda:
        rows += [Variant("default, fp32 teacher", "teacher in half precision",
                         teacher_dtype="fp32"),
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


def build_teacher(setup: Setup):
    """BertForMaskedLM, fp32 on the CPU, eager attention; variants copy and convert it."""
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
    faults: int = 0  # minor page faults during the step (the whole process's)


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
        optim = OptimSpec(lr=5e-4, total_steps=10**6, warmup_steps=10, adam_eps=1e-6,
                          max_grad_norm=5.0)
        self.engine = make_engine("plain", module, optim, precision=self.precision,
                                  accum_steps=1, device=dev, compile=v.compile)
        if v.fused_adamw is False:
            eng = self.engine
            eng.optimizer = torch.optim.AdamW(optim.param_groups(eng.raw_module), lr=optim.lr,
                                              eps=optim.adam_eps, fused=False)
            eng.scheduler = get_linear_schedule_with_warmup(eng.optimizer, optim.warmup_steps,
                                                            optim.total_steps)
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
        f0, t0 = minor_faults(), time.perf_counter()
        out = train_step(self.engine, self._next, 1, self.micro)
        if self.v.item_every_step:
            out.loss.item()
        else:
            self.pending.append(out.loss)  # what the trainer does between log lines
            if len(self.pending) >= 10:
                torch.stack(self.pending).sum().item()
                self.pending.clear()
        seconds, faults = time.perf_counter() - t0, minor_faults() - f0
        mb = self.last
        lengths = mb.attention_mask.sum(1).tolist()
        tokens = int(sum(lengths))
        n_head = tokens if self.v.kl == "all" else mb.masked_rows.numel()
        return StepStats(seconds, out.wait_s, tokens, mb.input_ids.shape[0],
                         mb.input_ids.numel(), self.flops(lengths, n_head), faults)

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

