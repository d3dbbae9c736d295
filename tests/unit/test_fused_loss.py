"""The fused vocabulary loss (``loss.fused``, the default) against the naive path.

The naive path is full logits + ``soft_target_kl`` + ``F.cross_entropy`` under autograd. Both
compute the same objective: the tests hold loss and every gradient to 1e-5 in fp32 (relative to
the largest entry), for the bare function, for every family of the adapter table through the
training step (KL over all tokens and over masked rows, with and without the MLM term, tied and
untied heads), and within bf16's rounding under bf16 autocast. They also count host syncs in a
micro-step (zero) and measure the loss's live memory against the naive path's.
"""
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fixtures import BPE_FAMILIES, FAMILY_SENTENCES, bpe_tokenizer, make_family_teacher, \
    wordpiece_tokenizer

from distil_scale.config import LossConfig, MaskingConfig, StudentConfig
from distil_scale.data.masking import make_masker
from distil_scale import losses
from distil_scale.families import FAMILIES, family_of
from distil_scale.losses import (LossWeights, VocabTargets, fused_vocab_loss, mlm_chunk_bounds,
                                 soft_target_kl)
from distil_scale.models import build_student, wrap_for_distillation
from distil_scale.tools.memory import LiveStorage
from distil_scale.train import distill_step

FP32 = 1e-5
# bf16 autocast: both paths round the logits and their gradient to bf16, in different places
BF16_LOSS, BF16_GRAD = 2e-3, 3e-2


def rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _problem(N=103, D=24, Dt=40, V=997, n_mlm=17, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, D, generator=g).requires_grad_()
    W = (0.3 * torch.randn(V, D, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(V, generator=g)).requires_grad_() if bias else None
    ht, Wt = torch.randn(N, Dt, generator=g), 0.3 * torch.randn(V, Dt, generator=g)
    bt = 0.1 * torch.randn(V, generator=g) if bias else None
    rows = torch.sort(torch.randperm(N, generator=g)[:n_mlm]).values
    labels = torch.randint(V, (n_mlm,), generator=g)
    return hs, W, b, ht, Wt, bt, rows, labels


def _naive(hs, W, b, ht, Wt, bt, rows, labels, T, a_ce, a_mlm):
    zs, zt = F.linear(hs, W, b), F.linear(ht, Wt, bt)
    out = a_ce * soft_target_kl(zs, zt, T) if a_ce else zs.new_zeros(())
    if a_mlm:
        out = out + a_mlm * F.cross_entropy(zs[rows].float(), labels)
    return out


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("chunk", [16, 1024])  # uneven chunks, and one chunk for all rows
@pytest.mark.parametrize("a_ce,a_mlm", [(5.0, 2.0), (5.0, 0.0), (0.0, 2.0)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("every_row_mlm", [False, True])  # KL over all rows / masked rows only
def test_function_equals_naive_fp32(chunk, a_ce, a_mlm, bias, every_row_mlm, compiled):
    N = 103
    hs, W, b, ht, Wt, bt, rows, labels = _problem(N=N, n_mlm=N if every_row_mlm else 17,
                                                  bias=bias)
    params = [hs, W] + ([b] if bias else [])
    ref = _naive(hs, W, b, ht, Wt, bt, rows, labels, 2.0, a_ce, a_mlm)
    g_ref = torch.autograd.grad(ref, params)
    t = VocabTargets(ht, Wt, bt, labels, rows, mlm_chunk_bounds(rows, N, chunk), chunk, 2.0,
                     a_ce, a_mlm, compiled)
    total, kl, mlm = fused_vocab_loss(hs, W, b, t)
    assert rel(total, ref) < FP32
    assert rel(a_ce * kl + a_mlm * mlm, ref) < FP32
    for g, r in zip(torch.autograd.grad(total, params), g_ref):
        assert rel(g, r) < FP32


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_function_bf16_autocast_within_rounding(compiled):
    hs, W, b, ht, Wt, bt, rows, labels = _problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _naive(hs, W, b, ht, Wt, bt, rows, labels, 2.0, 5.0, 2.0)
        t = VocabTargets(ht, Wt, bt, labels, rows, mlm_chunk_bounds(rows, 103, 16), 16, 2.0,
                         5.0, 2.0, compiled)
        total, _, _ = fused_vocab_loss(hs, W, b, t)
    assert total.dtype == torch.float32
    assert rel(total, ref) < BF16_LOSS
    for g, r in zip(torch.autograd.grad(total, [hs, W, b]), torch.autograd.grad(ref, [hs, W, b])):
        assert g.dtype == r.dtype == torch.float32
        assert rel(g, r) < BF16_GRAD


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("T", [1.0, 3.0])  # the 1/T applied to the logits, not the weights
def test_other_temperatures_equal_naive_fp32(T, compiled):
    hs, W, b, ht, Wt, bt, rows, labels = _problem()
    ref = _naive(hs, W, b, ht, Wt, bt, rows, labels, T, 5.0, 2.0)
    t = VocabTargets(ht, Wt, bt, labels, rows, mlm_chunk_bounds(rows, 103, 16), 16, T, 5.0,
                     2.0, compiled)
    total, _, _ = fused_vocab_loss(hs, W, b, t)
    assert rel(total, ref) < FP32
    for g, r in zip(torch.autograd.grad(total, [hs, W, b]), torch.autograd.grad(ref, [hs, W, b])):
        assert rel(g, r) < FP32


def test_where_compiling_fails_the_loss_warns_and_runs_eager(monkeypatch):
    """A platform where inductor cannot build (no C++ compiler): every compiled chunk function
    (the KL kernel, the weight gradient's accumulation) falls back to its eager form with a
    warning, gives the same loss and gradients, and is not tried again."""
    def no_compiler(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(details)")
        return call

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(losses, "_COMPILED", {})
    hs, W, b, ht, Wt, bt, rows, labels = _problem()
    ref = _naive(hs, W, b, ht, Wt, bt, rows, labels, 2.0, 5.0, 2.0)
    g_ref = torch.autograd.grad(ref, [hs, W, b])
    t = VocabTargets(ht, Wt, bt, labels, rows, mlm_chunk_bounds(rows, 103, 16), 16, 2.0, 5.0,
                     2.0, True)
    with pytest.warns(UserWarning, match="loss.fused_compile: torch.compile failed "
                                         r"\(InvalidCxxCompiler.*\); the fused loss runs eager"):
        total, _, _ = fused_vocab_loss(hs, W, b, t)
    assert rel(total, ref) < FP32
    for g, r in zip(torch.autograd.grad(total, [hs, W, b]), g_ref):
        assert rel(g, r) < FP32
    assert len(losses._COMPILED) == 3 and all(f is None for f in losses._COMPILED.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second attempt, no second warning
        again, _, _ = fused_vocab_loss(hs, W, b, t)
    assert again.item() == total.item()


def test_a_second_backward_through_one_forward_is_refused():
    """The gradients are made in forward and scaled in place by backward: a second backward
    (retain_graph) would scale them again, so it fails instead of returning wrong values."""
    hs, W, b, ht, Wt, bt, rows, labels = _problem()
    t = VocabTargets(ht, Wt, bt, labels, rows, mlm_chunk_bounds(rows, 103, 16), 16, 2.0, 5.0,
                     2.0)
    total, _, _ = fused_vocab_loss(hs, W, b, t)
    (total * 3.0).backward(retain_graph=True)
    ref = _naive(hs, W, b, ht, Wt, bt, rows, labels, 2.0, 5.0, 2.0)
    assert rel(W.grad, torch.autograd.grad(ref * 3.0, [W])[0]) < FP32
    with pytest.raises(RuntimeError, match="backward runs once per forward"):
        total.backward()


def test_wrong_gradient_is_caught():
    """The comparison can fail: a temperature off by 5 % moves the gradients beyond 1e-5."""
    hs, W, b, ht, Wt, bt, rows, labels = _problem()
    ref = _naive(hs, W, b, ht, Wt, bt, rows, labels, 2.0, 5.0, 2.0)
    t = VocabTargets(ht, Wt, bt, labels, rows, mlm_chunk_bounds(rows, 103, 16), 16, 2.1, 5.0,
                     2.0)
    total, _, _ = fused_vocab_loss(hs, W, b, t)
    assert rel(torch.autograd.grad(total, [W])[0], torch.autograd.grad(ref, [W])[0]) > 1e-3


# -- every family, through the training step ---------------------------------------------------
@pytest.fixture(scope="module")
def toks():
    return {"wordpiece": wordpiece_tokenizer(), "bpe": bpe_tokenizer()}


def _family_pair(model_type, tok, *, untied=False, legacy=True):
    teacher = make_family_teacher(model_type, tok)
    if model_type == "deberta-v2" and not legacy:
        from transformers import AutoModelForMaskedLM

        cfg = teacher.config
        cfg.legacy = False
        torch.manual_seed(0)
        teacher = AutoModelForMaskedLM.from_config(cfg).eval()
    with torch.no_grad():  # peaked soft targets: a tiny random head's are near uniform
        family_of(teacher).head_projection(teacher)[2].normal_(0.0, 3.0)
    torch.manual_seed(1)
    student, layers = build_student(teacher, StudentConfig(n_layers=2, dropout=0.0,
                                                           attention_dropout=0.0))
    if untied:  # an untied head: the projection is its own parameter
        _, w, _ = family_of(student).head_projection(student)
        w_sep = torch.nn.Parameter(w.detach().clone() + 0.01 * torch.randn_like(w))
        _set_projection_weight(student, w_sep)
    with torch.no_grad():
        # a student some way from its teacher (a copied student's KL is ~0.005, where both
        # paths' fp32 rounding is already 1e-5 of it), and a head bias that is not zero, so a
        # dropped bias gradient shows
        for p in student.parameters():
            p.add_(0.2 * p.std().nan_to_num(1.0) * torch.randn_like(p))
    return teacher, student, layers


def _set_projection_weight(model, w):
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.shape == w.shape \
                and mod.out_features == w.shape[0]:
            mod.weight = w
            return
    raise AssertionError("no projection Linear found")


def _batch(tok, padded: bool):
    if padded:
        enc = tok(FAMILY_SENTENCES, padding=True, return_tensors="pt")
        assert (enc["attention_mask"] == 0).any()
        return enc["input_ids"], enc["attention_mask"]
    text = " ".join(FAMILY_SENTENCES)
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    L = 16
    rows = ids[: (ids.numel() // L) * L].view(-1, L)[:3]
    return rows, torch.ones_like(rows)


def _step(teacher_w, student_w, mb, w, kl_all):
    student_w.zero_grad(set_to_none=True)
    total, terms = distill_step(student_w, teacher_w, mb, w, kl_all, torch.device("cpu"))
    total.backward()
    grads = {n: p.grad.clone() for n, p in student_w.named_parameters() if p.grad is not None}
    return total.detach(), {k: v.detach() for k, v in terms.items()}, grads


# (family, untied head, DeBERTa legacy head, MLM weight, compiled chain); the MLM term off on
# three heads, the eager chain on two families (the default compiles it)
CASES = [(f, False, True, 2.0, True) for f in FAMILIES] + [
    ("bert", True, True, 2.0, True), ("deberta-v2", False, False, 2.0, True),
    ("bert", False, True, 0.0, True), ("roberta", False, True, 0.0, True),
    ("deberta-v2", False, False, 0.0, True), ("bert", False, True, 2.0, False),
    ("roberta", False, True, 2.0, False)]


@pytest.mark.parametrize("model_type,untied,legacy,a_mlm,compiled", CASES,
                         ids=[f"{f}{'-untied' if u else ''}{'' if lg else '-nonlegacy'}"
                              f"{'' if m else '-no-mlm'}{'' if c else '-eager'}"
                              for f, u, lg, m, c in CASES])
@pytest.mark.parametrize("kl_all", [True, False], ids=["kl-all", "kl-masked"])
def test_every_family_fused_step_equals_unfused(toks, model_type, untied, legacy, a_mlm,
                                                compiled, kl_all):
    tok = toks["bpe" if model_type in BPE_FAMILIES else "wordpiece"]
    teacher, student, layers = _family_pair(model_type, tok, untied=untied, legacy=legacy)
    cfg = LossConfig(alpha_mlm=a_mlm, fused_chunk_rows=7, fused_compile=compiled)
    tw, sw = wrap_for_distillation(teacher, student, layers, cfg)
    sw.train()
    masker = make_masker(tok, MaskingConfig(), seed=0)
    for padded in (True, False):
        mb = masker(*_batch(tok, padded), 0)
        w = LossWeights.from_config(cfg)
        fused = _step(tw, sw, mb, w, kl_all)
        naive = _step(tw, sw, mb, dataclasses.replace(w, fused=False), kl_all)
        assert rel(fused[0], naive[0]) < FP32, (padded, float(fused[0]), float(naive[0]))
        for k in ("ce", "mlm", "cos"):
            assert rel(fused[1][k], naive[1][k]) < FP32 or float(naive[1][k]) == 0, k
        assert fused[2].keys() == naive[2].keys()
        _assert_grads_close(fused[2], naive[2], FP32, padded)


def test_bf16_step_within_rounding(toks):
    tok = toks["wordpiece"]
    teacher, student, layers = _family_pair("bert", tok)
    cfg = LossConfig(fused_chunk_rows=7)
    tw, sw = wrap_for_distillation(teacher, student, layers, cfg)
    mb = make_masker(tok, MaskingConfig(), seed=0)(*_batch(tok, True), 0)
    w = LossWeights.from_config(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _step(tw, sw, mb, w, True)
        naive = _step(tw, sw, mb, dataclasses.replace(w, fused=False), True)
    assert rel(fused[0], naive[0]) < BF16_LOSS
    _assert_grads_close(fused[2], naive[2], BF16_GRAD)


def _assert_grads_close(got: dict, want: dict, tol: float, *context):
    """Each gradient within ``tol`` of its largest entry; a gradient that is zero in exact
    arithmetic (a key bias under softmax) is held to the model's overall gradient scale."""
    scale = max(float(g.abs().max()) for g in want.values())
    for name, g in want.items():
        bound = tol * max(float(g.abs().max()), 1e-4 * scale)
        assert float((got[name] - g).abs().max()) <= bound, (*context, name)


# -- no host sync in a micro-step ---------------------------------------------------------------
class CountSyncs(TorchDispatchMode):
    """Counts the operator behind ``.item()``/``bool(t)``/``nonzero`` sizes: reading a device
    value back on the host (on a GPU, the host waits for the device there)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
               "aten::item", "aten::is_nonzero", "aten::equal"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [True, False])
def test_packed_micro_step_reads_nothing_back_from_the_device(toks, fused):
    tok = toks["wordpiece"]
    teacher, student, layers = _family_pair("bert", tok)
    cfg = LossConfig(fused=fused)
    tw, sw = wrap_for_distillation(teacher, student, layers, cfg)
    sw.train()
    mb = make_masker(tok, MaskingConfig(), seed=0)(*_batch(tok, False), 0)
    w = LossWeights.from_config(cfg)
    with CountSyncs() as c:
        total, _ = distill_step(sw, tw, mb, w, True, torch.device("cpu"))
        total.backward()
    assert c.seen == []
    # the counter sees a sync where there is one: an all-ones attention mask (HF checks it)
    with CountSyncs() as c:
        sw(mb.input_ids, mb.attention_mask, mb.real_rows)
    assert c.seen, "the sync counter saw nothing where HF's mask check reads the device"


# -- memory -------------------------------------------------------------------------------------
def test_fused_loss_live_memory_far_below_naive():
    """Peak live storage of one loss forward + backward, at the demo vocabulary (30,522) and
    2,048 rows in chunks of 256 (the ratio the default 1,024-row chunks give at the paper's
    8,192-row micro-batch; launch/bench.py measures that one). The eager chain: a dispatch mode
    sees every tensor it makes (torch.compile does not run under one); the compiled chain's
    kernel keeps only per-row statistics and the bf16 gradient, less than this."""
    N, D, V, chunk = 2048, 32, 30522, 256
    hs, W, b, ht, Wt, bt, rows, labels = _problem(N=N, D=D, Dt=D, V=V, n_mlm=308)
    with LiveStorage() as naive:
        loss = _naive(hs, W, b, ht, Wt, bt, rows, labels, 2.0, 5.0, 2.0)
        loss.backward()
        del loss
    t = VocabTargets(ht, Wt, bt, labels, rows, mlm_chunk_bounds(rows, N, chunk), chunk, 2.0,
                     5.0, 2.0)
    with LiveStorage() as fused:
        loss, _, _ = fused_vocab_loss(hs, W, b, t)
        loss.backward()
        del loss
    logits_bytes = N * V * 4
    assert naive.peak > 3 * logits_bytes  # the naive chain holds several (N, V) fp32 tensors
    assert naive.peak / fused.peak >= 8, (naive.peak / 2**20, fused.peak / 2**20)
