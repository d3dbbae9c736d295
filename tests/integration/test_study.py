"""launch/study.py end to end at tiny size: every variant pretrained through the trainer, each
fine-tuned on a real GLUE dev set, the teacher and task-specific distillation beside them; the
table and the plot written; a second run reruns nothing."""
import re

import pytest

from fixtures import SHARED, run_launcher, tiny_overrides

GLUE = SHARED / "data" / "glue"


@pytest.mark.skipif(not (GLUE / "RTE" / "dev.tsv").is_file(),
                    reason=f"needs the GLUE RTE files in {GLUE}")
def test_quick_study_writes_its_table_and_plot_and_resumes(tmp_path, tiny_teacher, corpus):
    # the demo config's code paths, shrunk in model and data only
    shrink = [o for o in tiny_overrides(tiny_teacher, corpus, tmp_path / "unused")
              if o.split("=")[0] not in ("run.output_dir", "train.max_steps", "train.eval_every",
                                         "checkpoint.every_steps")]
    out = tmp_path / "study"
    args = ["--quick", "--out", str(out), "--steps", "4", "--tasks", "rte", "--max-train", "32",
            "--student-layers", "0,2", "--data-dir", str(GLUE), *shrink]
    r = run_launcher("study.py", args, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "study.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    names = [ln.split(" | ")[0][2:] for ln in rows]
    assert len(names) == 8 and names[0].startswith("teacher") and names[-1] == "majority class"
    assert any(n.startswith("- L_ce") for n in names)
    assert any(n.startswith("task-specific distillation") for n in names)
    full = next(ln for ln in rows if ln.startswith("| full recipe"))
    assert re.search(r"\| \+0\.00 \| \+0\.00 \| \d+ % \|$", full), full
    assert (out / "study.png").stat().st_size > 10_000
    assert (out / "glue" / "rte" / "teacher" / "results.json").is_file()

    again = run_launcher("study.py", args, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    said = [ln for ln in again.stdout.splitlines() if ln.startswith("study: ")]
    assert len(said) == 1 and said[0].startswith("study: wrote"), said  # no cell ran again
    assert (out / "study.md").read_text().split("\n", 3)[3] == md.split("\n", 3)[3]


def test_overrides_the_study_owns_are_refused(tmp_path):
    r = run_launcher("study.py", ["--out", str(tmp_path / "s"), "train.max_steps=5"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: train.max_steps: set by the study (--steps); drop the override")
