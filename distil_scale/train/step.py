"""One optimizer step, for every loop: pretraining, GLUE fine-tuning, task distillation and
teacher preparation all go through :func:`train_step` on an engine, and sum what they log in
a :class:`Window`."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..engine.base import StepResult
from ..losses import LossWeights, VocabTargets, distillation_loss, mlm_chunk_bounds
from ..runtime import fused_chunk_rows


def distill_step(student, teacher, mb, weights: LossWeights, kl_all: bool, device):
    """Teacher forward (no grad) and student forward; returns (total, raw terms).

    Every selection is a gather by flat row indices the masker computed on the host: no
    boolean indexing, so nothing in the step waits for the device to count positions. Packed
    batches (no padding, known on the host) pass no attention mask: the stock models then
    build none, where an all-ones mask costs a device read per forward to find it is one.
    """
    ids = mb.input_ids.to(device, non_blocking=True)
    packed = mb.real_rows.numel() == mb.input_ids.numel()
    mask = None if packed else mb.attention_mask.to(device, non_blocking=True)
    real = mb.real_rows.to(device, non_blocking=True)
    labels = mb.labels.to(device, non_blocking=True)
    # Vocabulary rows only where a loss reads them: every real token when the KL term covers
    # all of them (the MLM term then reads the masked rows among those), else the masked ones.
    if kl_all:
        positions, mlm_host = real, mb.masked_in_real
    else:
        positions, mlm_host = mb.masked_rows.to(device, non_blocking=True), None
    fused = weights.fused and weights.alpha_mse == 0
    with torch.no_grad():  # not inference_mode: its tensors could not be saved for backward
        t = teacher(ids, mask, positions, logits=not fused)
    if not fused:
        mlm_rows = mlm_host.to(device, non_blocking=True) if kl_all else slice(None)
        s = student(ids, mask, positions)
        return distillation_loss(s, t, labels, real, mlm_rows, weights)
    n = positions.numel()
    if mlm_host is None:  # KL over the masked rows: every row is an MLM row, in order
        mlm_host = torch.arange(n)
    t_weight, t_bias = teacher.projection()
    chunk = fused_chunk_rows(weights.fused_chunk_rows, device)
    vocab = VocabTargets(
        t.head_rows if weights.alpha_ce > 0 else None, t_weight, t_bias, labels,
        mlm_host.to(device, non_blocking=True), mlm_chunk_bounds(mlm_host, n, chunk), chunk,
        weights.temperature, weights.alpha_ce, weights.alpha_mlm, weights.fused_compile)
    s = student(ids, mask, positions, vocab)
    return distillation_loss(s, t, labels, real, None, weights)


@dataclass
class StepOutcome:
    loss: torch.Tensor               # the step's mean micro-batch loss (on the device)
    terms: dict[str, torch.Tensor]   # raw loss terms, averaged over the micro-batches
    result: StepResult               # what the engine's update did
    wait_s: float                    # time spent waiting for batches


def train_step(engine, next_batch: Callable[[], object], accum: int,
               micro_loss: Callable[[object, object], tuple], agree=None) -> StepOutcome | None:
    """``accum`` micro-batches of forward and backward, then the engine's update.

    ``agree`` (the pretraining loop's ``Stop``): ``post()`` after each batch is fetched,
    ``stopped()`` after its backward; when that says stop, the step is abandoned before the
    update and None returned (every rank gets the same answer at the same micro-batch).
    ``micro_loss(module, batch) -> (loss, raw terms)``. The gradient is synchronised on the last
    micro-batch only (the engine's ``accumulate``); nothing here reads a value back from the
    device, so a GPU never waits on the host inside a step.
    """
    terms: dict[str, torch.Tensor] = {}
    total = 0.0
    wait = 0.0
    for i in range(accum):
        t0 = time.perf_counter()
        batch = next_batch()
        wait += time.perf_counter() - t0
        if agree is not None:
            agree.post()
        with engine.accumulate(last=i == accum - 1):
            with engine.autocast():
                loss, raw = micro_loss(engine.module, batch)
            engine.backward(loss)
        if agree is not None and agree.stopped():
            return None
        for k, v in raw.items():
            terms[k] = terms.get(k, 0.0) + v.detach() / accum
        total = total + loss.detach() / accum
    terms["total"] = total
    return StepOutcome(total, terms, engine.step(), wait)


def nonfinite_run(out: StepOutcome, run: int) -> int:
    """Consecutive diverged steps once ``out`` is counted: a finite step ends the run; an fp16
    loss-scale backoff on a finite loss is the scaler calibrating, and does not count."""
    if not out.result.skipped:
        return 0
    return run + out.result.diverged(loss_finite=bool(torch.isfinite(out.loss)))


class Window:
    """Loss terms and timings summed since the last log line."""

    def __init__(self):
        self.last: dict = {}  # the last logged window's losses, for the model card
        self.reset()

    def reset(self) -> None:
        self.terms: dict[str, torch.Tensor] = {}
        self.seconds, self.wait, self.steps = 0.0, 0.0, 0

    def add(self, out: StepOutcome, seconds: float) -> None:
        for k, v in out.terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        self.seconds += seconds
        self.wait += out.wait_s
        self.steps += 1


def mean_over_ranks(terms: dict) -> dict[str, float]:
    """Loss terms averaged over the data-parallel ranks: the global batch's loss, not rank 0's
    share of it (one small all-reduce, at the log interval only)."""
    keys = sorted(terms)
    t = torch.stack([torch.as_tensor(terms[k]).float() for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))
