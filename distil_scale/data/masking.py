"""Dynamic masking: a fresh mask every time a sequence is used, from a seeded generator.

As in the DistilBERT release, targets are sampled without replacement with weights
~ count^-smoothing (XLM-style smoothing; uniform when 0), then 80/10/10 mask/keep/random;
ceil(p * n_tokens) targets per sequence, so every micro-batch of packed sequences carries the
same number and per-micro-batch means average to the global mean. Special tokens and padding
are never targets.

The batch is masked with numpy in one pass (only the per-row random draws are per row) and
comes back with flat row indices: the training step gathers ``hidden.flatten(0, 1)[rows]``
with an index whose size is known on the host, where boolean indexing would make the device
report how many positions it selected (a synchronisation per micro-step).
"""
from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor       # (B, L) with masks applied
    attention_mask: torch.Tensor  # (B, L)
    positions: torch.Tensor       # (B, L) bool: where the MLM loss reads
    labels: torch.Tensor          # (n_masked,) original tokens at ``positions`` (row-major)
    masked_rows: torch.Tensor     # (n_masked,) flat indices into B*L of ``positions``
    real_rows: torch.Tensor       # (n_real,) flat indices of the non-padding tokens
    masked_in_real: torch.Tensor  # (n_masked,) where each masked row sits in ``real_rows``

    def pin_memory(self) -> "MaskedBatch":
        """Page-locked copies, so the host-to-GPU copies can be asynchronous."""
        return MaskedBatch(*(t.pin_memory() for t in self.__dict__.values()))


class DynamicMasker:
    def __init__(self, vocab_size: int, special_ids: list[int], mask_id: int, *,
                 mlm_prob: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1,
                 keep_frac: float = 0.1, token_counts: torch.Tensor | None = None,
                 smoothing: float = 0.0, seed: int = 0):
        self.mask_id = mask_id
        self.mlm_prob = mlm_prob
        # a target becomes [MASK] below the first edge, keeps its token below the second, else
        # a random token
        self.how_edges = np.array([mask_frac, mask_frac + keep_frac])
        special = np.zeros(vocab_size, dtype=bool)
        special[np.asarray(special_ids, dtype=np.int64)] = True
        # per-token selection weight; smoothing makes rare tokens likelier targets
        w = np.ones(vocab_size, dtype=np.float64)
        if smoothing > 0:
            if token_counts is None:
                raise ValueError("frequency smoothing needs token counts")
            counts = np.asarray(token_counts, dtype=np.float64)[:vocab_size]
            w = np.maximum(counts, 1.0) ** -smoothing
        w[special] = 0.0
        self.weight = w
        # random replacements come from ordinary tokens only
        self.random_pool = np.flatnonzero(~special)
        self.seed = seed

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 step: int = 0) -> MaskedBatch:
        ids = input_ids.numpy()
        real = attention_mask.numpy().astype(bool)
        B, L = ids.shape
        w = self.weight[ids] * real
        n_tgt = np.minimum((w > 0).sum(1),
                           np.ceil(self.mlm_prob * real.sum(1)).astype(np.int64))
        # Each row's draws come from a generator seeded by (seed, step, the row's tokens): a
        # sequence gets the same mask at the same step whatever the micro-batching, rank count
        # or resume point, so accumulation and data parallelism reproduce one big batch
        # exactly; the step makes the mask new each time the sequence comes back.
        key = zlib.crc32(struct.pack("<qq", self.seed, step))
        u = np.empty((B, L))
        how_u = np.empty((B, L))
        pick = np.empty((B, L), dtype=np.int64)
        for i in range(B):
            g = np.random.default_rng([key, zlib.crc32(ids[i].tobytes())])
            u[i] = g.random(L)
            how_u[i] = g.random(L)
            pick[i] = g.integers(len(self.random_pool), size=L)
        # Weighted sampling without replacement (Efraimidis & Spirakis 2006): the n_tgt
        # positions with the largest log(u) / w, which draws exactly what sequential
        # multinomial draws without replacement would, for the whole batch at once.
        with np.errstate(divide="ignore"):
            keys = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)
        order = np.argsort(-keys, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(L)[None, :].repeat(B, 0), axis=1)
        selected = rank < n_tgt[:, None]
        how = np.searchsorted(self.how_edges, how_u, side="right")  # 0 mask, 1 keep, 2 random
        new = ids.copy()
        new[selected & (how == 0)] = self.mask_id
        rand = selected & (how == 2)
        new[rand] = self.random_pool[pick[rand]]
        masked_rows = np.flatnonzero(selected)
        real_rows = np.flatnonzero(real)
        return MaskedBatch(
            torch.from_numpy(new), attention_mask, torch.from_numpy(selected),
            torch.from_numpy(ids.reshape(-1)[masked_rows].copy()),
            torch.from_numpy(masked_rows), torch.from_numpy(real_rows),
            torch.from_numpy(np.searchsorted(real_rows, masked_rows)))

    # Masks are a pure function of (seed, step, tokens): nothing to carry across a resume.
    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        self.seed = sd["seed"]


def make_masker(tokenizer, mcfg, *, seed: int, counts=None) -> DynamicMasker:
    return DynamicMasker(
        len(tokenizer), tokenizer.all_special_ids, tokenizer.mask_token_id,
        mlm_prob=mcfg.mlm_prob, mask_frac=mcfg.mask_frac, random_frac=mcfg.random_frac,
        keep_frac=mcfg.keep_frac, token_counts=counts, smoothing=mcfg.smoothing, seed=seed)


def make_eval_masker(tokenizer, mcfg) -> DynamicMasker:
    """Held-out masks: a fixed seed and no frequency smoothing, so every evaluation scores the
    same positions and every token type counts as it occurs in text."""
    return make_masker(tokenizer, dataclasses.replace(mcfg, smoothing=0.0), seed=12345)
