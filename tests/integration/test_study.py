"""launch/study.py end to end at tiny size: a teacher prepared once, four arms from two paired
pretraining seeds through the trainer, every model scored on the whole held-out set and an
SST-2 probe, the fine-tuning cells (teacher, full, DistilBERT(D), step-0 control); the table and
the plot written; the same command reruns nothing, and a changed setting reruns only the cells
it reaches."""
import json
import re

from fixtures import run_launcher, tiny_overrides, write_fixture

from distil_scale.tools.study import run_cli

OWNED = ("run.output_dir", "train.max_steps", "train.eval_every", "checkpoint.every_steps")


def test_tiny_study_writes_its_tables_and_reruns_only_changed_cells(tmp_path, tiny_teacher,
                                                                   corpus, capsys):
    glue = write_fixture(tmp_path / "glue", "sst2", n_train=40, n_dev=16)
    shrink = [o for o in tiny_overrides(tiny_teacher, corpus, tmp_path / "unused")
              if o.split("=")[0] not in OWNED]
    out = tmp_path / "study"
    args = ["--quick", "--out", str(out), "--steps", "2", "--eval-every", "1",
            "--teacher-steps", "2", "--probe-train", "40", "--ft-train", "32",
            "--data-dir", str(glue), *shrink]
    r = run_launcher("study.py", args, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "study.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln]
    names = [ln.split(" | ")[0][2:] for ln in rows]
    for want in ("teacher (prepared once, fixed)", "- L_ce (no soft-target KL)", "- L_cos",
                 "random init (same triple loss)", "majority class",
                 "step-0 control (teacher layers, no distillation step)"):
        assert want in names, (want, names)
    assert any(n.startswith("DistilBERT(D)") for n in names)
    no_ce = next(ln for ln in rows if ln.startswith("| - L_ce"))
    # the paired difference with its interval, the bootstrap error and a verdict
    assert re.search(r"\| [+-]\d+\.\d\d \[-?\d+\.\d\d, -?\d+\.\d\d\] \| \d+\.\d\d \| "
                     r"(not resolved \(MDE \d+\.\d\d\)|(higher|lower) than full) \|", no_ce), no_ce
    res = json.loads((out / "study.json").read_text())
    assert sorted(res["runs"]) == ["full", "no_ce", "no_cos", "random_init"]
    assert all(sorted(by_seed) == ["0", "1"] for by_seed in res["runs"].values())
    # every model is scored on the same positions; each run has a learning curve
    assert len({c["positions"] for c in res["scores"].values()}) == 1
    assert [p[0] for p in res["runs"]["full"]["0"]["curve"]] == [0, 1, 2]
    assert (out / "study.png").stat().st_size > 10_000
    # one teacher for every seed: each student read the teacher cell's model
    teacher = res["teacher"]["path"]
    for by_seed in res["runs"].values():
        for run in by_seed.values():
            cfg = (out / "cells" / "pretrain" / run["arm"] / f"seed{run['seed']}" /
                   "config.yaml").read_text()
            assert f"name_or_path: {teacher}" in cfg

    capsys.readouterr()
    assert run_cli(args) == 0  # the same command: every cell reused
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("study: ")]
    assert len(said) == 1 and said[0].startswith("study: ran 0 cell(s), reused 37"), said

    assert run_cli([*args, "--ft-train", "24"]) == 0  # a fine-tuning setting changed
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("study: ")]
    rerun = sorted(ln.split(":")[1].strip() for ln in said if "changed (" in ln)
    assert rerun == sorted(["sst2/teacher", "sst2/step0", "sst2/full/seed0",
                            "sst2/full/seed1", "sst2/distilbert_d/seed0",
                            "sst2/distilbert_d/seed1"]), said
    assert said[-1].startswith("study: ran 6 cell(s), reused 31"), said


def test_overrides_the_study_owns_are_refused(tmp_path):
    r = run_launcher("study.py", ["--out", str(tmp_path / "s"), "train.max_steps=5"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: train.max_steps: set by the study (--steps); drop the override")


def test_glue_data_it_cannot_read_is_refused_before_any_cell(tmp_path):
    out = tmp_path / "s"
    r = run_launcher("study.py", ["--quick", "--out", str(out), "--data-dir",
                                  str(tmp_path / "nowhere")])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: --data-dir: '{tmp_path / 'nowhere'}' is not a directory")
    assert not (out / "cells").exists()
