"""Scoring a GLUE model: predictions (each rank scores a strided slice of the rows and the
predictions are gathered, so every rank sees the same metric), the task's metrics on a split,
and their one-line form with the majority-class baseline beside them."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import metrics as M
from .batches import model_inputs
from .config import GlueConfig
from .tasks import Task


def predict(model, rows: list[dict], collate, d, batch_size: int, regression: bool) -> list:
    """Predictions for every row, in order; each rank scores rows rank, rank+world, ..."""
    mine = list(range(d.rank, len(rows), d.world))
    preds = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(mine), batch_size):
            batch = collate([rows[j] for j in mine[i:i + batch_size]])
            batch.pop("labels")
            batch = {k: v.to(d.device) for k, v in batch.items()}
            with d.autocast():
                logits = model(**model_inputs(model, batch)).logits.float()
            preds += (logits[:, 0] if regression else logits.argmax(-1)).tolist()
    model.train()
    if d.world == 1:
        return preds
    gathered = [None] * d.world
    dist.all_gather_object(gathered, list(zip(mine, preds)))
    out = [None] * len(rows)
    for part in gathered:
        for j, p in part:
            out[j] = p
    return out


def score(task: Task, split: str, model, rows, collate, d, cfg: GlueConfig) -> dict:
    preds = predict(model, rows, collate, d, cfg.train.eval_batch_size, task.is_regression)
    return M.compute(M.split_metric_names(task, split), preds, [r["labels"] for r in rows])


def fmt_metrics(values: dict, baseline: Optional[dict] = None) -> str:
    parts = []
    for k, v in values.items():
        s = f"{k} {v:.3f}"
        if baseline and k in baseline:
            s += f" (majority {baseline[k]:.3f})"
        parts.append(s)
    return "  ".join(parts)
