"""Dynamic masking: a fresh mask every time a sequence is used, from a seeded generator.

As in the DistilBERT release, targets are sampled without replacement with weights
~ count^-smoothing (XLM-style smoothing; uniform when 0), then 80/10/10 mask/keep/random;
ceil(p * n_tokens) targets per sequence, so every micro-batch of packed sequences carries the
same number and per-micro-batch means average to the global mean. Special tokens and padding
are never targets.
"""
from __future__ import annotations

import math
import struct
import zlib
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
                 smoothing: float = 0.0, seed: int = 0):
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
        self.seed = seed
        self.gen = torch.Generator()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 step: int = 0) -> MaskedBatch:
        ids = input_ids.clone()
        positions = torch.zeros_like(ids, dtype=torch.bool)
        for row in range(ids.shape[0]):
            self._mask_row(ids[row], attention_mask[row], positions[row], step)
        return MaskedBatch(ids, attention_mask, positions, input_ids[positions])

    def _mask_row(self, ids: torch.Tensor, att: torch.Tensor, positions: torch.Tensor,
                  step: int) -> None:
        # The generator is seeded from (seed, step, the sequence's tokens): a sequence gets the
        # same mask at the same step whatever the micro-batching, rank count or resume point,
        # so accumulation and data parallelism reproduce one big batch exactly; the step makes
        # the mask new each time the sequence comes back (dynamic masking).
        # (CPU generators keep only the low 32 bits of a seed: mix everything into those)
        key = zlib.crc32(struct.pack("<qq", self.seed, step))
        self.gen.manual_seed(zlib.crc32(ids.numpy().tobytes(), key))
        weight = self.token_weight[ids] * att.float()
        n_tgt = min(int((weight > 0).sum()), math.ceil(self.mlm_prob * int(att.sum())))
        if n_tgt == 0:
            return
        tgt = torch.multinomial(weight, n_tgt, replacement=False, generator=self.gen)
        positions[tgt] = True
        # 0 = [MASK], 1 = keep, 2 = random token
        how = torch.multinomial(self.pred_probs, n_tgt, replacement=True, generator=self.gen)
        new = ids[tgt].clone()
        new[how == 0] = self.mask_id
        n_rand = int((how == 2).sum())
        if n_rand:
            pick = torch.randint(len(self.random_pool), (n_rand,), generator=self.gen)
            new[how == 2] = self.random_pool[pick]
        ids[tgt] = new

    # Masks are a pure function of (seed, step, tokens): nothing to carry across a resume.
    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        self.seed = sd["seed"]

