"""DistilBERT's triple objective, plus optional logit MSE, hidden-state MSE (TinyBERT) and
MiniLMv2's self-attention relations.

Every term is returned raw (unweighted) and the total is the weighted sum, so a run's metrics
show what each term does regardless of its weight. Terms are computed in fp32 whatever the
autocast dtype: softmax over 30K classes in bf16 loses the small probabilities KL lives on.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .config import LossConfig


class LossWeights(LossConfig):
    """The config's loss section as the loss reads it: ``attn_rel_heads`` resolved (0 stands
    for the teacher's attention head count, as ``models.relation_heads`` resolves it)."""

    @classmethod
    def from_config(cls, c: LossConfig, teacher_heads: int = 0) -> "LossWeights":
        return cls(**{**dataclasses.asdict(c),
                      "attn_rel_heads": c.attn_rel_heads or teacher_heads})


def soft_target_kl(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature T, times T^2, averaged over positions.

    Same as the DistilBERT release (KLDivLoss(batchmean) on log_softmax(s/T), softmax(t/T));
    T^2 keeps the gradient scale independent of T (Hinton et al.).
    """
    s = F.log_softmax(s_logits.float() / T, dim=-1)
    t = F.log_softmax(t_logits.float() / T, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * T * T


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) -> (n, ...) at ``rows``: flat indices into B*L, or a (B, L) mask.

    Indices are what the training step passes: their count is known on the host, where a
    boolean mask makes the device report how many rows it selected (a synchronisation)."""
    if rows.dtype == torch.bool:
        return x[rows]
    return x.flatten(0, 1).index_select(0, rows)


def hidden_cosine(h_s: torch.Tensor, h_t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(h_s, h_t) over the non-padding tokens ``keep`` (indices or a mask)."""
    hs, ht = gather_rows(h_s, keep).float(), gather_rows(h_t, keep).float()
    return (1.0 - F.cosine_similarity(hs, ht, dim=-1)).mean()


def logit_mse(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Sum of squared logit differences per position (the release's MSELoss(sum) / n)."""
    return F.mse_loss(s_logits.float(), t_logits.float(), reduction="sum") / s_logits.shape[0]


def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the non-padding tokens ``keep`` and the features (TinyBERT's
    MSELoss on hidden states, without the padding)."""
    keep = keep.bool() if keep.dim() == 2 else keep
    return F.mse_loss(gather_rows(h_s, keep).float(), gather_rows(h_t, keep).float())


def key_mask(real: torch.Tensor, shape) -> torch.Tensor:
    """(B, L) bool mask of the non-padding tokens from flat row indices (or a mask)."""
    if real.dim() == 2:
        return real.bool()
    flat = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=real.device)
    return flat.index_fill(0, real, True).view(shape[0], shape[1])


def log_relation(x: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """log softmax(X X^T / sqrt(d_r)) over the non-padding keys, per relation head: (B, H, L, L).

    Padding keys get the most negative finite score (not -inf): their probability is exactly
    0 and nothing downstream multiplies 0 by an infinity (no NaN in the gradient)."""
    B, L, D = x.shape
    if D % heads:
        raise ValueError(f"{heads} relation heads do not divide width {D}")
    d = D // heads
    # in fp32 whatever the autocast dtype: under bf16 autocast the matmul would run in bf16,
    # and a softmax over L keys in bf16 loses the small probabilities the KL compares
    with torch.autocast(x.device.type, enabled=False):
        x = x.float().view(B, L, heads, d).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(~keys[:, None, None, :], torch.finfo(torch.float32).min)
        return F.log_softmax(scores, dim=-1)


def attention_relation_kl(s_qkv, t_qkv, real: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLMv2's self-attention relation loss.

    For each of the query-query, key-key and value-value relations, KL(teacher relation ||
    student relation) over the non-padding keys of every query, averaged over the real query
    tokens, the relation heads and the three relations. The widths may differ: each side is
    split into ``heads`` heads of its own size, and relations are L x L either way.
    """
    real = real.bool() if real.dim() == 2 else real  # an attention mask may come as 0/1 ints
    keys = key_mask(real, s_qkv[0].shape[:2])
    total = 0.0
    for xs, xt in zip(s_qkv, t_qkv):
        ls, lt = log_relation(xs, keys, heads), log_relation(xt, keys, heads)
        kl = (lt.exp() * (lt - ls)).masked_fill(~keys[:, None, None, :], 0.0).sum(-1)
        total = total + gather_rows(kl.mean(1), real).mean()  # heads, then real queries
    return total / len(s_qkv)


class Features(NamedTuple):
    """What one distillation forward returns; [0] and [1] are what the eval code reads.

    A NamedTuple because DDP, FSDP2 and DeepSpeed walk (named) tuples for the tensors they must
    hook; what was not asked for at construction is () or None, and costs nothing.
    """
    hidden: torch.Tensor  # (B, L, D) last hidden state, in the model's own width
    logits: torch.Tensor  # (n_sel, V) vocabulary logits at the positions asked for
    # hidden states compared layer by layer (loss.hidden_mse_layers=mapped): the student's
    # every layer, through the projection when it is narrower; the teacher's mapped layers
    layers: tuple = ()
    qkv: tuple = ()  # (q, k, v), each (B, L, D), at the relation layer (loss.alpha_attn_rel)
    # the student's last hidden state in the teacher's width (narrow students only)
    aligned: Optional[torch.Tensor] = None

    def clone(self) -> "Features":
        """Plain copies: tensors made in inference mode cannot be saved for backward."""
        def c(x):
            if isinstance(x, tuple):
                return tuple(t.clone() for t in x)
            return None if x is None else x.clone()

        return Features(*(c(x) for x in self))


def distillation_loss(s: Features, t: Features, labels, real, mlm_rows,
                      w: LossWeights) -> tuple[torch.Tensor, dict]:
    """The weighted objective and its raw terms.

    ``s``, ``t``: the :class:`Features` of the student and the teacher.

    Logits are (n_sel, V) at the selected positions. ``mlm_rows`` indexes the rows of those
    that are masked positions (all of them when KL is over masked tokens only), and ``labels``
    holds the original token at each of those rows. ``real``: the non-padding tokens, as flat
    row indices or as the (B, L) attention mask. Terms always has ce, mlm, cos, mse, attn_rel
    and hidden_mse (zero where the weight is 0).
    """
    terms: dict[str, torch.Tensor] = {}
    zero = s.hidden.new_zeros((), dtype=torch.float32)
    terms["ce"] = soft_target_kl(s.logits, t.logits, w.temperature) if w.alpha_ce > 0 else zero
    if w.alpha_mlm > 0:
        terms["mlm"] = F.cross_entropy(s.logits[mlm_rows].float(), labels)
    else:
        terms["mlm"] = zero
    keep = real if real.dim() == 1 else real.bool()  # flat indices, or the attention mask
    # a narrower student's last hidden state reaches the teacher's width through its projection
    s_last = s.aligned if s.aligned is not None else s.hidden
    terms["cos"] = hidden_cosine(s_last, t.hidden, keep) if w.alpha_cos > 0 else zero
    terms["mse"] = logit_mse(s.logits, t.logits) if w.alpha_mse > 0 else zero
    terms["attn_rel"] = attention_relation_kl(s.qkv, t.qkv, keep, w.attn_rel_heads) \
        if w.alpha_attn_rel > 0 else zero
    terms["hidden_mse"] = _hidden_mse_term(s, t, s_last, keep, w) \
        if w.alpha_hidden_mse > 0 else zero
    total = (w.alpha_ce * terms["ce"] + w.alpha_mlm * terms["mlm"] + w.alpha_cos * terms["cos"]
             + w.alpha_mse * terms["mse"] + w.alpha_attn_rel * terms["attn_rel"]
             + w.alpha_hidden_mse * terms["hidden_mse"])
    return total, terms


def _hidden_mse_term(s, t, s_last, keep, w) -> torch.Tensor:
    """"last": the last hidden states; "mapped": student layer i against the teacher layer it
    was copied from (the teacher wrapper returns exactly those), averaged over layers."""
    if w.hidden_mse_layers == "mapped":
        if len(s.layers) != len(t.layers) or not s.layers:
            raise ValueError(f"hidden_mse over mapped layers needs one teacher layer per student "
                             f"layer ({len(s.layers)} student, {len(t.layers)} teacher)")
        return sum(hidden_mse(a, b, keep) for a, b in zip(s.layers, t.layers)) / len(s.layers)
    return hidden_mse(s_last, t.hidden, keep)
