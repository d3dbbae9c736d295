"""Prepared shards dealt by a global micro-batch index: every world size reads the same rows in
each optimizer step, ranks never share a sequence within a step, and a checkpoint of one world
continues on another exactly where all its ranks had got to."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fixtures import minilm_path, write_corpus
from distil_scale.config import Config, DataConfig
from distil_scale.data.loader import BatchLoader
from distil_scale.data.shards import PrepareConfig, ShardStream, prepare_shards
from distil_scale.engine.deepspeed import DeepSpeedEngine
from distil_scale.errors import UserError
from distil_scale.train.setup import resolved_config, resume_check

SEQ, MICRO, GLOBAL = 32, 2, 8  # 4 micro-batches a step: accumulation 4, 2 or 1 on 1, 2, 4 ranks


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("deal")
    src = write_corpus(d / "c.jsonl", n_docs=12, words=60)
    prepare_shards(PrepareConfig(source=str(src), tokenizer=minilm_path(), seq_len=SEQ,
                                 shard_sequences=7, heldout_fraction=0.1), d / "s",
                   say=lambda s: None)
    return DataConfig(source=str(d / "s"), max_seq_len=SEQ, heldout_fraction=0.1)


def _streams(cfg, tok, world):
    return [ShardStream(cfg, tok, MICRO, seed=5, rank=r, world=world) for r in range(world)]


def _steps(streams, n_steps):
    """Per step: the sorted rows (as tuples) that all ranks read together."""
    accum = GLOBAL // (MICRO * len(streams))
    out = []
    for _ in range(n_steps):
        rows = [tuple(r) for s in streams for _ in range(accum) for r in s.next_batch().tolist()]
        out.append(rows)
    return out


def test_every_world_size_reads_the_same_rows_per_step(cfg, tok):
    n = ShardStream(cfg, tok, MICRO).n_sequences
    steps = 3 * n // GLOBAL + 2  # across several epochs
    ref = _steps(_streams(cfg, tok, 1), steps)
    for world in (2, 4):
        got = _steps(_streams(cfg, tok, world), steps)
        for s, (a, b) in enumerate(zip(ref, got)):
            assert sorted(a) == sorted(b), f"world {world}, step {s}"
    # a step's rows are distinct sequences (they come from one epoch's permutation, or the
    # end of one and the start of the next), and the epochs are in different orders
    s1 = ShardStream(cfg, tok, MICRO, seed=5)
    assert len(set(s1.batch_indices(0).tolist() + s1.batch_indices(1).tolist())) == 2 * MICRO
    assert not np.array_equal(s1.permutation(0), s1.permutation(1))


def test_ranks_are_disjoint_and_cover_an_epoch(cfg, tok):
    for world in (2, 4):
        streams = _streams(cfg, tok, world)
        per = streams[0].per_epoch // world  # micro-batches each rank reads from epoch 0
        idx = [np.concatenate([s.batch_indices(s.rank + k * world) for k in range(per)])
               for s in streams]
        flat = np.concatenate(idx)
        assert len(set(flat.tolist())) == len(flat)  # no sequence on two ranks
        rows = np.concatenate([streams[0].next_batch().numpy() for _ in range(per)])
        np.testing.assert_array_equal(rows, streams[0].rows(idx[0]))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (4, 2), (2, 4)])
def test_a_resume_on_another_world_continues_the_step_sequence(cfg, tok, before, after):
    done, more = 3, 4
    ref = _steps(_streams(cfg, tok, 1), done + more)[done:]
    # ``before`` ranks run ``done`` steps through prefetching loaders, then save
    loaders = [BatchLoader(s, prefetch=2) for s in _streams(cfg, tok, before)]
    accum = GLOBAL // (MICRO * before)
    for _ in range(done * accum):
        for ld in loaders:
            next(ld)
    for ld in loaders:  # the producer thread fills its 2 slots: batches made, not handed out
        while len(ld._ready) < 2:
            time.sleep(0.005)
    states = [ld.state_dict() for ld in loaders]
    for ld in loaders:
        ld.close()
    assert all(len(st["pending"]) == 2 for st in states)  # prefetched: to be made again
    # every old rank's state gives the same position: rank 0's stands for all
    starts = [ShardStream(cfg, tok, MICRO, seed=5).redeal(st["stream"], len(st["pending"]))
              for st in states]
    assert starts == [done * GLOBAL // MICRO] * before
    resumed = _streams(cfg, tok, after)
    for s in resumed:
        ld = BatchLoader(s, prefetch=0)
        assert ld.load_state_dict(states[0], redeal=True) == done * GLOBAL // MICRO
    got = _steps(resumed, more)
    assert [sorted(a) for a in got] == [sorted(b) for b in ref]


def test_same_world_resume_keeps_the_prefetched_batches(cfg, tok):
    a = BatchLoader(ShardStream(cfg, tok, MICRO, seed=5, rank=1, world=2), prefetch=2)
    for _ in range(3):
        next(a)
    st = a.state_dict()
    want = [next(a) for _ in range(5)]
    a.close()
    b = BatchLoader(ShardStream(cfg, tok, MICRO, seed=5, rank=1, world=2), prefetch=2)
    assert b.load_state_dict(st) is None
    assert all(torch.equal(x, next(b)) for x in want)
    b.close()


def test_a_state_that_cannot_be_continued_is_one_line(cfg, tok):
    st = ShardStream(cfg, tok, MICRO, seed=5).state_dict()
    with pytest.raises(UserError, match=r"^train\.micro_batch: .* resume with "
                                        r"train\.micro_batch=2$"):
        ShardStream(cfg, tok, 4, seed=5).redeal(st)
    old = {k: v for k, v in st.items() if k != "next_g"} | {"position": 3}
    with pytest.raises(UserError, match="position is per rank"):
        ShardStream(cfg, tok, MICRO, seed=5).load_state_dict(old)
    n = ShardStream(cfg, tok, MICRO).n_sequences
    with pytest.raises(UserError, match=r"fewer than a micro-batch of .* processes"):
        ShardStream(cfg, tok, MICRO, world=n // MICRO + 1)


def test_the_accumulation_may_change_with_the_number_of_processes_only():
    cfg = Config()
    cfg.train.global_batch, cfg.train.micro_batch = 8, 2
    saved = resolved_config(cfg, SimpleNamespace(precision="fp32", accum=2,
                                                 teacher_dtype=torch.float32))
    now = SimpleNamespace(precision="fp32", accum=4, teacher_dtype=torch.float32, world=1)
    check = resume_check(cfg, now)
    assert check({"config": saved, "world_size": 2}) == []
    assert check({"config": saved, "world_size": 1}) == [
        "resolved.accumulation: 4 now, 2 in the checkpoint"]


def test_deepspeed_without_zero_refuses_another_world_and_zero_goes_on():
    # the check reads nothing else of the engine; ZeRO 1-3 are converted at the load
    # (tests/multiprocess/test_world_change.py)
    with pytest.raises(UserError) as e:
        DeepSpeedEngine.check_other_world(SimpleNamespace(world_size=1, stage=0), "step-3", 2)
    msg = str(e.value)
    assert "\n" not in msg and "resume with 2" in msg and "stage 0" in msg
    for stage in (1, 2, 3):
        DeepSpeedEngine.check_other_world(SimpleNamespace(world_size=1, stage=stage), "s", 2)


def test_a_failed_universal_conversion_is_one_line_naming_the_command(tmp_path):
    """What DeepSpeed's converter cannot read: refused with the command to run by hand, and
    nothing left behind (ds/ as it was, no ds_universal/, no temporary directory)."""
    ckpt = tmp_path / "step-3"
    (ckpt / "ds").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        (ckpt / "ds" / name).write_bytes(b"not a torch archive")
    fake = SimpleNamespace(rank=0, world_size=1, stage=2)  # what _universal reads
    with pytest.raises(UserError) as e:
        DeepSpeedEngine._universal(fake, ckpt, 2)
    msg = str(e.value)
    assert "\n" not in msg and "converting it to DeepSpeed's universal checkpoint failed" in msg
    assert (f"python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state "
            f"--input_folder {ckpt}/ds --output_folder {ckpt}/ds_universal by hand") in msg
    assert msg.endswith("or resume with 2")
    assert sorted(p.name for p in ckpt.iterdir()) == ["ds"]
    assert {p.read_bytes() for p in (ckpt / "ds").iterdir()} == {b"not a torch archive"}
    # a ds_universal/ is there only once whole (renamed into place): a later resume reuses it
    (ckpt / "ds_universal").mkdir()
    assert DeepSpeedEngine._universal(fake, ckpt, 2) is False
