"""GLUE examples as model inputs: tokenized rows, the collate that pads a batch to its longest
row, and the batch keys a model's ``forward`` takes."""
from __future__ import annotations

import inspect

import torch

from .data import Example


def encode(tokenizer, examples: list[Example], max_length: int) -> list[dict]:
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": ex.label}
            for i, ex in enumerate(examples)]


def make_collate(pad_id: int, regression: bool):
    def collate(rows: list[dict]) -> dict:
        n = max(len(r["input_ids"]) for r in rows)  # pad to the batch's longest, not to 128
        out = {}
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            if k in rows[0]:
                fill = pad_id if k == "input_ids" else 0
                out[k] = torch.tensor([r[k] + [fill] * (n - len(r[k])) for r in rows])
        out["labels"] = torch.tensor([r["labels"] for r in rows],
                                     dtype=torch.float if regression else torch.long)
        return out

    return collate


def model_inputs(model, batch: dict) -> dict:
    """The batch minus what ``model.forward`` does not take (DistilBERT: token_type_ids)."""
    inner = getattr(model, "module", model)
    keys = getattr(inner, "_glue_forward_keys", None)
    if keys is None:
        keys = set(inspect.signature(inner.forward).parameters)
        inner._glue_forward_keys = keys
    return {k: v for k, v in batch.items() if k in keys}
