"""Every family through the real loop and every engine: a tiny teacher of each supported family
(built in code, saved with a real tokenizer), a narrow student of its own family with every
objective term on (KL, MLM, cosine through the projection, per-layer hidden MSE, attention
relations), trained, checkpointed and exported; the export read back by
``transformers.pipeline("fill-mask")``. Plain engine, in process; the other engines:
tests/multiprocess/test_family_engines.py."""
import pytest

from fixtures import (EVERY_TERM, check_family_export, check_terms, save_family_teacher,
                      tiny_overrides)

from distil_scale.config import load_config
from distil_scale.families import FAMILIES
from distil_scale.train import train


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
    check_family_export(out, model_type)
