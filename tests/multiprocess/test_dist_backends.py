"""Real 2-rank runs of the one trainer on CPU (gloo, OMP_NUM_THREADS=1) through each backend:
torchrun DDP, torchrun FSDP2, and the deepspeed launcher with ZeRO-2, ZeRO-2 with the optimizer
offloaded to CPU (the shipped rtx4070.json, so DeepSpeedCPUAdam is built and used) and ZeRO-3.

Each case trains a tiny student for 6 steps with 2 micro-batches of accumulation per rank, and
checks that: the loss falls; complete step-3 and step-6 checkpoints hold the backend's own
files; the HF export loads as a DistilBertForMaskedLM with its tied weights and equals the fp32
weights rebuilt from the step-6 checkpoint. Then DDP, FSDP2 and ZeRO-2 with offload are
SIGKILLed (launcher and ranks) after their step-3 checkpoint and resumed: steps 4-6 must equal
the uninterrupted run to 1e-6, with dropout on and the MFU peak measured at start; the other
two replay steps 4-6 from step 3 with step 6 deleted. Last, a truncated DCP shard (FSDP2) and
a truncated ZeRO-2 optimizer partition make the resume fall back to the previous checkpoint.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fixtures import (REPO, kill_all_of, launch_cmd, make_tiny_teacher, metrics_by_step, run, start,
                      wait_for, write_corpus)

DS_CPU = REPO / "ds_configs" / "cpu.json"
DS_RTX = REPO / "ds_configs" / "rtx4070.json"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_assets")
    teacher = make_tiny_teacher(d / "teacher", layers=4, hidden=64)
    corpus = write_corpus(d / "corpus.jsonl", n_docs=200)
    zero3 = json.loads(DS_CPU.read_text())
    zero3["zero_optimization"]["stage"] = 3
    (d / "zero3.json").write_text(json.dumps(zero3))
    return {"teacher": teacher, "corpus": corpus, "zero3": str(d / "zero3.json")}


def tiny_args(assets, out: Path, precision: str) -> list[str]:
    return [f"run.output_dir={out}", f"teacher.name_or_path={assets['teacher']}",
            f"data.source={assets['corpus']}", "data.max_seq_len=64", "data.eval_sequences=8",
            "student.n_layers=2", f"train.precision={precision}", "train.max_steps=6",
            "train.global_batch=8", "train.micro_batch=2", "train.lr=3e-3",
            "train.warmup_steps=1", "train.log_every=1", "train.eval_every=100",
            "checkpoint.every_steps=3", "checkpoint.keep_last=2", "metrics.progress_bar=false"]


# name: (launcher, backend arguments, precision, files every step-N checkpoint must hold)
CASES = {
    "ddp": ("torchrun", ["parallel.backend=ddp"], "bf16", ["engine.pt"]),
    "fsdp": ("torchrun", ["parallel.backend=fsdp"], "bf16",
             ["dcp/.metadata", "engine_rest.pt"]),
    "zero2": ("deepspeed", ["--ds", str(DS_CPU)], "bf16",
              ["ds/mp_rank_00_model_states.pt", "latest"]),
    "zero2_offload": ("deepspeed", ["--ds", str(DS_RTX)], "auto",
                      ["ds/mp_rank_00_model_states.pt", "latest"]),
    "zero3": ("deepspeed", ["--ds", "ZERO3"], "fp32",
              ["ds/zero_pp_rank_0_mp_rank_00_model_states.pt", "latest"]),
}


SIGKILL_CASES = ("ddp", "fsdp", "zero2_offload")


def checkpoint_weights(name: str, ckpt: Path) -> dict[str, torch.Tensor]:
    """The student's fp32 weights as stored in a checkpoint, read the backend's own way."""
    if name == "ddp":
        sd = torch.load(ckpt / "engine.pt", map_location="cpu", weights_only=False)["model"]
    elif name == "fsdp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(ckpt / "dcp", ckpt.parent / "full.pt")
        sd = torch.load(ckpt.parent / "full.pt", map_location="cpu", weights_only=False)["model"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    return {k.removeprefix("mlm."): v.float() for k, v in sd.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_train_checkpoint_export_resume(name, assets, tmp_path):
    from transformers import AutoTokenizer, DistilBertForMaskedLM

    launcher, backend_args, precision, ckpt_files = CASES[name]
    backend_args = [assets["zero3"] if a == "ZERO3" else a for a in backend_args]
    out = tmp_path / "run"
    args = [*backend_args, *tiny_args(assets, out, precision), "--overwrite"]
    cmd = launch_cmd(launcher, 2, args)
    log = run(cmd)
    assert " x2 " in log, log[-3000:]  # "backend <name> x2": two ranks took part
    if launcher == "deepspeed":
        # DeepSpeed's CPU all-reduce buffers (one per rank, in /dev/shm, i.e. memory) are gone
        # with the run, not left behind until reboot
        port = cmd[cmd.index("--master_port") + 1]
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

    m = metrics_by_step(out)
    losses = [m[s]["loss/total"] for s in range(1, 7)]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-2:]) < sum(losses[:2]), f"loss did not fall: {losses}"

    ckpts = out / "checkpoints"
    for step in (3, 6):
        d = ckpts / f"step-{step:08d}"
        assert (d / "COMPLETE").is_file(), sorted(p.name for p in ckpts.iterdir())
        for f in [*ckpt_files, "trainer_rank0.pt", "trainer_rank1.pt"]:
            assert (d / f).exists(), f"{name}: {d / f} missing"

    # the export: a stock DistilBertForMaskedLM, tied, equal to the checkpoint's fp32 weights
    model = DistilBertForMaskedLM.from_pretrained(out / "student")
    assert model.vocab_projector.weight is model.distilbert.embeddings.word_embeddings.weight
    stored = checkpoint_weights(name, ckpts / "step-00000006")
    exported = model.state_dict()
    common = [k for k in exported if k in stored]
    assert len(common) >= len(exported) - 1, sorted(set(exported) - set(stored))
    for k in common:
        torch.testing.assert_close(exported[k], stored[k], rtol=0, atol=1e-6, msg=k)
    tok = AutoTokenizer.from_pretrained(out / "student")
    with torch.no_grad():
        logits = model(**tok("the capital of france is [MASK].", return_tensors="pt")).logits
    assert logits.shape[-1] == model.config.vocab_size

    if name in SIGKILL_CASES:
        killed = tmp_path / "killed"
        args = [*backend_args, *tiny_args(assets, killed, precision)]
        proc = start(launch_cmd(launcher, 2, args), tmp_path / "killed.log")
        wait_for(killed / "checkpoints" / "step-00000003" / "COMPLETE", proc)
        kill_all_of(killed)
        proc.wait()
        done = [s for s, row in metrics_by_step(killed).items() if "loss/total" in row]
        assert max(done) < 6, "the run finished before the kill"
        log = run(launch_cmd(launcher, 2, args + ["--resume"]))
        assert "(step 3)" in log, log[-3000:]
        again = metrics_by_step(killed)
        assert sorted(s for s, row in again.items() if "loss/total" in row) == list(range(1, 7))
        for s in (4, 5, 6):
            assert again[s]["loss/total"] == pytest.approx(m[s]["loss/total"], abs=1e-6,
                                                           rel=0), s
            assert again[s]["data/sequences"] == m[s]["data/sequences"] == 8 * s
        return

    # resume from step 3: steps 4-6 replay with the same losses
    shutil.rmtree(ckpts / "step-00000006")
    args = [*backend_args, *tiny_args(assets, out, precision), "--resume"]
    log = run(launch_cmd(launcher, 2, args))
    assert "(step 3)" in log, log[-3000:]
    again = metrics_by_step(out)
    for s in (4, 5, 6):
        assert again[s]["loss/total"] == pytest.approx(m[s]["loss/total"], rel=1e-4), s
    assert (ckpts / "step-00000006" / "COMPLETE").is_file()


# name: (launcher, backend arguments, the newest checkpoint's file that is truncated)
TRUNCATED = {
    "fsdp": ("torchrun", ["parallel.backend=fsdp"], "dcp/__1_0.distcp"),
    "zero2": ("deepspeed", ["--ds", str(DS_CPU)],
              "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
}


@pytest.mark.slow
def test_a_truncated_sharded_checkpoint_falls_back_to_the_previous_one(assets, tmp_path):
    """FSDP2's DCP shards and ZeRO's optimizer partitions: a file of the newest checkpoint cut
    in half (rank 1's, which rank 0 never reads) makes every rank resume from the previous
    checkpoint with a warning naming it, and steps 3-4 replay exactly (nothing of the damaged
    checkpoint was applied); before, the resume was refused as a checkpoint that did not fit."""
    for name, (launcher, backend_args, damaged) in TRUNCATED.items():
        out = tmp_path / name
        args = [*backend_args, *tiny_args(assets, out, "bf16"), "data.max_seq_len=32",
                "train.max_steps=4", "checkpoint.every_steps=2"]
        run(launch_cmd(launcher, 2, args))
        first = metrics_by_step(out)
        f = out / "checkpoints" / "step-00000004" / damaged
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
        older = {p: p.read_bytes() for p in (out / "checkpoints" / "step-00000002").rglob("*")
                 if p.is_file()}

        log = run(launch_cmd(launcher, 2, args + ["--resume"]))
        assert f"step-00000004/{damaged}: cannot be read" in log, log[-3000:]
        assert "trying the previous one" in log and "(step 2)" in log, log[-3000:]
        assert all(p.read_bytes() == b for p, b in older.items()), name
        again = metrics_by_step(out)
        assert sorted(s for s, row in again.items() if "loss/total" in row) == [1, 2, 3, 4]
        for s in (3, 4):
            assert again[s]["loss/total"] == pytest.approx(first[s]["loss/total"], abs=1e-6,
                                                           rel=0), (name, s)
        assert (out / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
