"""Fine-tuning under torchrun: 2 real processes on gloo (CPU), on the DDP, FSDP2 and DeepSpeed
engines, one results.json and the pretraining loop's metric names."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import BIN, PYTHON, REPO, make_tiny_model, run, write_fixture


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "fsdp", "deepspeed"])
def test_finetune_under_torchrun_two_ranks(tmp_path, backend):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    model = make_tiny_model(tmp_path / "tiny")
    data = write_fixture(tmp_path / "glue", "mrpc", n_train=48, n_dev=13)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(REPO / "launch" / "finetune.py"),
           "--task", "mrpc", "--model", str(model), "--data-dir", str(data), "--output-dir", str(out),
           "train.epochs=2", "train.batch_size=8", "train.lr=1e-3", "data.max_length=32",
           "train.progress_bar=false", f"parallel.backend={backend}"]
    if backend == "deepspeed":
        cmd.append(f"parallel.ds_config={REPO / 'ds_configs' / 'cpu.json'}")
    # own process group: a hung run is killed with its workers, not left behind
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun timed out:\n" + stdout[-2000:] + stderr[-2000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["world_size"] == 2 and r["task"] == "mrpc"
    # 48 examples, global batch 8 = 4 per rank -> 6 steps per epoch on each rank
    assert r["steps"] == 12
    # every one of the 13 dev examples was scored once (gathered from both ranks)
    assert r["report_splits"] == {"dev": 13}
    assert set(r["metrics"]) == {"f1", "accuracy"}
    assert abs(r["metrics"]["accuracy"] * 13 - round(r["metrics"]["accuracy"] * 13)) < 1e-6
    # rank 0 alone logs the epoch lines and writes
    assert stdout.count("epoch 2/2") == 1
    assert sorted(x.name for x in out.iterdir()) == ["config.yaml", "glue_run.json",
                                                     "metrics.jsonl", "model", "results.json",
                                                     "tb"]
    assert r["backend"] == {"auto": "ddp"}.get(backend, backend)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss/task" in x] == [10]
    assert {"loss/total", "optim/lr", "optim/grad_norm"} <= set(next(x for x in lines if "loss/task" in x))
    assert [x["step"] for x in lines if "eval/dev_f1" in x] == [6, 12]
    assert list((out / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_task_distillation_on_fsdp_two_ranks(tmp_path):
    """A teacher fine-tuned in one process, then task distillation on FSDP2 over 2 ranks: the
    teacher stays a plain frozen module on every rank, the student is sharded."""
    model = make_tiny_model(tmp_path / "tiny", arch="bert")
    data = write_fixture(tmp_path / "glue", "rte", n_train=48, n_dev=13)
    common = ["--task", "rte", "--data-dir", str(data), "train.batch_size=8", "train.lr=1e-3",
              "data.max_length=32", "train.progress_bar=false"]
    run([PYTHON, str(REPO / "launch" / "finetune.py"), "--model", str(model),
         "--output-dir", str(tmp_path / "teacher"), *common, "train.epochs=2"])
    out = tmp_path / "distil"
    log = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
               str(REPO / "launch" / "distill_task.py"), "--teacher",
               str(tmp_path / "teacher" / "model"), "--student", "init:teacher-layers",
               "--output-dir", str(out), *common, "train.epochs=1", "parallel.backend=fsdp"])
    r = json.loads((out / "results.json").read_text())
    assert r["mode"] == "distill" and r["backend"] == "fsdp" and r["world_size"] == 2, log[-2000:]
    assert r["steps"] == 6  # 48 examples, global batch 8 (4 per rank): 6 steps an epoch
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/dev_accuracy" in x for x in lines)
    assert (out / "model" / "config.json").is_file()


@pytest.mark.slow
def test_a_busy_output_dir_under_torchrun_is_one_line_in_torchruns_summary(tmp_path):
    """A second fine-tune into a directory a live job holds: every rank refuses it (rank 0
    takes the lock and tells the others) and torchrun's failure summary shows the one line as
    the root cause, where it used to say only "exitcode: 2" and a link."""
    import socket

    from distil_scale.fsio import LOCK

    model = make_tiny_model(tmp_path / "tiny")
    data = write_fixture(tmp_path / "glue", "rte", n_train=16, n_dev=8)
    out = tmp_path / "busy"
    out.mkdir()
    live = subprocess.Popen(["sleep", "120"])  # stands for the job that holds the directory
    try:
        (out / LOCK).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        p = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
                            str(REPO / "launch" / "finetune.py"), "--task", "rte", "--model",
                            str(model), "--data-dir", str(data), "--output-dir", str(out),
                            "parallel.backend=ddp", "train.progress_bar=false"],
                           capture_output=True, text=True, timeout=300, cwd=REPO,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    finally:
        live.kill()
        live.wait()
    line = (f"error: --output-dir (run.output_dir): '{out}' is in use by a running job (pid "
            f"{live.pid} on {socket.gethostname()})")
    assert p.returncode != 0
    root = p.stderr.split("Root Cause (first observed failure):", 1)[-1]
    assert "exitcode  : 2" in root and f"traceback : {line}" in root, p.stderr[-3000:]
    assert sorted(x.name for x in out.iterdir()) == [LOCK]  # nothing written there
