import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from distil_scale.cli import UserError
from distil_scale.config import StudentConfig
from distil_scale.models import (StudentForDistillation, TeacherForDistillation, build_student,
                                 even_layer_map, load_bert_mlm, resolve_model_path)


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
    h, logits = sw(ids, torch.ones_like(ids), pos)
    assert h.shape == (2, 10, 32) and logits.shape == (2, 120)
    student.eval()
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        _, part = sw(ids, torch.ones_like(ids), pos)
    assert torch.allclose(part, full[pos], atol=1e-5)


def test_teacher_without_head_is_detected(tmp_path, tiny_teacher):
    from conftest import make_tiny_teacher

    headless = make_tiny_teacher(tmp_path / "enc", layers=2, with_head=False)
    _, missing = load_bert_mlm(str(headless))
    assert missing
    _, missing = load_bert_mlm(str(tiny_teacher))
    assert not missing


def test_model_paths(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"  # a hub id
