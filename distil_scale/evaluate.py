"""Held-out masked-token evaluation: fixed masks, one loss and accuracy per model.

The same batches score the student at every evaluation and the teacher once, so the numbers
are comparable across steps, runs and resumes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.masking import DynamicMasker


def fixed_eval_batches(eval_ids: torch.Tensor, masker: DynamicMasker, batch: int):
    """Masks drawn once with a fixed seed so every evaluation scores the same positions."""
    out = []
    for i in range(0, len(eval_ids), batch):
        ids = eval_ids[i:i + batch]
        out.append(masker(ids, torch.ones_like(ids), step=-1))
    return out


@torch.no_grad()
def mlm_eval(forward, batches, device, autocast) -> tuple[float, float]:
    """Held-out masked-token loss and accuracy; ``forward(ids, mask, positions) -> logits``."""
    tot_loss, correct, n = 0.0, 0, 0
    for mb in batches:
        with autocast():
            logits = forward(mb.input_ids.to(device), mb.attention_mask.to(device),
                             mb.masked_rows.to(device))
        labels = mb.labels.to(device)
        tot_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        n += labels.numel()
    return tot_loss / max(n, 1), correct / max(n, 1)
