"""Stops that are not failures, in process: the wall-clock limit checkpoints and exits 0, and an
auto-restart's --overwrite continues the run instead of deleting it."""
from __future__ import annotations

import sys

import pytest

from fixtures import read_metrics, tiny_overrides
from distil_scale import pretrain_cli
from distil_scale.train.setup import restart_policy


def _main(monkeypatch, args) -> int:
    monkeypatch.setattr(sys, "argv", ["launch/pretrain.py", *args])
    with pytest.raises(SystemExit) as e:
        pretrain_cli.main()
    return e.value.code


def test_wall_clock_limit_checkpoints_then_resume_finishes(tmp_path, tiny_teacher, corpus,
                                                           monkeypatch, capsys):
    out = tmp_path / "r"
    args = tiny_overrides(tiny_teacher, corpus, out, **{"train.log_every": 1})
    # 0.001 minutes have passed before the first micro-batch: the limit stops it, every time
    assert _main(monkeypatch, [*args, "train.max_wall_minutes=0.001"]) == 0
    said = capsys.readouterr().out
    assert "train.max_wall_minutes=0.001 reached: checkpoint saved at step 0; resume with" in said
    assert (out / "checkpoints" / "step-00000000" / "COMPLETE").is_file()
    assert not (out / "student").exists()
    # the limit may change on a resume; without one the run goes to the end
    assert _main(monkeypatch, [*args, "--resume"]) == 0
    said = capsys.readouterr().out
    assert "(step 0)" in said and "done:" in said
    assert [m["step"] for m in read_metrics(out) if "loss/total" in m] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("var", ["TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"])
def test_a_restart_turns_overwrite_into_resume(monkeypatch, var):
    lines = []
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert restart_policy(False, True, lines.append) == (False, True)  # a first attempt
    monkeypatch.setenv(var, "0")
    assert restart_policy(False, True, lines.append) == (False, True)
    assert not lines
    monkeypatch.setenv(var, "2")
    assert restart_policy(False, True, lines.append) == (True, False)
    assert lines == [f"--overwrite: this is restart 2 of the job ({var}=2); continuing the run "
                     "its first attempt started (as --resume) instead of deleting its "
                     "checkpoints"]
    assert restart_policy(True, False, lines.append) == (True, False)
    assert restart_policy(False, False, lines.append) == (False, False)
