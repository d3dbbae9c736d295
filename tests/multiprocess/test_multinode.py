"""Two nodes simulated on one host: two launcher agents of two ranks each, a rendezvous on
127.0.0.1, gloo on the loopback, a HOME (and so a cache) of its own per node, and the host-side
control group forced on as on an NCCL job.

- DDP through torchrun's c10d rendezvous, chained through every way a multi-node job stops:
  SIGTERM to one node's ranks (all four ranks stop at the same step, exit 0, one complete
  checkpoint), ``--resume``, SIGKILL of both agents and every rank, ``--resume`` to the end.
  The chained run's losses equal an uninterrupted 1 node x 4 ranks run's to 1e-5 at every step.
- FSDP2 hybrid-sharded (inside a node, replicated across) through the same rendezvous, and ZeRO-2 through DeepSpeed's own multi-node form
  (a hostfile, ``--no_ssh --node_rank N``), each equal to the same 1 x 4 run.

The teacher has no MLM head, so it is prepared: on the simulated nodes each HOME is its own,
the per-user cache is not shared, and the prepared teacher must go to the run's directory.
Dropout stays on: global rank r seeds the same generators whichever node it sits on.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from distil_scale import launchers
from fixtures import (BIN, REPO, free_port, kill_all_of, make_tiny_teacher, metrics_by_step,
                      run_env, write_corpus)

SCRIPT = str(REPO / "launch" / "pretrain.py")
STEPS = 8
KEYS = ("loss/total", "loss/ce", "loss/mlm", "loss/cos")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("multinode")
    return {"d": d, "teacher": make_tiny_teacher(d / "teacher", with_head=False),
            "corpus": write_corpus(d / "docs.jsonl", n_docs=80)}


def args(assets, out: Path, *extra: str) -> list[str]:
    return [f"run.output_dir={out}", f"teacher.name_or_path={assets['teacher']}",
            f"data.source={assets['corpus']}", "teacher.prepare_steps=4",
            "teacher.prepare_batch=4", "student.n_layers=2", "data.max_seq_len=32",
            "data.eval_sequences=8", "data.heldout_fraction=0.1", "data.shuffle_buffer=8",
            "train.micro_batch=2", "train.global_batch=8", f"train.max_steps={STEPS}",
            "train.log_every=1", "train.eval_every=100", "checkpoint.every_steps=2",
            "train.warmup_steps=1", "train.precision=fp32", "metrics.progress_bar=false",
            "metrics.tensorboard=false", *extra]


def env(home: Path, **extra) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    return run_env(HOME=home, DISTIL_SCALE_CONTROL_GROUP=1, **extra)


def start(cmd: list[str], home: Path, log: Path, **extra) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env(home, **extra), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def torchrun_nodes(assets, name: str, argv: list[str]) -> list[subprocess.Popen]:
    """Two torchrun agents; node 0's hosts the rendezvous store, as the head node does."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "2",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", name, "--rdzv_conf", f"is_host={int(node == 0)}",
               SCRIPT, *argv]
        procs.append(start(cmd, assets["d"] / f"home-{name}-{node}",
                           assets["d"] / f"{name}-node{node}.log"))
    return procs


def deepspeed_nodes(assets, name: str, argv: list[str]) -> list[subprocess.Popen]:
    """DeepSpeed's multi-node launch without ssh: the same hostfile on each node, each
    launcher told its node rank and the head's address."""
    hostfile = assets["d"] / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    port = free_port()
    return [start([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
                   "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port",
                   str(port), SCRIPT, *argv],
                  assets["d"] / f"home-{name}-{node}", assets["d"] / f"{name}-node{node}.log")
            for node in (0, 1)]


def finish(assets, name: str, procs, timeout: int = 600) -> str:
    """Both agents' exit codes are 0; their logs, joined."""
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise AssertionError(f"{name}: a node hung")
    logs = "\n".join((assets["d"] / f"{name}-node{n}.log").read_text() for n in (0, 1))
    assert [p.returncode for p in procs] == [0, 0], f"{name}:\n{logs[-6000:]}"
    return logs


def wait_file(path: Path, procs, timeout: int = 600) -> None:
    t0 = time.time()
    while not path.exists():
        assert all(p.poll() is None for p in procs), f"a node ended before {path}"
        assert time.time() - t0 < timeout, f"no {path} after {timeout}s"
        time.sleep(0.05)


def workers_of(agent: subprocess.Popen) -> list[int]:
    """The rank processes torchrun started: the agent's children."""
    kids = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    return [int(k) for k in kids]


def check_ranks(logs: str) -> None:
    """Every rank printed where it runs: ranks 0-1 on node 0, 2-3 on node 1."""
    for r in range(4):
        assert f"rank {r} (node {r // 2}," in logs and f"local rank {r % 2}, 4 processes" in logs, \
            f"rank {r}:\n{logs[-4000:]}"


def assert_same_losses(label: str, got: dict, ref: dict) -> None:
    for s in range(1, STEPS + 1):
        for k in KEYS:
            assert got[s][k] == pytest.approx(ref[s][k], rel=1e-5, abs=1e-6), \
                f"{label}: {k} at step {s}"


@pytest.fixture(scope="module")
def one_node(assets) -> dict:
    """1 node x 4 ranks, uninterrupted: the trajectory every two-node run must follow."""
    out = assets["d"] / "one-node"
    p = start([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "4", SCRIPT,
               *args(assets, out, "parallel.backend=ddp")],
              assets["d"] / "home-one-node", assets["d"] / "one-node.log")
    p.wait(timeout=600)
    assert p.returncode == 0, (assets["d"] / "one-node.log").read_text()[-4000:]
    m = metrics_by_step(out)
    assert m[STEPS]["loss/total"] < m[1]["loss/total"]  # a trajectory worth comparing
    return m


@pytest.mark.slow
def test_two_nodes_ddp_stop_kill_resume_equals_one_node(assets, one_node):
    out = assets["d"] / "ddp"
    argv = args(assets, out, "parallel.backend=ddp")
    ck = out / "checkpoints"

    # SIGTERM to node 1's ranks only: the four ranks agree, stop at one step, exit 0
    procs = torchrun_nodes(assets, "ddp-a", argv)
    wait_file(ck / "step-00000002" / "COMPLETE", procs)
    for pid in workers_of(procs[1]):
        os.kill(pid, signal.SIGTERM)
    logs = finish(assets, "ddp-a", procs)
    check_ranks(logs)
    stopped = {int(logs.split(f"rank {r} (")[-1].split("stopped at step ")[1].split(",")[0])
               for r in range(4)}
    assert len(stopped) == 1, logs[-4000:]
    step = stopped.pop()
    assert 2 <= step < STEPS - 2, logs[-4000:]
    assert (ck / f"step-{step:08d}" / "COMPLETE").is_file()
    assert f"preempted: checkpoint saved at step {step}" in logs
    # each node's HOME is its own: the prepared teacher went where every node sees it
    assert "is not shared by every node" in logs
    assert (out / "prepared-teacher").is_dir()

    # resume, then SIGKILL both agents and every rank after the next checkpoint
    procs = torchrun_nodes(assets, "ddp-b", [*argv, "--resume"])
    after = (step // 2 + 1) * 2
    wait_file(ck / f"step-{after:08d}" / "COMPLETE", procs)
    kill_all_of(out)
    for p in procs:
        p.wait(timeout=60)

    # resume to the end: every step on the trajectory of the uninterrupted single node
    logs = finish(assets, "ddp-c", torchrun_nodes(assets, "ddp-c", [*argv, "--resume"]))
    assert "resume:" in logs and f"(step {after})" in logs, logs[-4000:]
    assert_same_losses("2 nodes, stopped, killed, resumed", metrics_by_step(out), one_node)


@pytest.mark.slow
def test_two_nodes_fsdp2_and_zero2_equal_one_node(assets, one_node):
    # hybrid sharding, as across real nodes: shard inside each node, replicate across them
    # (FSDP2 over every rank is what tests/multiprocess/test_world_change.py runs)
    out = assets["d"] / "fsdp"
    logs = finish(assets, "fsdp", torchrun_nodes(assets, "fsdp", args(
        assets, out, "parallel.backend=fsdp", "parallel.fsdp_shard_degree=2")))
    check_ranks(logs)
    assert "backend fsdp x4 (hybrid: 2 replicas x 2 shards)" in logs, logs[-4000:]
    assert_same_losses("fsdp2 hybrid-sharded, 2 nodes", metrics_by_step(out), one_node)

    out = assets["d"] / "zero2"
    logs = finish(assets, "zero2", deepspeed_nodes(assets, "zero2", args(
        assets, out, "--ds", str(REPO / "ds_configs" / "cpu.json"))))
    check_ranks(logs)
    assert "backend deepspeed x4" in logs
    assert_same_losses("zero2, 2 nodes (deepspeed --no_ssh)", metrics_by_step(out), one_node)


@pytest.mark.slow
def test_auto_restart_with_overwrite_continues_and_finishes(assets):
    """torchrun --max-restarts reruns the same command, --overwrite included, after a rank
    is killed: the restart must continue the checkpoints its first attempt wrote (not delete
    them) and finish at train.max_steps. torchrun runs as docs/scale-out.md says to run it
    with restarts: with its rendezvous store not shared across attempts (with it shared,
    every restarted attempt failed in gloo's connectFullMesh here, reading the killed
    attempt's addresses; the first attempt warns about it)."""
    out = assets["d"] / "restart"
    log = assets["d"] / "restart.log"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
           SCRIPT, *args(assets, out, "parallel.backend=ddp", "--overwrite")]
    p = start(cmd, assets["d"] / "home-restart", log,
              **{launchers.SHARE_STORE_OPT_OUT: "1"})
    wait_file(out / "checkpoints" / "step-00000004" / "COMPLETE", [p])
    os.kill(workers_of(p)[0], signal.SIGKILL)
    p.wait(timeout=600)
    text = log.read_text()
    assert p.returncode == 0, text[-4000:]
    assert "this is restart 1 of the job (TORCHELASTIC_RESTART_COUNT=1)" in text, text[-4000:]
    assert "connectFullMesh" not in text and "warning: torchrun --max-restarts" not in text
    resumed = int(text.split("resume: ")[-1].split("(step ")[1].split(")")[0])
    assert resumed >= 4
    m = metrics_by_step(out)
    assert sorted(m)[-1] == STEPS and all(s in m for s in range(1, STEPS + 1))


@pytest.mark.slow
def test_node_local_output_dirs_are_refused_on_every_rank(assets):
    """Node-local disks under one name: each node's agent starts in a directory of its own and
    run.output_dir is relative, so the nodes name one path and see two directories. Every rank
    exits 2 with one line before any data is read."""
    port = free_port()
    procs, logs = [], []
    for node in (0, 1):
        cwd = assets["d"] / f"local-disk-{node}"
        cwd.mkdir()
        logs.append(cwd / "log.txt")
        procs.append(subprocess.Popen(
            [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend",
             "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "local",
             "--rdzv_conf", f"is_host={int(node == 0)}", SCRIPT,
             *args(assets, Path("runs/x"), "parallel.backend=ddp")],
            cwd=cwd, env=env(assets["d"] / f"home-local-{node}"), stdout=open(logs[-1], "w"),
            stderr=subprocess.STDOUT, start_new_session=True))
    for p in procs:
        p.wait(timeout=300)
    text = "\n".join(p.read_text() for p in logs)
    line = ("error: run.output_dir: 'runs/x' is not one directory shared by every node: rank 1 "
            "(node 1,")
    # rank 0 and rank 1 say the same line (torchrun's summary repeats it as the root cause)
    assert sum(ln.startswith(line) for ln in text.splitlines()) == 2, text[-4000:]
    assert "does not see rank 0's files there; put run.output_dir on a filesystem" in text
    assert not (assets["d"] / "local-disk-0" / "runs" / "x" / "checkpoints").exists()
    assert not list((assets["d"] / "local-disk-0" / "runs" / "x").glob(".shared-*"))
