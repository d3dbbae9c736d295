"""DistilBERT's triple objective (plus optional logit MSE).

Every term is returned raw (unweighted) and the total is the weighted sum, so a run's metrics
show what each term does regardless of its weight. Terms are computed in fp32 whatever the
autocast dtype: softmax over 30K classes in bf16 loses the small probabilities KL lives on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    alpha_mse: float = 0.0
    temperature: float = 2.0

    @classmethod
    def from_config(cls, c) -> "LossWeights":
        return cls(c.alpha_ce, c.alpha_mlm, c.alpha_cos, c.alpha_mse, c.temperature)


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


def distillation_loss(s_hidden, t_hidden, s_logits, t_logits, labels, real,
                      mlm_rows, w: LossWeights) -> tuple[torch.Tensor, dict]:
    """The weighted objective and its raw terms.

    s_logits/t_logits: (n_sel, V) at the selected positions. ``mlm_rows`` indexes the rows of
    those that are masked positions (all of them when KL is over masked tokens only), and
    ``labels`` holds the original token at each of those rows. ``real``: the non-padding
    tokens, as flat row indices or as the (B, L) attention mask.
    """
    terms: dict[str, torch.Tensor] = {}
    zero = s_hidden.new_zeros((), dtype=torch.float32)
    terms["ce"] = soft_target_kl(s_logits, t_logits, w.temperature) if w.alpha_ce > 0 else zero
    if w.alpha_mlm > 0:
        terms["mlm"] = F.cross_entropy(s_logits[mlm_rows].float(), labels)
    else:
        terms["mlm"] = zero
    keep = real if real.dim() == 1 else real.bool()  # flat indices, or the attention mask
    terms["cos"] = hidden_cosine(s_hidden, t_hidden, keep) if w.alpha_cos > 0 else zero
    terms["mse"] = logit_mse(s_logits, t_logits) if w.alpha_mse > 0 else zero
    total = (w.alpha_ce * terms["ce"] + w.alpha_mlm * terms["mlm"] + w.alpha_cos * terms["cos"]
             + w.alpha_mse * terms["mse"])
    return total, terms
