"""A checkpoint goes on with another number of processes and the run follows the loss
trajectory it would have followed uninterrupted.

On prepared shards step s reads global micro-batches [s G/m, (s+1) G/m) whatever the world
size, and masks are a pure function of (seed, step, tokens), so with fp32 and dropout 0 the
runs differ only in reduction order (test_dist_equivalence.py measures ~1e-7 relative). Each
case runs 6 steps uninterrupted with checkpoints at 3 and 6; a copy of that run without its
step-6 checkpoint is what a run killed after step 3 leaves (the step-3 checkpoint holds the
prefetched batches of step 4, which the new world makes again), and it is resumed on the other
world size: 2 DDP ranks -> 1 process (engine.pt), 1 FSDP2 process -> 2 (DCP resharding), 2
ZeRO-2 ranks -> 1 process and 1 ZeRO-3 process -> 2 (DeepSpeed's universal checkpoint,
converted at the resume).
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from fixtures import REPO, launch_cmd, make_tiny_teacher, metrics_by_step, run, write_corpus
from distil_scale.errors import plural

SEQ, STEPS = 32, 6
KEYS = ("loss/total", "loss/ce", "loss/mlm", "loss/cos", "optim/lr")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    teacher = make_tiny_teacher(d / "teacher", layers=4, hidden=64)
    corpus = write_corpus(d / "c.jsonl", n_docs=30, words=60)
    shards = d / "shards"
    run([sys.executable, str(REPO / "launch" / "prepare_data.py"), "--source", str(corpus),
         "--tokenizer", str(teacher), "--out", str(shards), "--seq-len", str(SEQ),
         "--heldout-fraction", "0.2", "--workers", "1", "--no-progress"])
    return teacher, shards


def args(out, teacher, shards, *extra) -> list[str]:
    return [f"run.output_dir={out}", f"teacher.name_or_path={teacher}", f"data.source={shards}",
            f"data.max_seq_len={SEQ}", "data.heldout_fraction=0.2", "data.eval_sequences=4",
            "student.n_layers=2", "student.dropout=0", "student.attention_dropout=0",
            "train.precision=fp32", f"train.max_steps={STEPS}", "train.global_batch=4",
            "train.micro_batch=2", "train.lr=3e-3", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=100", "checkpoint.every_steps=3", "checkpoint.keep_last=2",
            "metrics.progress_bar=false", "metrics.tensorboard=false", *extra]


def killed_after_step_3(out, tmp):
    """A copy of ``out`` as a run killed between its step-3 and step-6 checkpoints left it."""
    cut = tmp / f"{out.name}-cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    shutil.rmtree(cut / "student")
    return cut


def same_trajectory(got: dict, ref: dict, steps) -> None:
    for s in steps:
        for k in KEYS:
            assert got[s][k] == pytest.approx(ref[s][k], rel=1e-5, abs=1e-6), f"{k} at step {s}"


@pytest.mark.slow
def test_two_ranks_to_one_and_one_to_two(setup, tmp_path):
    teacher, shards = setup
    # 2 DDP ranks, uninterrupted; then its step-3 checkpoint goes on in 1 process
    ddp2 = tmp_path / "ddp2"
    run(launch_cmd("torchrun", 2, args(ddp2, teacher, shards, "parallel.backend=ddp")))
    cut = killed_after_step_3(ddp2, tmp_path)
    log = run(launch_cmd("python", 1, args(cut, teacher, shards, "parallel.backend=ddp",
                                           "--resume")))
    # 3 steps of 4 sequences in micro-batches of 2: micro-batches 0..5 were consumed
    assert ("resume: step 3 written by 2 processes, continuing on 1: data re-dealt from "
            "global micro-batch 6") in log, log[-3000:]
    assert "micro 2 x accumulation 2 x 1 process" in log
    ref = metrics_by_step(ddp2)
    falling = [ref[s]["loss/total"] for s in range(1, STEPS + 1)]
    assert falling[-1] < falling[0], falling  # a trajectory worth comparing
    got = metrics_by_step(cut)
    assert sorted(s for s in got if "loss/total" in got[s]) == list(range(1, STEPS + 1))
    same_trajectory(got, ref, range(4, STEPS + 1))

    # 1 FSDP2 process, uninterrupted (the same trajectory: the same rows every step); then
    # its step-3 checkpoint goes on in 2 ranks, DCP resharding the model and optimizer
    fsdp1 = tmp_path / "fsdp1"
    run(launch_cmd("torchrun", 1, args(fsdp1, teacher, shards, "parallel.backend=fsdp")))
    same_trajectory(metrics_by_step(fsdp1), ref, range(1, STEPS + 1))
    cut = killed_after_step_3(fsdp1, tmp_path)
    log = run(launch_cmd("torchrun", 2, args(cut, teacher, shards, "parallel.backend=fsdp",
                                             "--resume")))
    assert "written by 1 process, continuing on 2: data re-dealt from global micro-batch 6" \
        in log, log[-3000:]
    same_trajectory(metrics_by_step(cut), ref, range(4, STEPS + 1))
    assert (cut / "student" / "config.json").is_file()


def resumed_through_universal(cut, log, stage: int, saved: int, now: int) -> None:
    """What a resume through DeepSpeed's universal checkpoint says and leaves on disk."""
    step3 = cut / "checkpoints" / "step-00000003"
    assert (f"resume: {step3}/ds (ZeRO-{stage}, written by {plural(saved, 'process', 'processes')}"
            f") converted to DeepSpeed's universal checkpoint {step3}/ds_universal and loaded on "
            f"{plural(now, 'process', 'processes')}") in log, log[-3000:]
    assert (f"written by {plural(saved, 'process', 'processes')}, continuing on {now}: data "
            f"re-dealt from global micro-batch 6") in log, log[-3000:]
    # the conversion sits beside ds/ and left nothing else (its temporary directory, the
    # latest_universal file it writes beside its output)
    assert sorted(p.name for p in step3.iterdir() if p.name.startswith((".", "latest_u"))) == []
    assert (step3 / "ds_universal" / "zero" / "optimizer_state.pt").is_file()
    # the new world writes its own partitions from then on
    assert len(list((cut / "checkpoints" / "step-00000006" / "ds").glob("*optim_states.pt"))) \
        == now


@pytest.mark.slow
def test_zero_checkpoints_go_on_through_the_universal_checkpoint(setup, tmp_path):
    """ZeRO writes one optimizer partition per rank. Resumed on another number, ds/ is
    converted by DeepSpeed's ds_to_universal into ds_universal/ beside it and loaded with
    DeepSpeed's universal loading, which re-partitions the fp32 master weights and Adam's
    moments element by element (nothing is rounded): steps 4-6 follow the uninterrupted run to
    the same 1e-5 as DDP's (they came out bitwise equal here). 2 ZeRO-2 ranks (the deepspeed
    launcher) -> 1 process, and 1 ZeRO-3 process -> 2 ranks; the ZeRO-3 case holds DeepSpeed
    0.19.8's shared Adam step tensor to account (without the engine's fix, 2e-3 off at step 5)."""
    teacher, shards = setup
    cpu = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    (tmp_path / "zero2.json").write_text(json.dumps(cpu))
    cpu["zero_optimization"]["stage"] = 3
    (tmp_path / "zero3.json").write_text(json.dumps(cpu))
    z2, z3 = ["--ds", str(tmp_path / "zero2.json")], ["--ds", str(tmp_path / "zero3.json")]

    out = tmp_path / "zero2"
    run(launch_cmd("deepspeed", 2, args(out, teacher, shards, *z2)))
    ref = metrics_by_step(out)
    falling = [ref[s]["loss/total"] for s in range(1, STEPS + 1)]
    assert falling[-1] < falling[0], falling  # a trajectory worth comparing
    cut = killed_after_step_3(out, tmp_path)
    ds_dir = cut / "checkpoints" / "step-00000003" / "ds"
    before = {p.name: p.read_bytes() for p in ds_dir.iterdir()}
    assert sum(name.endswith("optim_states.pt") for name in before) == 2  # one per rank
    log = run(launch_cmd("python", 1, args(cut, teacher, shards, *z2, "--resume")))
    resumed_through_universal(cut, log, 2, 2, 1)
    assert {p.name: p.read_bytes() for p in ds_dir.iterdir()} == before  # nothing lost
    got = metrics_by_step(cut)
    assert sorted(s for s in got if "loss/total" in got[s]) == list(range(1, STEPS + 1))
    same_trajectory(got, ref, range(4, STEPS + 1))

    out = tmp_path / "zero3"
    run(launch_cmd("python", 1, args(out, teacher, shards, *z3)))
    same_trajectory(metrics_by_step(out), ref, range(1, STEPS + 1))
    cut = killed_after_step_3(out, tmp_path)
    log = run(launch_cmd("deepspeed", 2, args(cut, teacher, shards, *z3, "--resume")))
    resumed_through_universal(cut, log, 3, 1, 2)
    same_trajectory(metrics_by_step(cut), ref, range(4, STEPS + 1))
    assert (cut / "student" / "config.json").is_file()
