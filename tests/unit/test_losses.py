"""The objective against numbers computed by hand (math module, no torch.nn.functional)."""
import math

import pytest
import torch

from distil_scale.losses import (Features, LossWeights, distillation_loss, hidden_cosine,
                                 logit_mse, soft_target_kl)


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
    total, raw = distillation_loss(Features(hs, s_logits), Features(ht, t_logits), labels,
                                   mask, slice(None), w)
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
    total, raw = distillation_loss(Features(h, s_logits), Features(h, t_logits), labels,
                                   torch.ones(1, 4), rows, w)
    want = torch.nn.functional.cross_entropy(s_logits[rows], labels)
    assert total.item() == pytest.approx(want.item())


# -- MiniLMv2 attention relations and TinyBERT hidden-state MSE --------------------------------

def _relation(rows, d):
    """softmax(x_i . x_j / sqrt(d)) over j, by hand, for the real tokens only."""
    return [_softmax([sum(a * b for a, b in zip(xi, xj)) / math.sqrt(d) for xj in rows])
            for xi in rows]


def _kl(pt, ps):
    return sum(b * math.log(b / a) for a, b in zip(ps, pt))


# one sequence of 3 tokens, the last one padding (its vectors are junk that must not count)
T_QKV = ([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]],
         [[2.0, 1.0], [-1.0, 0.5], [7.0, -3.0]],
         [[0.5, 0.5], [1.0, -2.0], [-8.0, 4.0]])
S_QKV = ([[0.5, 0.5], [1.0, -1.0], [-7.0, 3.0]],
         [[1.0, 1.0], [0.0, 2.0], [5.0, 5.0]],
         [[-1.0, 0.0], [0.3, 0.7], [6.0, 6.0]])


def _attn_rel_by_hand(t_qkv, s_qkv, n_real=2, d=2):
    per_relation = []
    for xt, xs in zip(t_qkv, s_qkv):
        pt, ps = _relation(xt[:n_real], d), _relation(xs[:n_real], d)
        per_relation.append(sum(_kl(a, b) for a, b in zip(pt, ps)) / n_real)
    return sum(per_relation) / 3


def _qkv(rows):
    return tuple(torch.tensor([x]) for x in rows)  # each (1, 3, 2)


def test_attn_rel_golden():
    from distil_scale.losses import attention_relation_kl

    want = _attn_rel_by_hand(T_QKV, S_QKV)
    mask = torch.tensor([[1, 1, 0]])
    got = attention_relation_kl(_qkv(S_QKV), _qkv(T_QKV), mask, heads=1)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(0.178018, abs=1e-5)  # hand value, in case both sides drift
    # flat row indices (what the training step passes) read the same tokens
    assert attention_relation_kl(_qkv(S_QKV), _qkv(T_QKV), torch.tensor([0, 1]), 1).item() == \
        pytest.approx(want, rel=1e-6)
    assert attention_relation_kl(_qkv(T_QKV), _qkv(T_QKV), mask, 1).item() == \
        pytest.approx(0.0, abs=1e-7)


def test_attn_rel_padding_never_counts():
    from distil_scale.losses import attention_relation_kl

    mask = torch.tensor([[1, 1, 0]])
    base = attention_relation_kl(_qkv(S_QKV), _qkv(T_QKV), mask, 1)
    # the same two real tokens without the padded one
    short = attention_relation_kl(tuple(x[:, :2] for x in _qkv(S_QKV)),
                                  tuple(x[:, :2] for x in _qkv(T_QKV)), torch.ones(1, 2), 1)
    assert base.item() == pytest.approx(short.item(), rel=1e-6)
    # whatever the padded token holds, as a key or as a query
    s_junk = tuple(x.clone() for x in _qkv(S_QKV))
    for x in s_junk:
        x[0, 2] = torch.tensor([1e4, -3e3])
    junk = attention_relation_kl(s_junk, _qkv(T_QKV), mask, 1)
    assert junk.item() == pytest.approx(base.item(), rel=1e-6)
    # and no NaN reaches the gradient through the masked scores
    s = tuple(x.clone().requires_grad_(True) for x in _qkv(S_QKV))
    attention_relation_kl(s, _qkv(T_QKV), mask, 1).backward()
    assert all(torch.isfinite(x.grad).all() and not x.grad[0, 2].any() for x in s)


def test_attn_rel_heads_split_each_width_on_its_own():
    """Teacher 4 wide, student 2 wide, 2 relation heads: the mean of the per-head losses, head h
    being the h-th slice of each side's features."""
    from distil_scale.losses import attention_relation_kl

    torch.manual_seed(0)
    t = tuple(torch.randn(2, 5, 4) for _ in range(3))
    s = tuple(torch.randn(2, 5, 2) for _ in range(3))
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    both = attention_relation_kl(s, t, mask, heads=2)
    per_head = [attention_relation_kl(tuple(x[..., h:h + 1] for x in s),
                                      tuple(x[..., 2 * h:2 * h + 2] for x in t), mask, heads=1)
                for h in range(2)]
    assert both.item() == pytest.approx(sum(per_head).item() / 2, rel=1e-5)


def test_hidden_mse_golden_and_padding():
    from distil_scale.losses import hidden_mse

    hs = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [100.0, 100.0]]])
    ht = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [-5.0, 5.0]]])
    keep = torch.tensor([[True, True, False]])
    assert hidden_mse(hs, ht, keep).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert hidden_mse(hs, ht, torch.tensor([0, 1])).item() == pytest.approx(7.5)





def test_hidden_mse_terms_last_and_mapped():
    hs = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [100.0, 100.0]]])
    ht = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [-5.0, 5.0]]])
    logits = torch.zeros(2, 3)
    real = torch.tensor([0, 1])
    w = LossWeights(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_hidden_mse=2.0)
    # "last": the (projected) last hidden state; a narrow student's comes as .aligned
    s = Features(torch.zeros(1, 3, 1), logits, aligned=hs)
    total, terms = distillation_loss(s, Features(ht, logits), None, real, None, w)
    assert terms["hidden_mse"].item() == pytest.approx(7.5) and total.item() == pytest.approx(15)
    # "mapped": layer i against the teacher layer it came from, averaged over layers
    w.hidden_mse_layers = "mapped"
    s = Features(hs, logits, layers=(hs, hs + 1))
    t = Features(ht, logits, layers=(ht, hs))
    _, terms = distillation_loss(s, t, None, real, None, w)
    assert terms["hidden_mse"].item() == pytest.approx((7.5 + 1.0) / 2)


def test_every_term_is_reported_and_the_off_ones_are_zero():
    torch.manual_seed(0)
    n, V, B, L, D = 5, 11, 2, 4, 6
    labels = torch.randint(0, V, (n,))
    mask = torch.ones(B, L, dtype=torch.long)
    w = LossWeights(5.0, 2.0, 1.0, 0.5, 2.0)
    total, terms = distillation_loss(Features(torch.randn(B, L, D), torch.randn(n, V)),
                                     Features(torch.randn(B, L, D), torch.randn(n, V)), labels,
                                     mask, slice(None), w)
    assert set(terms) == {"ce", "mlm", "cos", "mse", "attn_rel", "hidden_mse"}
    assert terms["attn_rel"].item() == 0.0 and terms["hidden_mse"].item() == 0.0
    assert total.item() == pytest.approx(5 * terms["ce"].item() + 2 * terms["mlm"].item()
                                         + terms["cos"].item() + 0.5 * terms["mse"].item(),
                                         rel=1e-6)


def test_total_includes_the_new_terms():
    torch.manual_seed(2)
    B, L, V = 1, 3, 7
    qs, qt = _qkv(S_QKV), _qkv(T_QKV)
    hs, ht = torch.randn(B, L, 2), torch.randn(B, L, 2)
    logits_s, logits_t = torch.randn(2, V), torch.randn(2, V)
    real = torch.tensor([0, 1])
    w = LossWeights(alpha_ce=1.0, alpha_mlm=0.0, alpha_cos=0.5, alpha_attn_rel=3.0,
                    alpha_hidden_mse=0.25, attn_rel_heads=1)
    total, raw = distillation_loss(Features(hs, logits_s, qkv=qs), Features(ht, logits_t, qkv=qt),
                                   None, real, None, w)
    assert raw["attn_rel"].item() == pytest.approx(_attn_rel_by_hand(T_QKV, S_QKV), rel=1e-6)
    want = raw["ce"] + 0.5 * raw["cos"] + 3.0 * raw["attn_rel"] + 0.25 * raw["hidden_mse"]
    assert total.item() == pytest.approx(want.item(), rel=1e-6)


def test_weights_from_config_resolve_relation_heads():
    from distil_scale.config import LossConfig

    w = LossWeights.from_config(LossConfig())
    assert (w.alpha_attn_rel, w.alpha_hidden_mse, w.hidden_mse_layers) == (0.0, 0.0, "last")
    assert LossWeights.from_config(LossConfig(), teacher_heads=12).attn_rel_heads == 12
    assert LossWeights.from_config(LossConfig(attn_rel_heads=48), 12).attn_rel_heads == 48
