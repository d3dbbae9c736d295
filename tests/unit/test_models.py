import re

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from distil_scale.errors import UserError
from distil_scale.config import StudentConfig
from distil_scale.hub import resolve_model_path
from distil_scale.models import (StudentForDistillation, TeacherForDistillation, build_student,
                                 even_layer_map)
from distil_scale.families import load_mlm


def _teacher(layers=4, hidden=32):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=hidden * 4,
                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForMaskedLM(cfg).eval()


def test_paper_layer_map():
    assert even_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert even_layer_map(6, 3) == [0, 2, 5]
    assert even_layer_map(4, 1) == [3]


def test_copied_layers_compute_what_teacher_layers_compute():
    teacher = _teacher()
    student, layers = build_student(teacher, StudentConfig(n_layers=2, layers=[1, 3], dropout=0,
                                                           attention_dropout=0))
    student.eval()
    ids = torch.randint(5, 120, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        t_out = teacher.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        # embeddings: the token-type row is folded into the position table
        s_emb = student.distilbert.embeddings(ids)
        assert torch.allclose(s_emb, t_out.hidden_states[0], atol=1e-5)
        ext = mask[:, None, None, :].float()
        ext = (1.0 - ext) * torch.finfo(torch.float32).min
        for s_idx, t_idx in enumerate(layers):
            h_in = t_out.hidden_states[t_idx]
            t_layer = teacher.bert.encoder.layer[t_idx](h_in, attention_mask=ext)
            t_layer = t_layer[0] if isinstance(t_layer, tuple) else t_layer
            s_layer = student.distilbert.transformer.layer[s_idx](h_in, attention_mask=ext)
            s_layer = s_layer[0] if isinstance(s_layer, tuple) else s_layer
            keep = mask.bool()
            assert torch.allclose(s_layer[keep], t_layer[keep], atol=1e-5), (s_idx, t_idx)
        # the vocabulary head is the teacher's: same logits from the same hidden state
        h = t_out.hidden_states[-1]
        t_logits = teacher.cls(h)
        s_logits = student.vocab_projector(student.vocab_layer_norm(
            student.activation(student.vocab_transform(h))))
        assert torch.allclose(s_logits, t_logits, atol=1e-4)
    assert student.vocab_projector.weight.data_ptr() == \
        student.distilbert.embeddings.word_embeddings.weight.data_ptr()


def test_random_init_differs_and_teacher_init_matches_embeddings():
    teacher = _teacher()
    s_rand, _ = build_student(teacher, StudentConfig(n_layers=2, init="random"))
    s_init, _ = build_student(teacher, StudentConfig(n_layers=2))
    w_t = teacher.bert.embeddings.word_embeddings.weight
    assert torch.equal(s_init.distilbert.embeddings.word_embeddings.weight, w_t)
    assert not torch.allclose(s_rand.distilbert.embeddings.word_embeddings.weight, w_t)


def test_bad_student_layers():
    teacher = _teacher()
    with pytest.raises(UserError, match="student.layers"):
        build_student(teacher, StudentConfig(n_layers=2, layers=[0, 9]))
    with pytest.raises(UserError, match="student.layers"):
        build_student(teacher, StudentConfig(n_layers=2, layers=[0]))
    with pytest.raises(UserError, match="student.n_layers"):
        build_student(teacher, StudentConfig(n_layers=6))


def test_wrappers_compute_logits_only_at_positions_and_teacher_is_frozen():
    teacher = _teacher()
    student, _ = build_student(teacher, StudentConfig(n_layers=2))
    tw, sw = TeacherForDistillation(teacher), StudentForDistillation(student)
    assert not any(p.requires_grad for p in tw.parameters()) and not tw.training
    ids = torch.randint(5, 120, (2, 10))
    pos = torch.zeros(2, 10, dtype=torch.bool)
    pos[0, 3] = pos[1, 7] = True
    out = sw(ids, torch.ones_like(ids), pos)
    h, logits = out[:2]  # the eval code reads [0] and [1]
    assert h.shape == (2, 10, 32) and logits.shape == (2, 120)
    # the default objective captures nothing more
    assert out.layers == () and out.qkv == () and out.aligned is None and sw.proj is None
    student.eval()
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        part = sw(ids, torch.ones_like(ids), pos).logits
    assert torch.allclose(part, full[pos], atol=1e-5)


def test_teacher_without_head_is_detected(tmp_path, tiny_teacher):
    from fixtures import make_tiny_teacher

    headless = make_tiny_teacher(tmp_path / "enc", layers=2, with_head=False)
    _, missing = load_mlm(str(headless))
    assert missing
    _, missing = load_mlm(str(tiny_teacher))
    assert not missing


def test_model_paths(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"  # a hub id


# -- narrow students, the projection, what the wrappers capture -------------------------------


def _loss_cfg(**kw):
    from distil_scale.config import LossConfig

    return LossConfig(**kw)


def test_narrow_student_init_choices():
    teacher = _teacher()
    with pytest.raises(UserError, match=r"^student.init: teacher copies 32-wide .* 16-wide .*"
                                        r"student.init=truncate"):
        build_student(teacher, StudentConfig(n_layers=2, dim=16))
    with pytest.raises(UserError, match="student.dim: 18 is not divisible by the 4 attention"):
        build_student(teacher, StudentConfig(n_layers=2, dim=18, init="random"))
    # a narrow student builds; the cosine term reaches the teacher through the wrapper's
    # projection
    rand, _ = build_student(teacher, StudentConfig(n_layers=2, dim=16, init="random"))
    assert rand.config.dim == 16 and rand.config.hidden_dim == 64  # the teacher's FFN ratio
    student, layers = build_student(teacher, StudentConfig(n_layers=2, dim=16, init="truncate"))
    tb, sb = teacher.bert, student.distilbert
    # truncate: the leading rows/columns of every teacher tensor (positions with the folded
    # token-type row, as the same-width copy has them)
    assert torch.equal(sb.embeddings.word_embeddings.weight,
                       tb.embeddings.word_embeddings.weight[:, :16])
    emb = tb.embeddings
    folded = emb.position_embeddings.weight + emb.token_type_embeddings.weight[0]
    assert torch.equal(sb.embeddings.position_embeddings.weight, folded[:, :16])
    t_layer, s_layer = tb.encoder.layer[layers[1]], sb.transformer.layer[1]
    assert torch.equal(s_layer.attention.q_lin.weight,
                       t_layer.attention.self.query.weight[:16, :16])
    assert torch.equal(s_layer.ffn.lin1.weight, t_layer.intermediate.dense.weight[:64, :16])
    assert torch.equal(s_layer.output_layer_norm.bias, t_layer.output.LayerNorm.bias[:16])
    assert torch.equal(student.vocab_projector.bias, teacher.cls.predictions.bias)
    assert student.vocab_projector.weight.data_ptr() == \
        sb.embeddings.word_embeddings.weight.data_ptr()


def test_narrow_same_family_student_truncates_every_tensor():
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    teacher = RobertaForMaskedLM(RobertaConfig(
        vocab_size=90, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=34, pad_token_id=1, type_vocab_size=1))
    student, layers = build_student(teacher, StudentConfig(n_layers=2, dim=16, init="truncate"))
    assert type(student) is RobertaForMaskedLM and student.config.intermediate_size == 64
    t_state = teacher.state_dict()
    for name, v in student.state_dict().items():
        src = re.sub(r"layer\.(\d+)\.", lambda m: f"layer.{layers[int(m[1])]}.", name)
        assert torch.equal(v, t_state[src][tuple(slice(0, n) for n in v.shape)]), name


def test_wrappers_capture_what_the_loss_config_reads():
    from distil_scale.models import wrap_for_distillation

    teacher = _teacher()
    student, layers = build_student(teacher, StudentConfig(n_layers=2, dim=16, init="truncate"))
    cfg = _loss_cfg(alpha_hidden_mse=1.0, hidden_mse_layers="mapped", alpha_attn_rel=1.0,
                    attn_rel_teacher_layer=-2)
    tw, sw = wrap_for_distillation(teacher, student, layers, cfg)
    sw.eval()  # no dropout: compared with separate forwards below
    ids = torch.randint(5, 120, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    rows = torch.tensor([0, 3, 11])
    with torch.no_grad():
        t, s = tw(ids, mask, rows), sw(ids, mask, rows)
        t_hs = teacher.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        s_hs = student.distilbert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # the teacher's mapped layers, the student's every layer through the projection
    assert len(t.layers) == len(s.layers) == 2
    for i, t_idx in enumerate(layers):
        assert torch.equal(t.layers[i], t_hs.hidden_states[t_idx + 1])
        assert torch.allclose(s.layers[i], sw.proj(s_hs.hidden_states[i + 1]))
    assert s.aligned.shape == (2, 10, 32) and s.hidden.shape == (2, 10, 16)
    # q/k/v: the stock Linear outputs on the layer's input (teacher layer -2 = 2, student last)
    t_attn = teacher.bert.encoder.layer[2].attention.self
    s_attn = student.distilbert.transformer.layer[1].attention
    with torch.no_grad():
        for got, lin in zip(t.qkv, (t_attn.query, t_attn.key, t_attn.value)):
            assert torch.allclose(got, lin(t_hs.hidden_states[2]), atol=1e-6)
        for got, lin in zip(s.qkv, (s_attn.q_lin, s_attn.k_lin, s_attn.v_lin)):
            assert torch.allclose(got, lin(s_hs.hidden_states[1]), atol=1e-6)
    # the projection is the student's (trained), and the export (.mlm) does not hold it
    assert any(p is sw.proj.weight for p in sw.parameters()) and sw.proj.weight.requires_grad
    assert not any(k.startswith("proj") for k in sw.mlm.state_dict())


def test_wrapper_setup_errors():
    from distil_scale.models import wrap_for_distillation

    teacher = _teacher()
    student, layers = build_student(teacher, StudentConfig(n_layers=2, dim=16, init="random"))
    with pytest.raises(UserError, match=r"^loss.attn_rel_heads: 32 relation heads must divide"):
        wrap_for_distillation(teacher, student, layers, _loss_cfg(alpha_attn_rel=1.0,
                                                                  attn_rel_heads=32))
    with pytest.raises(UserError, match=r"^loss.attn_rel_teacher_layer: 4 out of range"):
        wrap_for_distillation(teacher, student, layers, _loss_cfg(alpha_attn_rel=1.0,
                                                                  attn_rel_teacher_layer=4))
    # only a hidden-state term needs the projection
    _, sw = wrap_for_distillation(teacher, student, layers, _loss_cfg(alpha_cos=0.0))
    assert sw.proj is None


def test_one_step_trains_student_and_projection_not_teacher():
    from distil_scale.losses import LossWeights, distillation_loss
    from distil_scale.models import relation_heads, wrap_for_distillation

    teacher = _teacher()
    student, layers = build_student(teacher, StudentConfig(n_layers=2, dim=16, init="truncate"))
    cfg = _loss_cfg(alpha_hidden_mse=1.0, hidden_mse_layers="mapped", alpha_attn_rel=1.0,
                    alpha_mse=0.1)
    tw, sw = wrap_for_distillation(teacher, student, layers, cfg)
    w = LossWeights.from_config(cfg, teacher_heads=teacher.config.num_attention_heads)
    assert w.attn_rel_heads == relation_heads(cfg, teacher.config) == 4
    ids = torch.randint(5, 120, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    real = mask.flatten().nonzero().squeeze(1)
    masked = real[::3]
    labels = ids.flatten()[masked]
    with torch.no_grad():
        t = tw(ids, mask, real)
    s = sw(ids, mask, real)
    mlm_rows = torch.arange(0, len(real), 3)
    total, terms = distillation_loss(s, t, labels, real, mlm_rows, w)
    assert set(terms) == {"ce", "mlm", "cos", "mse", "attn_rel", "hidden_mse"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    total.backward()
    assert sw.proj.weight.grad is not None and sw.proj.weight.grad.abs().sum() > 0
    assert student.distilbert.transformer.layer[1].attention.q_lin.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("drop_tied", ["input", "output"])
def test_rebuild_student_keeps_projection_and_either_tied_name(drop_tied):
    from transformers import RobertaConfig, RobertaForMaskedLM

    from distil_scale.models import rebuild_student
    from distil_scale.models import wrap_for_distillation

    torch.manual_seed(0)
    teacher = RobertaForMaskedLM(RobertaConfig(
        vocab_size=90, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=34, pad_token_id=1))
    student, layers = build_student(teacher, StudentConfig(n_layers=2, dim=16, init="truncate"))
    _, sw = wrap_for_distillation(teacher, student, layers, _loss_cfg(alpha_attn_rel=1.0))
    full = {k: v.clone() for k, v in sw.state_dict().items()}
    # DeepSpeed's export walks named_parameters: a tied tensor comes under one of its names
    full.pop("mlm.roberta.embeddings.word_embeddings.weight" if drop_tied == "input"
             else "mlm.lm_head.decoder.weight")
    full.pop("mlm.lm_head.decoder.bias")
    rebuilt = rebuild_student(sw, full)
    assert type(rebuilt.mlm) is RobertaForMaskedLM and rebuilt.spec == sw.spec
    assert rebuilt.proj is not None and torch.equal(rebuilt.proj.weight, sw.proj.weight)
    for k, v in sw.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    sd = rebuilt.mlm.state_dict()
    assert sd["lm_head.decoder.weight"].data_ptr() == \
        sd["roberta.embeddings.word_embeddings.weight"].data_ptr()
    full.pop("mlm.lm_head.dense.weight")
    with pytest.raises(RuntimeError, match="lm_head.dense.weight"):
        rebuild_student(sw, full)


def test_config_fields_for_families_and_new_terms():
    from distil_scale.config import ConfigError, load_config

    cfg = load_config(overrides=["student.family=roberta", "student.init=truncate",
                                 "student.dim=384", "loss.alpha_attn_rel=1",
                                 "loss.attn_rel_heads=12", "loss.attn_rel_teacher_layer=-2",
                                 "loss.alpha_hidden_mse=0.5", "loss.hidden_mse_layers=mapped"])
    assert (cfg.student.family, cfg.loss.hidden_mse_layers) == ("roberta", "mapped")
    # only the new terms on is a valid objective
    load_config(overrides=["loss.alpha_ce=0", "loss.alpha_mlm=0", "loss.alpha_cos=0",
                           "loss.alpha_attn_rel=1"])
    for bad, msg in [("student.family=gpt2", r"^student.family: must be one of auto, bert"),
                     ("student.init=truncate", r"^student.init: truncate .* set student.dim"),
                     ("loss.attn_rel_heads=-1", r"^loss.attn_rel_heads: must be >= 0"),
                     ("loss.alpha_hidden_mse=-1", r"^loss.alpha_hidden_mse: must be >= 0"),
                     ("loss.hidden_mse_layers=all", r"^loss.hidden_mse_layers: must be one of")]:
        with pytest.raises(ConfigError, match=msg) as e:
            load_config(overrides=[bad])
        assert "\n" not in str(e.value)
