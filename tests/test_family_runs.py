"""Every family through the real loop and every engine: a tiny teacher of each supported family
(built in code, saved with a real tokenizer), a narrow student of its own family with every
objective term on (KL, MLM, cosine through the projection, per-layer hidden MSE, attention
relations), trained, checkpointed and exported; the export read back by
``transformers.pipeline("fill-mask")``. Plain in process; DDP, FSDP2 and DeepSpeed ZeRO-2 as two
real ranks on gloo."""
import math

import pytest
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

from fixtures import (REPO, launch_cmd, metrics_by_step, run, save_family_teacher,
                      tiny_overrides, write_corpus)

from distil_scale.config import load_config
from distil_scale.families import FAMILIES
from distil_scale.train import train

EVERY_TERM = {"student.init": "truncate", "student.dim": 16, "loss.alpha_attn_rel": 1.0,
              "loss.attn_rel_heads": 2, "loss.alpha_hidden_mse": 1.0,
              "loss.hidden_mse_layers": "mapped"}
TERMS = ("loss/ce", "loss/mlm", "loss/cos", "loss/attn_rel", "loss/hidden_mse")


def check_export(out, model_type: str) -> None:
    """A stock *ForMaskedLM of the teacher's default student family, 16 wide, that fills a
    mask."""
    export = out / "student"
    model = AutoModelForMaskedLM.from_pretrained(export)
    want = FAMILIES[FAMILIES[model_type].default_student].mlm_class
    assert type(model).__name__ == want
    assert model.config.hidden_size == 16
    tok = AutoTokenizer.from_pretrained(export)
    top = pipeline("fill-mask", model=model, tokenizer=tok)(f"the river {tok.mask_token} city")
    assert len(top) == 5 and all(math.isfinite(t["score"]) for t in top)


def check_terms(out, step: int) -> None:
    row = metrics_by_step(out)[step]
    for k in TERMS:
        assert math.isfinite(row[k]) and row[k] > 0, (k, row)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_trains_a_narrow_student_on_every_term(model_type, tmp_path, corpus):
    teacher = save_family_teacher(model_type, tmp_path / "teacher")
    out = tmp_path / "run"
    # precision auto, as the demo runs: bf16 autocast on a CPU with native bf16
    cfg = load_config(None, tiny_overrides(teacher, corpus, out, **EVERY_TERM,
                                           **{"train.max_steps": 4, "train.eval_every": 4,
                                              "train.precision": "auto"}))
    summary = train(cfg)
    assert summary["steps"] == 4
    check_terms(out, 4)
    check_export(out, model_type)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,backend", [("torchrun", ["parallel.backend=ddp"]),
                                              ("torchrun", ["parallel.backend=fsdp"]),
                                              ("deepspeed", ["--ds", "ds_configs/cpu.json"])])
def test_roberta_narrow_every_term_on_two_ranks(launcher, backend, tmp_path):
    teacher = save_family_teacher("roberta", tmp_path / "teacher")
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=120)
    out = tmp_path / "run"
    args = tiny_overrides(teacher, corpus, out, **EVERY_TERM,
                          **{"train.max_steps": 4, "train.precision": "bf16",
                             "train.micro_batch": 2, "checkpoint.every_steps": 2})
    backend = [str(REPO / a) if a.endswith(".json") else a for a in backend]
    log = run(launch_cmd(launcher, 2, [*backend, *args]))
    assert " x2 " in log, log[-3000:]
    check_terms(out, 4)
    assert (out / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
    check_export(out, "roberta")
