"""The objective against numbers computed by hand (math module, no torch.nn.functional)."""
import math

import pytest
import torch

from distil_scale.losses import (LossWeights, distillation_loss, hidden_cosine, logit_mse,
                                 soft_target_kl)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_kl_golden():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    T = 2.0
    want = 0.0
    for srow, trow in zip(s, t):
        ps, pt = _softmax([x / T for x in srow]), _softmax([x / T for x in trow])
        want += sum(b * math.log(b / a) for a, b in zip(ps, pt))  # KL(teacher || student)
    want = want / 2 * T * T
    got = soft_target_kl(torch.tensor(s), torch.tensor(t), T)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(0.9575, abs=1e-3)  # hand value, in case both sides drift


def test_kl_zero_when_equal_and_grows_with_gap():
    x = torch.randn(4, 10)
    assert soft_target_kl(x, x, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_target_kl(x, x + torch.randn(4, 10), 2.0).item() > 0


def test_cosine_ignores_padding():
    hs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    ht = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-5.0, 5.0]]])
    keep = torch.tensor([[True, True, False]])
    # token 0: cos 1 -> 0; token 1: cos 0 -> 1; token 2 is padding
    assert hidden_cosine(hs, ht, keep).item() == pytest.approx(0.5)
    keep_all = torch.ones(1, 3, dtype=torch.bool)
    assert hidden_cosine(hs, ht, keep_all).item() == pytest.approx(2.0 / 3.0)  # 0, 1, 1


def test_mse_golden():
    s, t = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert logit_mse(s, t).item() == pytest.approx((1 + 4 + 9) / 2)


def test_total_is_weighted_sum_of_raw_terms():
    torch.manual_seed(0)
    n, V, B, L, D = 5, 11, 2, 4, 6
    s_logits, t_logits = torch.randn(n, V), torch.randn(n, V)
    labels = torch.randint(0, V, (n,))
    hs, ht = torch.randn(B, L, D), torch.randn(B, L, D)
    mask = torch.ones(B, L, dtype=torch.long)
    w = LossWeights(5.0, 2.0, 1.0, 0.5, 2.0)
    total, raw = distillation_loss(hs, ht, s_logits, t_logits, labels, mask, slice(None), w)
    ce = -sum(math.log(_softmax(s_logits[i].tolist())[labels[i]]) for i in range(n)) / n
    assert raw["mlm"].item() == pytest.approx(ce, rel=1e-5)
    want = 5 * raw["ce"] + 2 * raw["mlm"] + 1 * raw["cos"] + 0.5 * raw["mse"]
    assert total.item() == pytest.approx(want.item(), rel=1e-6)


def test_mlm_rows_select_masked_positions_when_kl_covers_all():
    torch.manual_seed(1)
    V = 7
    s_logits, t_logits = torch.randn(4, V), torch.randn(4, V)
    rows = torch.tensor([False, True, False, True])
    labels = torch.tensor([2, 5])
    w = LossWeights(alpha_ce=0.0, alpha_mlm=1.0, alpha_cos=0.0)
    h = torch.zeros(1, 4, 3)
    total, raw = distillation_loss(h, h, s_logits, t_logits, labels, torch.ones(1, 4), rows, w)
    want = torch.nn.functional.cross_entropy(s_logits[rows], labels)
    assert total.item() == pytest.approx(want.item())
