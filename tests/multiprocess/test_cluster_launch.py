"""The cluster launch forms, run for real on CPU with 2 ranks on gloo (distil_scale/launchers.py):

* ``srun python launch/pretrain.py`` without SLURM: two plain ``python`` processes with the
  variables srun gives its tasks (SLURM_NTASKS=2, SLURM_PROCID=0/1, SLURM_LOCALID, a node list
  of 127.0.0.1, a step id) must form ONE 2-process run, not two runs of one process.
* ``accelerate launch`` with the shipped DDP config (launch/accelerate/ddp.yaml), 2 processes.
  Its ``--multi_gpu`` path runs torch's elastic launcher (torchrun) whether or not there is a
  GPU, so on CPU the ranks start as under torchrun and join on gloo; ``--cpu`` would pick
  accelerate's simple launcher, which starts ONE process (several only through mpirun). The
  config's mixed_precision bf16 must arrive as train.precision=bf16 and the backend as ddp.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from fixtures import (BIN, PYTHON, REPO, free_port, make_tiny_teacher, metrics_by_step, run_env,
                      tiny_overrides, write_corpus)

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("launcher_assets")
    return {"teacher": make_tiny_teacher(d / "teacher", layers=4, hidden=64),
            "corpus": write_corpus(d / "corpus.jsonl", n_docs=80)}


def tiny(assets, out) -> list[str]:
    return tiny_overrides(assets["teacher"], assets["corpus"], out, **{
        "train.max_steps": 4, "train.eval_every": 100, "checkpoint.every_steps": 4})


def clean_env(**extra) -> dict:
    """The test process's environment without any launcher's or scheduler's variables."""
    env = {k: v for k, v in run_env().items()
           if not k.startswith(("SLURM_", "ACCELERATE_", "FSDP_")) and k not in LAUNCH_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def check_two_rank_run(out, log: str, backend: str, precision: str) -> None:
    assert f"backend {backend} x2 " in log and f"precision {precision}" in log, log[-3000:]
    # one run of two ranks: the global batch (8 sequences a step) was counted across both
    assert metrics_by_step(out)[4]["data/sequences"] == 32
    assert (out / "student" / "config.json").is_file()


@pytest.mark.slow
def test_srun_python_without_a_launcher_forms_one_world(assets, tmp_path):
    out = tmp_path / "run"
    args = [PYTHON, str(REPO / "launch" / "pretrain.py"), "parallel.backend=ddp",
            *tiny(assets, out)]
    slurm = {"SLURM_JOB_ID": "777", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
             "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_NNODES": "1",
             "MASTER_PORT": free_port()}  # not the job-id port: tests run side by side
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"task{rank}.log")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen(
                args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                env=clean_env(**slurm, SLURM_PROCID=rank, SLURM_LOCALID=rank)))
    rcs = [p.wait(timeout=600) for p in procs]
    text = [p.read_text() for p in logs]
    assert rcs == [0, 0], "\n---\n".join(t[-3000:] for t in text)
    assert "SLURM: srun task 0 of 2 without a launcher" in text[0], text[0][-3000:]
    check_two_rank_run(out, text[0], "ddp", "fp32")


@pytest.mark.slow
def test_accelerate_launch_runs_the_ddp_engine(assets, tmp_path):
    out = tmp_path / "run"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file",
           str(REPO / "launch" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(REPO / "launch" / "pretrain.py"),
           *[o for o in tiny(assets, out) if not o.startswith("train.precision=")]]
    p = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                       timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "accelerate launch: parallel.backend=ddp, train.precision=bf16" in log, log[-3000:]
    check_two_rank_run(out, log, "ddp", "bf16")
    assert os.path.isdir(out / "checkpoints" / "step-00000004")
