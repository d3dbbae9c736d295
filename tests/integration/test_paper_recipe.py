"""The paper recipe as shipped (configs/paper.yaml), shrunk only in model and data size, and
the pieces of it that only a GPU would otherwise exercise: precision choice on a V100, the
fp16 loss scaler's calibration, the MFU peak."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import REPO, SHARED, minilm_path

WIKI = SHARED / "data" / "wikipedia_sample" / "articles.jsonl"


def _teacher_12_layers(out: Path) -> Path:
    """A 12-layer teacher (so the paper's layer map 0,2,4,7,9,11 applies), 32 wide, with the
    real uncased vocabulary and tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=12,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.skipif(not WIKI.is_file(), reason=f"needs the Wikipedia sample at {WIKI}")
def test_paper_config_trains_with_its_own_code_paths(tmp_path):
    """train() through configs/paper.yaml: frequency-smoothed masking (counts read once, eval
    masks unsmoothed), KL over every token, frozen position embeddings, the measured MFU peak,
    dropout, the default precision. Only the model, the data and the run's length shrink."""
    from transformers import BertForMaskedLM, DistilBertForMaskedLM

    from distil_scale.config import load_config
    from distil_scale.train import train

    teacher = _teacher_12_layers(tmp_path / "teacher")
    out = tmp_path / "run"
    cfg = load_config(str(REPO / "configs" / "paper.yaml"), [
        f"teacher.name_or_path={teacher}", f"data.source={WIKI}", f"run.output_dir={out}",
        "data.max_seq_len=64", "data.shuffle_buffer=64", "data.heldout_fraction=0.05",
        "data.eval_sequences=8", "train.global_batch=8", "train.micro_batch=4",
        "train.max_steps=4", "train.warmup_steps=1", "train.log_every=2",
        "metrics.progress_bar=false"])
    assert cfg.masking.smoothing == 0.7 and cfg.loss.kl_positions == "all"
    assert cfg.student.freeze_position_embeddings and cfg.metrics.peak_tflops == 0
    summary = train(cfg)
    assert summary["steps"] == 4

    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        for k in ("loss/ce", "loss/mlm", "loss/cos", "perf/mfu"):
            assert 0 < r[k] < float("inf"), (k, r)
    assert 0 < logged[-1]["perf/mfu"] < 1  # over a measured peak, not a fixed one

    student = DistilBertForMaskedLM.from_pretrained(out / "student")
    t = BertForMaskedLM.from_pretrained(teacher).bert.embeddings
    pos = student.distilbert.embeddings.position_embeddings.weight
    # frozen: still the teacher's positions (with its segment-0 row folded in, as at init)
    torch.testing.assert_close(pos, t.position_embeddings.weight + t.token_type_embeddings.weight[0],
                               rtol=0, atol=1e-6)
    words = student.distilbert.embeddings.word_embeddings.weight
    assert not torch.allclose(words, t.word_embeddings.weight)  # the rest did train


def test_eval_masks_are_unsmoothed_and_need_no_counts():
    from transformers import AutoTokenizer

    from distil_scale.config import MaskingConfig
    from distil_scale.data.masking import make_eval_masker, make_masker

    tok = AutoTokenizer.from_pretrained(minilm_path())
    mcfg = MaskingConfig(smoothing=0.7)
    with pytest.raises(ValueError, match="needs token counts"):
        make_masker(tok, mcfg, seed=0)  # a smoothed training masker without counts is a bug
    m = make_eval_masker(tok, mcfg)
    assert np.unique(m.weight[m.weight > 0]).tolist() == [1.0]


def test_v100_auto_precision_is_fp16_not_emulated_bf16(monkeypatch):
    """sm_70 reports bf16 as supported through emulation; auto must pick fp16 there."""
    from distil_scale.runtime import resolve_precision

    def bf16_supported(including_emulation=True):
        return including_emulation  # a V100: only emulated
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"  # an A100/H100/4070


def test_loss_scale_calibration_is_not_divergence():
    """fp16 starts its loss scale at 2^16 and drops the first updates while it calibrates: those
    skips must not count toward train.max_nonfinite_steps; a non-finite loss still does."""
    from distil_scale.engine.base import Engine, OptimSpec, StepResult

    model = torch.nn.Linear(4, 1)
    eng = Engine(model, OptimSpec(lr=1e-3, total_steps=10, max_grad_norm=1.0), precision="fp32",
                 accum_steps=1, device=torch.device("cpu"))
    # the fp16 path's scaler, on CPU: gradients overflow only once scaled by 2^16
    eng.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = model.weight.detach().clone()
    eng.backward(model.weight.sum() * 1e35)
    r = eng.step()
    assert r.skipped and r.scale_backoff
    assert eng.scaler.get_scale() == 2.0 ** 15
    assert torch.equal(model.weight, before)  # the update was dropped
    assert not r.diverged(loss_finite=True)
    assert r.diverged(loss_finite=False)
    assert StepResult(float("nan"), skipped=True).diverged(loss_finite=True)  # bf16/fp32


def test_mfu_peak_says_where_it_comes_from_and_leaves_the_generators_alone():
    from distil_scale.metrics import matmul_peak_size, mfu_peak

    assert matmul_peak_size(torch.device("cuda")) >= 8192  # 1024^3 is launch-bound on an H100
    flops, how = mfu_peak(989.0, torch.device("cpu"), torch.bfloat16)
    assert flops == 989e12 and "metrics.peak_tflops" in how
    state = torch.get_rng_state()
    flops, how = mfu_peak(0.0, torch.device("cpu"), torch.float32)
    assert flops > 1e9 and "measured" in how
    assert torch.equal(torch.get_rng_state(), state)
