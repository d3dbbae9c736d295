"""The launchers as a user starts them: each console script ``pip install -e .`` puts on PATH,
and launch/plan.py, in a process of their own (exit codes and the one error line)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from fixtures import BIN, PYTHON, REPO, run_env, run_launcher

RTX = REPO / "ds_configs" / "rtx4070.json"


def test_console_script_runs_the_launcher():
    """pip install -e . puts distil-pretrain on PATH; it is launch/pretrain.py's main."""
    exe = BIN / "distil-pretrain"
    if not exe.is_file():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=run_env())
    assert r.returncode == 0 and "--resume" in r.stdout
    r = subprocess.run([str(exe), "train.lr=-1"], capture_output=True, text=True, env=run_env())
    assert r.returncode == 2 and "error: train.lr: must be > 0" in r.stderr


# each console script: what a bad input prints (one line naming the flag, exit 2), or its run
SCRIPTS = {
    "distil-prepare-data": (["--out", "OUT", "--workers", "-1"], 2,
                            "error: --workers: -1; must be >= 0"),
    "distil-finetune": (["--task", "nope", "--model", "x"], 2, "error: --task: unknown task 'nope'"),
    "distil-distill-task": (["--task", "nope", "--teacher", "x", "--student", "y"], 2,
                            "error: --task: unknown task 'nope'"),
    "distil-report": (["OUT"], 2, "error: report: no such run directory"),
    "distil-bench": (["--data", "--seconds", "0"], 2, "error: --seconds: 0.0; must be > 0"),
    "distil-plan": (["--ds", "OUT", "--gpu-mem-gib", "12"], 2, "error: --ds"),
    "distil-study": (["train.max_steps=5"], 2, "error: train.max_steps: set by the study"),
    "distil-gpu-check": ([], 0, "gpu_check: skipped: no CUDA device"),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_console_script_is_its_launcher(name, tmp_path):
    """pip install -e . puts one script per launcher on PATH, with the launcher's errors."""
    exe = BIN / name
    if not exe.is_file():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=run_env(),
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr[-500:]
    args, rc, says = SCRIPTS[name]
    if name == "distil-gpu-check" and torch.cuda.is_available():
        pytest.skip("on a CUDA machine distil-gpu-check runs the whole check")
    out = str(tmp_path / "missing")
    r = subprocess.run([str(exe), *[out if a == "OUT" else a for a in args]], capture_output=True,
                       text=True, env=run_env(), cwd=tmp_path)
    last = (r.stderr if rc else r.stdout).strip().splitlines()[-1]
    assert r.returncode == rc and last.startswith(says), (r.returncode, r.stderr[-800:])
    assert not (tmp_path / "missing").exists()  # a refused input writes nothing


def test_plan_launcher_prints_one_error_line(tmp_path):
    ds = json.loads(RTX.read_text())
    ds["train_micro_batch_size_per_gpu"] = 8
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(ds))
    r = subprocess.run([PYTHON, str(REPO / "launch" / "plan.py"), "--ds", str(path),
                        "--gpu-mem-gib", "12"], env=run_env(), capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "contradicts train.micro_batch=16" in errors[0], r.stderr


def test_cli_error_is_one_line_exit_2(tmp_path):
    r = run_launcher("pretrain.py", ["train.max_stepz=3", f"run.output_dir={tmp_path}/r"])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["error: unknown config key 'train.max_stepz'; valid keys under 'train.': "
                     + lines[0].split("valid keys under 'train.': ")[1]]
    assert not (tmp_path / "r").exists()  # nothing written for a refused config
