"""DistilBERT's triple objective, plus optional logit MSE, hidden-state MSE (TinyBERT) and
MiniLMv2's self-attention relations.

Every term is returned raw (unweighted) and the total is the weighted sum, so a run's metrics
show what each term does regardless of its weight. Terms are computed in fp32 whatever the
autocast dtype: softmax over 30K classes in bf16 loses the small probabilities KL lives on.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .config import LossConfig
from .errors import first_line


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


class VocabTargets(NamedTuple):
    """What the fused vocabulary loss needs besides the student's own rows, handed to the
    student's forward (so ZeRO-3/FSDP2 have the student's output weights gathered there).

    A NamedTuple of tensors, floats and ints: every engine passes it through (DDP moves its
    tensors to the device, FSDP2 casts its floating ones); nothing in it needs a device read.
    """
    teacher_rows: Optional[torch.Tensor]  # (N, D_t) the teacher's head-transformed rows
    teacher_weight: Optional[torch.Tensor]  # (V, D_t) the teacher's output projection
    teacher_bias: Optional[torch.Tensor]  # (V,) or None
    labels: torch.Tensor      # (n_mlm,) the original token of each MLM row
    mlm_rows: torch.Tensor    # (n_mlm,) sorted row indices into the N rows
    # mlm_rows' split at every chunk_rows-th row, computed on the host: a chunk takes
    # mlm_rows[bounds[i]:bounds[i + 1]] without asking the device where its rows are
    mlm_bounds: tuple
    chunk_rows: int
    temperature: float
    alpha_ce: float
    alpha_mlm: float
    compiled: bool = False  # the chunk's elementwise chain through torch.compile


def mlm_chunk_bounds(mlm_rows_host, n_rows: int, chunk_rows: int) -> tuple:
    """Where each chunk of ``chunk_rows`` rows starts in the sorted ``mlm_rows_host`` (CPU)."""
    starts = torch.arange(0, n_rows + chunk_rows, chunk_rows).clamp_(max=n_rows)
    return tuple(torch.searchsorted(mlm_rows_host, starts).tolist())


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear would compute in here: autocast's where it is on, else the input's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _kl_grad_eager(z, zt, b, bt, inv_t, scale, dtype):
    """One chunk's KL sum and gradient: ``z``, ``zt`` are student and teacher logits (C, V)
    before their fp32 biases ``b``, ``bt`` (or None), ``inv_t`` 1/T; returns (sum p_t (log p_t
    - log p_s) at T, scale * (p_s - p_t) in ``dtype``, its column sums in fp32). In place
    wherever it can: each (C, V) fp32 tensor is a pass over memory."""
    lt = torch.log_softmax(_plus(zt.float(), bt).mul_(inv_t), dim=-1)
    ls = torch.log_softmax(_plus(z.float(), b).mul_(inv_t), dim=-1)
    pt = lt.exp()
    # the difference taken per element: two sums of p log p would cancel catastrophically
    # when the student is close to the teacher
    kl = torch.dot(pt.view(-1), lt.sub_(ls).view(-1))
    del lt
    g = ls.exp_().sub_(pt)
    del pt
    colsum = g.sum(0).mul_(scale)
    if dtype == torch.float32:
        return kl, g.mul_(scale), colsum
    return kl, torch.mul(g, scale, out=torch.empty(g.shape, dtype=dtype, device=g.device)), colsum


def _plus(x, b):
    """``x + b`` in place on ``x`` (a temporary of the caller's), or ``x`` where no bias."""
    return x if b is None else x.add_(b)


def _kl_grad_fused(z, zt, b, bt, inv_t, scale, dtype):
    """``_kl_grad_eager``'s math for torch.compile: inductor fuses it into a few loops that
    read the two logit chunks and write the gradient once (Triton kernels on CUDA). The 1/T is
    applied in those loops too, where it costs nothing, and so are the biases: F.linear would
    first copy the broadcast bias into every (C, V) output.

    Written with explicit per-row log-sum-exps rather than ``log_softmax``, and the KL summed
    per row before the chunk: the same per-element difference, from which inductor makes
    row-parallel reduction loops (the maxima, then the sums of exponentials) and one pointwise
    loop for the gradient and the rows' KL; ``log_softmax`` and a whole-chunk sum made it 2.9x
    slower on a 2-core CPU (32.7 against 11.4 ms per 256-row chunk at V = 30522)."""
    zs = (z.float() if b is None else z.float() + b) * inv_t
    zts = (zt.float() if bt is None else zt.float() + bt) * inv_t
    lt = zts - torch.logsumexp(zts, dim=-1, keepdim=True)
    ls = zs - torch.logsumexp(zs, dim=-1, keepdim=True)
    pt = lt.exp()
    g = ((ls.exp() - pt) * scale).to(dtype)
    # the column sums (the bias gradient) reduce across rows, which the row-wise kernel cannot
    # fuse: summed from the cast gradient, with fp32 accumulation, no fp32 copy kept
    return (pt * (lt - ls)).sum(-1).sum(), g, g.sum(0, dtype=torch.float32)


def _add_into(acc, part):
    """``acc += part``, fp32 += the matmul dtype: one loop. Eager ATen first converts ``part``
    into a temporary fp32 copy, and that conversion is slow on a CPU (19 against 2.5 ms for a
    (30522, 384) bf16 weight gradient on a 2-core Zen4), once per chunk."""
    return acc.add_(part)


def _as_fp32(part):
    """``part`` as a new fp32 tensor (the first chunk's weight gradient), for the same reason."""
    return part.float()


# torch.compile of the chunk functions above, made on first use (one graph each per process:
# dynamic shapes serve every chunk and vocabulary size); None once compiling failed here
_COMPILED: dict = {}


def _run(compiled: bool, fused, eager, *args):
    """``fused`` through torch.compile where it compiles, else ``eager``; a platform where
    inductor cannot build (no C++ compiler, an unsupported GPU) warns once and runs eager
    from then on."""
    if compiled and _COMPILED.get(fused, True) is not None:
        try:
            if fused not in _COMPILED:
                _COMPILED[fused] = torch.compile(fused, dynamic=True)
            return _COMPILED[fused](*args)
        except Exception as e:  # inductor's failures have no common type
            _COMPILED[fused] = None
            warnings.warn(f"loss.fused_compile: torch.compile failed "
                          f"({first_line(e)}); the fused loss runs eager", stacklevel=3)
    return eager(*args)


def _kl_grad(compiled: bool, *args):
    return _run(compiled, _kl_grad_fused, _kl_grad_eager, *args)


def _accumulate(compiled: bool, acc, part):
    """The weight gradient so far plus this chunk's ``part``: a new fp32 tensor for the first."""
    if acc is None:
        return _run(compiled, _as_fp32, _as_fp32, part)
    return _run(compiled, _add_into, _add_into, acc, part)


class FusedVocabLoss(torch.autograd.Function):
    """alpha_ce * KL(teacher || student) at temperature T (times T^2, mean over the N rows) +
    alpha_mlm * cross-entropy at the MLM rows, from the rows before the output projection.

    Chunk by chunk of rows: both projections, the softmax statistics in fp32, both losses and
    the gradients of the student's rows, weight and bias, so no (N, V) tensor ever exists and
    backward only scales what forward accumulated. The same objective as ``soft_target_kl`` +
    ``F.cross_entropy`` on full logits (tests hold them to 1e-5 in fp32).
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, t: VocabTargets):
        n, T = rows.shape[0], float(t.temperature)
        dtype = _matmul_dtype(rows)
        t_dtype = None if t.teacher_rows is None else _matmul_dtype(t.teacher_rows)
        # every cast is explicit below (as autocast would make it for F.linear); the softmax
        # statistics, sums and gradient accumulators stay fp32
        with torch.autocast(rows.device.type, enabled=False):
            return FusedVocabLoss._forward(ctx, rows, weight, bias, t, n, T, dtype, t_dtype)

    @staticmethod
    def _forward(ctx, rows, weight, bias, t, n, T, dtype, t_dtype):
        kl_on, mlm_on = t.alpha_ce > 0, t.alpha_mlm > 0 and t.labels.numel() > 0
        need_grad = ctx.needs_input_grad
        g_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device) \
            if need_grad[0] else None
        # the weight gradient starts as the first chunk's (no (V, D) zero fill to add to)
        g_w = None
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=rows.device) \
            if bias is not None and need_grad[2] else None
        kl_sum = rows.new_zeros((), dtype=torch.float32)
        mlm_sum = rows.new_zeros((), dtype=torch.float32)
        n_mlm = t.labels.numel()
        # cast once, not per chunk (each is a (V, D) copy; none where the dtype is already
        # the one computed in). The logits are the plain projections: the KL kernel adds the
        # biases (in fp32) and divides by T on the fly, so neither scaled (V, D) weight copies
        # nor broadcast (C, V) bias copies are made
        w_c, b_f = weight.to(dtype), None if bias is None else bias.float()
        if kl_on:
            wt_c = t.teacher_weight.to(t_dtype)
            bt_f = None if t.teacher_bias is None else t.teacher_bias.float()
        c_kl = t.alpha_ce * T / n  # d (T^2 KL / N) / d z_s = T (p_s - p_t) / N
        scale = torch.tensor(c_kl, dtype=torch.float32, device=rows.device)
        inv_t = torch.tensor(1.0 / T, dtype=torch.float32, device=rows.device)
        for i, c0 in enumerate(range(0, n, t.chunk_rows)):
            c1 = min(c0 + t.chunk_rows, n)
            r = rows[c0:c1].to(dtype)
            # (C, V) logits before the bias, in the dtype autocast's F.linear computes in
            z = r @ w_c.t()
            a, b = (t.mlm_bounds[i], t.mlm_bounds[i + 1]) if mlm_on else (0, 0)
            gm = None
            if b > a:
                local, lab = t.mlm_rows[a:b] - c0, t.labels[a:b]
                zm = _plus(z.index_select(0, local).float(), b_f)
                lse = torch.logsumexp(zm, dim=-1)
                mlm_sum = mlm_sum + (lse - zm.gather(1, lab[:, None]).squeeze(1)).sum()
                # d CE / d z = softmax - onehot, over the MLM rows' count; each row once, so a
                # plain (non-accumulating) index write takes off the one-hot
                gm = zm.sub_(lse[:, None]).exp_()
                gm[torch.arange(b - a, device=gm.device), lab] -= 1.0
                gm.mul_(t.alpha_mlm / n_mlm)
            if kl_on:
                zt = t.teacher_rows[c0:c1].to(t_dtype) @ wt_c.t()
                kl_c, gd, colsum = _kl_grad(t.compiled, z, zt, b_f, bt_f, inv_t, scale, dtype)
                kl_sum = kl_sum + kl_c
                z = zt = None
            elif gm is not None:  # the MLM term alone: only its rows have a gradient
                z = None
                gd = torch.zeros((c1 - c0, weight.shape[0]), dtype=dtype, device=rows.device)
                colsum = None
            else:
                continue
            if gm is not None:
                gd.index_add_(0, local, gm.to(dtype))
                colsum = gm.sum(0) if colsum is None else colsum.add_(gm.sum(0))
            if g_b is not None:
                g_b.add_(colsum)
            if g_rows is not None:
                g_rows[c0:c1] = gd @ w_c
            if need_grad[1]:
                g_w = _accumulate(t.compiled, g_w, gd.t() @ r)
            # nothing of this chunk may live on into the next one's peak
            gd = gm = colsum = None
        if need_grad[1] and g_w is None:  # no chunk had a row with a loss on it
            g_w = torch.zeros(weight.shape, dtype=torch.float32, device=rows.device)
        kl = kl_sum * (T * T / n)
        mlm = mlm_sum / n_mlm if n_mlm else mlm_sum
        total = t.alpha_ce * kl + t.alpha_mlm * mlm if mlm_on else t.alpha_ce * kl
        ctx.save_for_backward(*(x for x in (g_rows, g_w, g_b) if x is not None))
        ctx.has = (g_rows is not None, g_w is not None, g_b is not None)
        ctx.backward_done = False
        ctx.dtypes = (rows.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(kl, mlm)
        return total, kl, mlm

    @staticmethod
    def backward(ctx, g_total, _kl, _mlm):
        # the gradients were computed in forward and are scaled in place (a (V, D) product
        # would be one more allocation of the weight's size), so a second backward through
        # the same forward would scale them twice: refused
        if ctx.backward_done:
            raise RuntimeError("FusedVocabLoss: backward runs once per forward (its gradients "
                               "are computed in forward); run the forward again")
        ctx.backward_done = True
        saved = iter(ctx.saved_tensors)
        out = []
        for has, dt in zip(ctx.has, ctx.dtypes):
            out.append(next(saved).mul_(g_total).to(dt) if has else None)
        return out[0], out[1], out[2], None


def fused_vocab_loss(rows, weight, bias, targets: VocabTargets):
    """(weighted KL + MLM, raw KL, raw MLM) from the student's head-transformed rows."""
    return FusedVocabLoss.apply(rows, weight, bias, targets)


class Features(NamedTuple):
    """What one distillation forward returns; [0] and [1] are what the eval code reads.

    A NamedTuple because DDP, FSDP2 and DeepSpeed walk (named) tuples for the tensors they must
    hook; what was not asked for at construction is () or None, and costs nothing.
    """
    hidden: torch.Tensor  # (B, L, D) last hidden state, in the model's own width
    # (n_sel, V) vocabulary logits at the positions asked for; None where the fused loss ran
    logits: Optional[torch.Tensor]
    # hidden states compared layer by layer (loss.hidden_mse_layers=mapped): the student's
    # every layer, through the projection when it is narrower; the teacher's mapped layers
    layers: tuple = ()
    qkv: tuple = ()  # (q, k, v), each (B, L, D), at the relation layer (loss.attn_rel)
    # the student's last hidden state in the teacher's width (narrow students only)
    aligned: Optional[torch.Tensor] = None
    # the teacher's rows through its head transform, before the output projection (what the
    # fused loss reads instead of teacher logits)
    head_rows: Optional[torch.Tensor] = None
    # the student's fused vocabulary loss: (alpha_ce * KL + alpha_mlm * MLM, KL, MLM)
    vocab: tuple = ()


def distillation_loss(s: Features, t: Features, labels, real, mlm_rows,
                      w: LossWeights) -> tuple[torch.Tensor, dict]:
    """The weighted objective and its raw terms.

    ``s``, ``t``: the :class:`Features` of the student and the teacher.

    Logits are (n_sel, V) at the selected positions, or absent where the student's forward ran
    the fused vocabulary loss (``s.vocab``). ``mlm_rows`` indexes the rows of those
    that are masked positions (all of them when KL is over masked tokens only), and ``labels``
    holds the original token at each of those rows. ``real``: the non-padding tokens, as flat
    row indices or as the (B, L) attention mask. Terms always has ce, mlm, cos, mse, attn_rel
    and hidden_mse (zero where the weight is 0).
    """
    terms: dict[str, torch.Tensor] = {}
    zero = s.hidden.new_zeros((), dtype=torch.float32)
    if s.vocab:  # the fused loss already computed both vocabulary terms, weighted and raw
        vocab_total, terms["ce"], terms["mlm"] = s.vocab
    else:
        terms["ce"] = soft_target_kl(s.logits, t.logits, w.temperature) if w.alpha_ce > 0 \
            else zero
        terms["mlm"] = F.cross_entropy(s.logits[mlm_rows].float(), labels) \
            if w.alpha_mlm > 0 else zero
        vocab_total = w.alpha_ce * terms["ce"] + w.alpha_mlm * terms["mlm"]
    keep = real if real.dim() == 1 else real.bool()  # flat indices, or the attention mask
    # a narrower student's last hidden state reaches the teacher's width through its projection
    s_last = s.aligned if s.aligned is not None else s.hidden
    terms["cos"] = hidden_cosine(s_last, t.hidden, keep) if w.alpha_cos > 0 else zero
    terms["mse"] = logit_mse(s.logits, t.logits) if w.alpha_mse > 0 else zero
    terms["attn_rel"] = attention_relation_kl(s.qkv, t.qkv, keep, w.attn_rel_heads) \
        if w.alpha_attn_rel > 0 else zero
    terms["hidden_mse"] = _hidden_mse_term(s, t, s_last, keep, w) \
        if w.alpha_hidden_mse > 0 else zero
    total = (vocab_total + w.alpha_cos * terms["cos"] + w.alpha_mse * terms["mse"]
             + w.alpha_attn_rel * terms["attn_rel"] + w.alpha_hidden_mse * terms["hidden_mse"])
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
