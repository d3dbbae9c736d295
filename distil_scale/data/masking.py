"""Dynamic masking: a fresh mask for every batch, drawn from a seeded generator per rank.

Follows the DistilBERT release: exactly ceil(p * n_tokens) targets per batch sampled without
replacement (weights ~ count^-smoothing with XLM-style smoothing, uniform otherwise), then
80/10/10 mask/random/keep. Special tokens and padding are never targets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor       # (B, L) with masks applied
    attention_mask: torch.Tensor  # (B, L)
    positions: torch.Tensor       # (B, L) bool: where the MLM loss reads
    labels: torch.Tensor          # (n_masked,) original tokens at ``positions`` (row-major)


class DynamicMasker:
    def __init__(self, vocab_size: int, special_ids: list[int], mask_id: int, *,
                 mlm_prob: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1,
                 keep_frac: float = 0.1, token_counts: torch.Tensor | None = None,
                 smoothing: float = 0.0, seed: int = 0, rank: int = 0):
        self.mask_id = mask_id
        self.mlm_prob = mlm_prob
        self.pred_probs = torch.tensor([mask_frac, keep_frac, random_frac], dtype=torch.float)
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[torch.tensor(special_ids, dtype=torch.long)] = True
        # per-token selection weight; smoothing makes rare tokens likelier targets
        w = torch.ones(vocab_size, dtype=torch.float)
        if smoothing > 0:
            if token_counts is None:
                raise ValueError("frequency smoothing needs token counts")
            w = torch.clamp(token_counts.float(), min=1.0) ** -smoothing
        w[self.special] = 0.0
        self.token_weight = w
        # random replacements come from ordinary tokens only
        self.random_pool = torch.nonzero(~self.special).squeeze(1)
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank + 17)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> MaskedBatch:
        ids = input_ids.clone()
        flat = ids.view(-1)
        weight = self.token_weight[flat] * attention_mask.view(-1).float()
        n_candidates = int((weight > 0).sum())
        n_tgt = min(n_candidates, math.ceil(self.mlm_prob * int(attention_mask.sum())))
        positions = torch.zeros_like(flat, dtype=torch.bool)
        if n_tgt > 0:
            tgt = torch.multinomial(weight, n_tgt, replacement=False, generator=self.gen)
            positions[tgt] = True
        labels = flat[positions].clone()
        # 0 = [MASK], 1 = keep, 2 = random token
        how = torch.multinomial(self.pred_probs, labels.numel(), replacement=True,
                                generator=self.gen) if labels.numel() else labels
        new = labels.clone()
        new[how == 0] = self.mask_id
        n_rand = int((how == 2).sum())
        if n_rand:
            pick = torch.randint(len(self.random_pool), (n_rand,), generator=self.gen)
            new[how == 2] = self.random_pool[pick]
        flat[positions] = new
        return MaskedBatch(ids, attention_mask, positions.view_as(ids), labels)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.gen.set_state(sd["gen"])

