"""The memory planner: the shipped profiles' verdicts, its arithmetic against DeepSpeed's own
estimators and against activations measured on a real (tiny) student, and its error contract."""
from __future__ import annotations

import json

import pytest
import torch

from distil_scale.config import ConfigError, load_config
from distil_scale.ds_config import load_ds_config
from distil_scale.tools.plan import GiB, PAPER, main, make_plan
from fixtures import REPO

RTX = str(REPO / "ds_configs" / "rtx4070.json")
V100 = str(REPO / "ds_configs" / "v100x8.json")
CPU = str(REPO / "ds_configs" / "cpu.json")
DISTILBERT_BASE_MLM_PARAMS = 66_985_530  # distilbert-base-uncased with its (tied) MLM head


def plan_for(ds_path, gpus=1, gib=12.0, overrides=()):
    cfg = load_config(PAPER, list(overrides))
    ds = load_ds_config(ds_path, cfg, gpus)
    return make_plan(cfg, ds, gpus=gpus, nodes=1, gpu_mem_gib=gib)


def row(plan, prefix):
    (r,) = [r for r in plan.rows if r.label.startswith(prefix)]
    return r


def test_rtx4070_fits_12_gib_with_the_paper_student(capsys):
    assert main(["--ds", RTX, "--gpu-mem-gib", "12"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("fits: ") and "headroom +" in lines[-1], lines[-1]
    text = "\n".join(lines)
    for what in ("student parameters (bf16)", "student gradients", "optimizer states",
                 "activations (6 layers", "vocabulary loss (fused, chunked)", "teacher weights",
                 "estimate_zero2_model_states_mem_needs", "global 4096", "offloaded to CPU"):
        assert what in text, what
    p = plan_for(RTX)
    assert f"P = {DISTILBERT_BASE_MLM_PARAMS / 1e6:.2f}M" in p.header[1]
    assert row(p, "student parameters").nbytes == 2 * DISTILBERT_BASE_MLM_PARAMS
    assert row(p, "optimizer states").nbytes == 0  # offloaded
    assert row(p, "teacher weights").nbytes == 2 * 109_514_298  # bert-base-uncased, half
    assert p.total < 12 * GiB and p.fits


def test_fused_loss_row_is_the_chunk_not_the_micro_batch():
    """The default (loss.fused) plans one 1024-row chunk of logits; loss.fused=false plans the
    whole micro-batch's (8192 rows at micro 16 x seq 512), as the bench measures it."""
    fused = row(plan_for(RTX), "vocabulary loss (fused")
    naive = row(plan_for(RTX, overrides=["loss.fused=false"]), "vocabulary logits")
    V, h = 30522, 768
    assert naive.nbytes == 8192 * V * 28
    assert fused.nbytes == 14 * 1024 * V + 4 * V * h + 4 * 8192 * h + 4 * V * h
    assert naive.nbytes / fused.nbytes > 8
    assert "chunk = 1024 of n_sel = 16 x 512 x 1 = 8192 rows" in fused.how
    # the logit MSE reads whole logits: it plans the unfused path
    row(plan_for(RTX, overrides=["loss.alpha_mse=1"]), "vocabulary logits")


def test_v100x8_fits_16_gib_with_the_paper_batch():
    p = plan_for(V100, gpus=8, gib=16)
    assert "fp16" in p.header[3] and "accumulation 32 x 8 GPU(s) = global 4096" in p.header[3]
    # ZeRO-2 without offload: fp32 master + Adam moments (12 B/param) split 8 ways; the fp32
    # gradients are the fp32 accumulation partition (data_types.grad_accum_dtype), also split
    assert row(p, "optimizer states").nbytes == pytest.approx(12 * DISTILBERT_BASE_MLM_PARAMS / 8)
    grads = row(p, "student gradients (accumulated in fp32)")
    assert grads.nbytes == pytest.approx(4 * DISTILBERT_BASE_MLM_PARAMS / 8 + 5e7 * 2)
    assert p.fits


def test_accumulation_dtype_comes_from_the_json(tmp_path):
    ds = json.loads(open(V100).read())
    ds.pop("data_types")  # DeepSpeed's default: accumulate in the model's dtype (fp16)
    path = tmp_path / "v100_fp16_accum.json"
    path.write_text(json.dumps(ds))
    p = plan_for(str(path), gpus=8, gib=16)
    assert row(p, "student gradients (accumulated in fp16)").nbytes == pytest.approx(
        2 * DISTILBERT_BASE_MLM_PARAMS / 8 + 5e7 * 2)
    assert row(p, "optimizer states").nbytes == pytest.approx(16 * DISTILBERT_BASE_MLM_PARAMS / 8)


def test_does_not_fit_is_the_last_line_and_exit_code_1(capsys):
    assert main(["--ds", RTX, "--gpu-mem-gib", "3", "train.micro_batch=64"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("does not fit: ") and "headroom -" in last


@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (2, True), (3, False),
                                           (3, True)])
def test_model_states_never_below_deepspeeds_estimate(tmp_path, stage, offload):
    ds = json.loads(open(RTX).read())
    ds["zero_optimization"]["stage"] = stage
    if not offload:
        ds["zero_optimization"].pop("offload_optimizer")
    elif stage == 3:
        ds["zero_optimization"]["offload_param"] = {"device": "cpu"}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ds))
    for gpus in (1, 8):
        p = plan_for(str(path), gpus=gpus)
        assert p.ds_estimate_gpu is not None
        assert p.model_state_bytes >= p.ds_estimate_gpu * 0.999, (stage, offload, gpus)


@pytest.mark.parametrize("dropout,slack", [(0.0, 0.05), (0.1, 0.2)])
def test_activation_formula_matches_saved_tensors_of_a_real_student(dropout, slack, tmp_path):
    """Eager attention, fp32 on CPU: count the bytes autograd keeps for backward."""
    from transformers import BertConfig, DistilBertForMaskedLM

    from distil_scale.models import StudentForDistillation, student_config

    t = BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=512)
    sc = student_config(t, "distilbert", 2, 0, dropout, dropout, "eager")
    model = StudentForDistillation(DistilBertForMaskedLM(sc)).train()
    s, b = 128, 4
    ids = torch.randint(1000, 2000, (b, s))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool))
    cfg = load_config(None, [f"student.dropout={dropout}", f"student.attention_dropout={dropout}",
                             "train.attn_implementation=eager", "data.max_seq_len=128",
                             "train.micro_batch=4", "train.global_batch=4",
                             "train.precision=fp32", "student.n_layers=2"])
    t.save_pretrained(tmp_path)  # the planner reads the teacher's config only
    cfg.teacher.name_or_path = str(tmp_path)
    ds = load_ds_config(CPU, cfg, 1)
    p = make_plan(cfg, ds, gpus=1, nodes=1, gpu_mem_gib=1)
    est = row(p, "activations").nbytes
    measured = sum(kept.values())
    assert abs(measured - est) <= slack * measured, (measured, est)


def test_contradicting_batch_is_a_one_line_error(tmp_path):
    ds = json.loads(open(RTX).read())
    ds["train_micro_batch_size_per_gpu"] = 8
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 .* contradicts "
                                          "train.micro_batch=16"):
        main(["--ds", str(path), "--gpu-mem-gib", "12"])


@pytest.mark.parametrize("gib", ["0", "-4"])
def test_non_positive_gpu_memory_is_one_line(gib):
    from distil_scale.config import ConfigError

    with pytest.raises(ConfigError, match=r"^--gpu-mem-gib: .* e\.g\. --gpu-mem-gib 12$"):
        main(["--ds", RTX, "--gpu-mem-gib", gib])
