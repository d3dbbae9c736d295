"""The family table: every supported teacher family, a student cut from it (its own family and,
where the layers are BERT-shaped, DistilBERT), checked layer by layer against the teacher, and
exported students read back by ``transformers.pipeline``.

Tiny models built in code. BERT, DistilBERT, ELECTRA and DeBERTa-v2 use the real 30,522-token
uncased WordPiece tokenizer (all-MiniLM-L6-v2's); RoBERTa and XLM-R use a byte-level BPE
trained here on a few sentences (pad id 1, so positions start at 2 as in the real models).
"""

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, pipeline

from fixtures import (BPE_FAMILIES, FAMILY_SENTENCES as SENTENCES, bpe_tokenizer, family_config,
                      make_family_teacher, wordpiece_tokenizer)

from distil_scale import families
from distil_scale.errors import UserError
from distil_scale.config import StudentConfig
from distil_scale.families import FAMILIES, family_of, load_mlm, student_family
from distil_scale.models import build_student

@pytest.fixture(scope="session")
def wordpiece():
    return wordpiece_tokenizer()


@pytest.fixture(scope="session")
def bpe():
    return bpe_tokenizer()


def tokenizer_for(model_type, wordpiece, bpe):
    return bpe if model_type in BPE_FAMILIES else wordpiece


def batch(tok):
    enc = tok([SENTENCES[0], "the king of the island"], padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # a padded row: padding must not matter
    return enc["input_ids"], enc["attention_mask"]


def assert_layers_match(teacher, student, layers, ids, mask):
    """The student's embedding output and each copied layer (fed the teacher's input of the
    layer it copies) equal the teacher's, on every real token."""
    t_fam, s_fam = family_of(teacher), family_of(student)
    keep = mask.bool()
    with torch.no_grad():
        t_hs = t_fam.encode(teacher, ids, mask, hidden_states=True).hidden_states
        s_hs = s_fam.encode(student, ids, mask, hidden_states=True).hidden_states
        assert torch.allclose(s_hs[0][keep], t_hs[0][keep], atol=1e-5), "embeddings"
        for s_idx, t_idx in enumerate(layers):
            def feed(module, args, kwargs, h=t_hs[t_idx]):
                if args:
                    return (h, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": h}

            hook = s_fam.layers(student)[s_idx].register_forward_pre_hook(feed, with_kwargs=True)
            try:
                s_out = s_fam.encode(student, ids, mask, hidden_states=True).hidden_states
            finally:
                hook.remove()
            assert torch.allclose(s_out[s_idx + 1][keep], t_hs[t_idx + 1][keep], atol=1e-5), \
                (s_idx, t_idx)
        # the vocabulary head is the teacher's: the same logits from the same hidden rows
        rows = t_hs[-1][keep]
        assert torch.allclose(s_fam.head_logits(student, rows), t_fam.head_logits(teacher, rows),
                              atol=1e-4)


CUTS = [("bert", "auto", "distilbert"), ("bert", "bert", "bert"),
        ("distilbert", "auto", "distilbert"),
        ("roberta", "auto", "roberta"), ("roberta", "distilbert", "distilbert"),
        ("xlm-roberta", "auto", "xlm-roberta"), ("xlm-roberta", "distilbert", "distilbert"),
        ("electra", "auto", "electra"), ("electra", "distilbert", "distilbert"),
        ("deberta-v2", "auto", "deberta-v2")]


@pytest.mark.parametrize("model_type,family,want", CUTS, ids=[f"{a}->{c}" for a, _, c in CUTS])
def test_copied_student_computes_what_teacher_layers_compute(model_type, family, want, wordpiece,
                                                              bpe):
    tok = tokenizer_for(model_type, wordpiece, bpe)
    teacher = make_family_teacher(model_type, tok)
    student, layers = build_student(teacher, StudentConfig(
        n_layers=2, layers=[1, 3], family=family, dropout=0.0, attention_dropout=0.0))
    assert family_of(student).model_type == want and layers == [1, 3]
    assert student.config.num_hidden_layers == 2
    student.eval()
    assert_layers_match(teacher, student, layers, *batch(tok))
    fam = family_of(student)
    for out_name, in_name in fam.tied_pairs(student):  # the output projection stays tied
        sd = student.state_dict()
        assert sd[out_name].data_ptr() == sd[in_name].data_ptr()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_table_entries_match_the_stock_classes(model_type, wordpiece, bpe):
    tok = tokenizer_for(model_type, wordpiece, bpe)
    model = make_family_teacher(model_type, tok)
    fam = family_of(model)
    assert type(model) is fam.cls() and fam.model_type == model_type
    state = model.state_dict()
    # every declared tie is real (one tensor under two names) and the head prefixes cover the
    # head's parameters
    assert fam.tied_pairs(model) == list(fam.tied)
    for a, b in fam.tied:
        assert state[a].data_ptr() == state[b].data_ptr()
    dense, norm, bias = fam.head_pieces(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for p in fam.head_parameters(model):
        assert names[id(p)].startswith(fam.head_prefixes)
    assert len(fam.layers(model)) == 4
    for lin in fam.qkv(model, 0):
        assert isinstance(lin, torch.nn.Linear) and lin.out_features == 32
    assert fam.max_positions(model.config) == 64  # RoBERTa: 66 rows less padding_idx + 1
    # the students each family may have
    assert student_family(model.config, "auto").model_type == fam.default_student


def test_student_family_errors(wordpiece):
    deberta = family_config("deberta-v2", wordpiece)
    with pytest.raises(UserError, match=r"student.family: a 'distilbert' student cannot be cut "
                                        r"from a 'deberta-v2' teacher; use auto \(deberta-v2\)"):
        student_family(deberta, "distilbert")
    with pytest.raises(UserError, match=r"'roberta' student .* 'bert' teacher; use auto "
                                        r"\(distilbert\)$"):
        student_family(family_config("bert", wordpiece), "roberta")
    with pytest.raises(UserError, match=r"'roberta' student .* 'electra' teacher; use auto "
                                        r"\(electra\) or distilbert$"):
        student_family(family_config("electra", wordpiece), "roberta")
    with pytest.raises(UserError, match="student.family: unknown family 'gpt2'"):
        student_family(deberta, "gpt2")
    # ELECTRA with factorised embeddings: a DistilBERT layout cannot hold them
    conf = family_config("electra", wordpiece)
    conf.embedding_size = 16
    teacher = AutoModelForMaskedLM.from_config(conf)
    with pytest.raises(UserError, match="student.family: .*embeddings as wide"):
        build_student(teacher, StudentConfig(n_layers=2, family="distilbert"))
    # its own family copies the factorised embeddings and their projection as they are
    student, layers = build_student(teacher, StudentConfig(n_layers=2, dropout=0.0,
                                                           attention_dropout=0.0))
    teacher.eval(), student.eval()
    assert student.electra.embeddings_project.weight.shape == (32, 16)
    assert_layers_match(teacher, student, layers, *batch(wordpiece))


def test_config_lists_every_family():
    import typing

    from distil_scale.config import StudentConfig as SC

    allowed = typing.get_args(typing.get_type_hints(SC)["family"])
    assert set(allowed) == {"auto", *FAMILIES}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_load_detects_a_missing_head(model_type, tmp_path, wordpiece, bpe):
    tok = tokenizer_for(model_type, wordpiece, bpe)
    conf = family_config(model_type, tok)
    torch.manual_seed(0)
    AutoModel.from_config(conf).save_pretrained(tmp_path / "encoder")  # no MLM head
    AutoModelForMaskedLM.from_config(conf).save_pretrained(tmp_path / "mlm")
    # sdpa asked for: DeBERTa-v2 has none and falls back to eager instead of failing
    model, missing = load_mlm(str(tmp_path / "encoder"), "sdpa")
    assert missing and family_of(model).model_type == model_type
    _, missing = load_mlm(str(tmp_path / "mlm"), "sdpa")
    assert not missing


def test_unsupported_model_type_is_one_line(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UserError) as e:
        load_mlm(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("teacher.name_or_path:") and "'gpt2'" in msg
    assert all(f in msg for f in FAMILIES)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "deberta-v2"])
def test_reset_head_is_identity_transform_and_unigram_bias(model_type, wordpiece, bpe):
    tok = tokenizer_for(model_type, wordpiece, bpe)
    model = make_family_teacher(model_type, tok)
    fam = family_of(model)
    counts = torch.arange(len(tok) + 5, dtype=torch.long)  # longer than the vocabulary
    families.reset_head(model, counts)
    dense, norm, bias = fam.head_pieces(model)
    assert torch.equal(dense.weight, torch.eye(32)) and not dense.bias.any()
    assert torch.equal(norm.weight, torch.ones(32)) and not norm.bias.any()
    p = counts[:bias.numel()].float() + 1
    assert torch.allclose(bias, torch.log(p / p.sum()))
    # the tied decoder bias (where there is one) is the same tensor, so it moved too
    head_params = families.head_parameters(model)
    assert [id(x) for x in head_params] == [id(x) for x in (
        dense.weight, dense.bias, norm.weight, norm.bias, bias)]


def test_bert_head_parameters_keep_the_preparation_order(wordpiece):
    model = make_family_teacher("bert", wordpiece)
    head = model.cls.predictions
    want = list(head.transform.parameters()) + [head.bias]
    assert [id(p) for p in family_of(model).head_parameters(model)] == [id(p) for p in want]


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_exported_student_loads_in_a_fill_mask_pipeline(model_type, tmp_path, wordpiece, bpe):
    tok = tokenizer_for(model_type, wordpiece, bpe)
    teacher = make_family_teacher(model_type, tok)
    student, _ = build_student(teacher, StudentConfig(n_layers=2, dropout=0.0,
                                                      attention_dropout=0.0))
    student.save_pretrained(tmp_path)
    fill = pipeline("fill-mask", model=str(tmp_path), tokenizer=tok, device="cpu")
    assert type(fill.model) is type(student)
    out = fill(f"the river {tok.mask_token} through the town", top_k=3)
    assert len(out) == 3 and all(0 <= o["token"] < len(tok) for o in out)
    # what it loaded is what was saved: the same logits at the masked position
    enc = tok(f"the river {tok.mask_token} through the town", return_tensors="pt")
    fam = family_of(student)
    student.eval()
    with torch.no_grad():
        ids, mask = enc["input_ids"], enc["attention_mask"]
        want = fam.head_logits(student, fam.encode(student, ids, mask)[0])
        got = fam.head_logits(fill.model, fam.encode(fill.model, ids, mask)[0])
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_narrow_student_distils_through_every_term(model_type, wordpiece, bpe):
    """Every family: a half-width student (truncated), the projection, mapped hidden MSE and
    attention relations, one backward pass."""
    from distil_scale.config import LossConfig
    from distil_scale.losses import LossWeights, distillation_loss
    from distil_scale.models import wrap_for_distillation

    tok = tokenizer_for(model_type, wordpiece, bpe)
    teacher = make_family_teacher(model_type, tok)
    student, layers = build_student(teacher, StudentConfig(n_layers=2, dim=16, init="truncate"))
    assert student.config.hidden_size == 16 and family_of(student).ffn_size(student.config) == 32
    cfg = LossConfig(alpha_hidden_mse=1.0, hidden_mse_layers="mapped", alpha_attn_rel=1.0)
    tw, sw = wrap_for_distillation(teacher, student, layers, cfg)
    ids, mask = batch(tok)
    real = mask.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        t = tw(ids, mask, real)
    s = sw(ids, mask, real)
    B, L = ids.shape
    # the projections' first calls: (B, L, width), not DeBERTa's relative-position ones
    assert [x.shape for x in t.qkv] == [(B, L, 32)] * 3
    assert [x.shape for x in s.qkv] == [(B, L, 16)] * 3
    assert len(s.layers) == len(t.layers) == 2 and s.aligned.shape == (B, L, 32)
    w = LossWeights.from_config(cfg, teacher.config.num_attention_heads)
    total, terms = distillation_loss(s, t, ids.flatten()[real], real, slice(None), w)
    assert all(torch.isfinite(v) for v in terms.values()) and terms["attn_rel"] > 0
    total.backward()
    assert sw.proj.weight.grad.abs().sum() > 0
