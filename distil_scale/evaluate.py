"""Held-out masked-token evaluation: fixed masks, one loss and accuracy per model.

The same batches score the student at every evaluation and the teacher once, so the numbers
are comparable across steps, runs and resumes. :func:`mlm_position_scores` keeps the score of
every masked position (and, given a teacher, KL(teacher || student) there), so a study can sum
them per document and bootstrap over documents; :func:`document_eval_batches` builds such a
set from whole documents with several fixed mask draws.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import families
from .data.masking import DynamicMasker
from .losses import gather_rows


def fixed_eval_batches(eval_ids: torch.Tensor, masker: DynamicMasker, batch: int):
    """Masks drawn once with a fixed seed so every evaluation scores the same positions."""
    out = []
    for i in range(0, len(eval_ids), batch):
        ids = eval_ids[i:i + batch]
        out.append(masker(ids, torch.ones_like(ids), step=-1))
    return out


def document_eval_batches(docs: list[list[int]], masker: DynamicMasker, seq_len: int,
                          cls_id: int, sep_id: int, pad_id: int, batch: int, draws: int = 1):
    """Every document cut into ``[CLS] chunk [SEP]`` rows of at most ``seq_len`` tokens (the
    last row of a document padded), masked ``draws`` times with fixed draws (steps -1, -2,
    ...). Returns (batches, doc_of_row): each batch's masked positions belong to the documents
    ``doc_of_row[masked_rows // seq_len]`` of that batch's rows."""
    body = seq_len - 2
    rows, owner = [], []
    for d, ids in enumerate(docs):
        for i in range(0, len(ids), body):
            rows.append([cls_id, *ids[i:i + body], sep_id])
            owner.append(d)
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, toks in enumerate(rows):
        ids[r, :len(toks)] = torch.tensor(toks)
        mask[r, :len(toks)] = 1
    owner = np.asarray(owner, dtype=np.int64)
    batches, doc_of = [], []
    for k in range(1, draws + 1):
        for i in range(0, len(rows), batch):
            batches.append(masker(ids[i:i + batch], mask[i:i + batch], step=-k))
            doc_of.append(owner[i:i + batch])
    return batches, doc_of


def masked_lm_forward(mlm):
    """``forward(ids, mask, positions) -> logits`` at the masked positions of a stock masked
    LM, without vocabulary logits anywhere else."""
    def forward(ids, mask, positions):
        hidden = families.encode(mlm, ids, mask)[0]
        return families.head_logits(mlm, gather_rows(hidden, positions))
    return forward


@torch.no_grad()
def mlm_position_scores(forward, batches, device, autocast, teacher=None) -> dict:
    """Per masked position (in batch order): ``ce`` (cross-entropy, nats), ``correct`` (0/1)
    and, with ``teacher`` (a forward of the same signature), ``kl`` = KL(teacher || student) at
    temperature 1, as float64 numpy arrays."""
    ce, correct, kl = [], [], []
    for mb in batches:
        args = (mb.input_ids.to(device), mb.attention_mask.to(device), mb.masked_rows.to(device))
        with autocast():
            logits = forward(*args)
            t_logits = teacher(*args) if teacher is not None else None
        labels = mb.labels.to(device)
        logp = F.log_softmax(logits.float(), dim=-1)
        ce.append(F.nll_loss(logp, labels, reduction="none").double().cpu())
        correct.append((logits.argmax(-1) == labels).double().cpu())
        if t_logits is not None:
            t_logp = F.log_softmax(t_logits.float(), dim=-1)
            kl.append((t_logp.exp() * (t_logp - logp)).sum(-1).double().cpu())
    out = {"ce": torch.cat(ce).numpy() if ce else np.zeros(0),
           "correct": torch.cat(correct).numpy() if correct else np.zeros(0)}
    if teacher is not None:
        out["kl"] = torch.cat(kl).numpy() if kl else np.zeros(0)
    return out


def mlm_eval(forward, batches, device, autocast) -> tuple[float, float]:
    """Held-out masked-token loss and accuracy; ``forward(ids, mask, positions) -> logits``."""
    s = mlm_position_scores(forward, batches, device, autocast)
    n = max(len(s["ce"]), 1)
    return float(s["ce"].sum()) / n, float(s["correct"].sum()) / n
