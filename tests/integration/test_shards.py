"""Pre-tokenized shards (launch/prepare_data.py, ShardStream) and the streaming path's cheap
state: equal to the stream, exact resume, disjoint ranks, a killed preparation that resumes."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import REPO, SHARED, minilm_path, write_corpus
from distil_scale.errors import UserError
from distil_scale.config import DataConfig
from distil_scale.data import eval_cache, stream
from distil_scale.data.eval_cache import build_eval_set, scan_token_counts
from distil_scale.data.loader import BatchLoader
from distil_scale.data.shards import (PrepareConfig, ShardStream, prepare_shards,
                                      to_dtype, token_dtype)
from distil_scale.data.stream import PretrainStream, is_shard_dir, open_pretrain_stream

WIKI = SHARED / "data" / "wikipedia_sample" / "articles.jsonl"
SEQ = 32


def _prepare(src, out, workers=0, **kw) -> dict:
    pc = PrepareConfig(source=str(src), tokenizer=minilm_path(),
                       **{"seq_len": SEQ, "shard_sequences": 16, "heldout_fraction": 0.1, **kw})
    return prepare_shards(pc, out, workers=workers, say=lambda s: None)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("shards") / "s"
    _prepare(corpus, out)
    return out


def _all_train(d: Path) -> np.ndarray:
    m = json.loads((d / "manifest.json").read_text())
    return np.concatenate([np.load(d / s["file"]) for s in m["shards"]])


def _stream_cfg(src, **kw):
    return DataConfig(**{"source": str(src), "max_seq_len": SEQ, "shuffle_buffer": 1,
                         "heldout_fraction": 0.1, **kw})


def test_shards_are_the_stream_in_index_order(shard_dir, corpus, tok):
    want = _all_train(shard_dir)
    assert want.dtype == np.uint16 and want.shape[1] == SEQ and len(want) > 100
    s = PretrainStream(_stream_cfg(corpus), tok, 4)
    got = np.concatenate([s.next_batch().numpy() for _ in range(len(want) // 4)])
    np.testing.assert_array_equal(got, want[:len(got)])
    # the eval set and the counts are the streaming path's too
    cfg = _stream_cfg(corpus)
    held = np.load(shard_dir / "heldout.npy")
    np.testing.assert_array_equal(build_eval_set(cfg, tok, len(held)).numpy(), held)
    np.testing.assert_array_equal(scan_token_counts(cfg, tok, 10**6).numpy(),
                                  np.load(shard_dir / "token_counts.npy"))
    # and the run reads them back through the factory when data.source is the directory
    scfg = _stream_cfg(shard_dir)
    assert is_shard_dir(str(shard_dir)) and not is_shard_dir(str(corpus))
    assert isinstance(open_pretrain_stream(scfg, tok, 4), ShardStream)
    np.testing.assert_array_equal(build_eval_set(scfg, tok, 3).numpy(), held[:3])
    assert scan_token_counts(scfg, tok, 1).shape == (len(tok),)


def test_worker_processes_write_the_same_shards(tmp_path, tok):
    if not WIKI.is_file():
        pytest.skip(f"shared Wikipedia sample absent ({WIKI})")
    a = _prepare(WIKI, tmp_path / "a", workers=0, seq_len=128, shard_sequences=64, max_docs=12)
    b = _prepare(WIKI, tmp_path / "b", workers=2, seq_len=128, shard_sequences=64, max_docs=12)
    assert a["shards"] == b["shards"] and a["n_sequences"] > 64
    for name in [s["file"] for s in a["shards"]] + ["heldout.npy", "token_counts.npy"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_shard_stream_resume_is_exact(shard_dir, tok):
    cfg = _stream_cfg(shard_dir)
    a = ShardStream(cfg, tok, 5, seed=3)
    for _ in range(7):
        a.next_batch()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    want = [a.next_batch() for _ in range(150)]  # several epochs
    assert a.epoch >= 2
    b = ShardStream(cfg, tok, 5, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(want, [b.next_batch() for _ in range(150)]))


def test_dtype_at_the_vocab_boundary():
    assert token_dtype(30522) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0 .. 65535
    assert token_dtype(65537) == np.int32
    assert to_dtype(np.array([[0, 65535]]), token_dtype(65536)).dtype == np.uint16
    with pytest.raises(ValueError, match="does not fit"):
        to_dtype(np.array([[0, 65536]]), np.uint16)  # never a silent wrap to 0


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_sequences_reshuffled_each_epoch(shard_dir, tok, world):
    cfg = _stream_cfg(shard_dir)
    ranks = [ShardStream(cfg, tok, 4, seed=1, rank=r, world=world) for r in range(world)]
    s = ranks[0]
    n, M = s.n_sequences, s.per_epoch
    for epoch in (0, 1):
        # micro-batch g goes to rank g % world: ranks share no sequence within an epoch
        sets = [{i for g in range(epoch * M, (epoch + 1) * M) if g % world == r
                 for i in s.batch_indices(g).tolist()} for r in range(world)]
        assert sum(len(x) for x in sets) == len(set().union(*sets)) == M * 4
        assert len(set().union(*sets)) == n - n % 4  # covers all but the remainder
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    # and the batches are those indices' rows: one epoch of rank 0, batch by batch
    per = len(range(0, M, world))
    rows = np.concatenate([s.next_batch().numpy() for _ in range(per)])
    want = np.concatenate([s.batch_indices(g) for g in range(0, M, world)])
    np.testing.assert_array_equal(rows, _all_train(shard_dir)[want])


def test_a_killed_preparation_resumes_byte_for_byte(tmp_path):
    src = write_corpus(tmp_path / "big.jsonl", n_docs=3000, words=200)
    args = ["--source", str(src), "--tokenizer", minilm_path(), "--seq-len", str(SEQ),
            "--shard-sequences", "256", "--max-docs", "2500", "--workers", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [sys.executable, str(REPO / "launch" / "prepare_data.py")]
    killed = tmp_path / "killed"
    p = subprocess.Popen(script + args + ["--out", str(killed)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (killed / "train-00001.npy").exists():
        assert p.poll() is None, p.stdout.read().decode()[-2000:]
        assert time.time() < deadline, "no shard written in 120 s"
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "manifest.json").exists(), "finished before the kill: make it longer"
    assert (killed / "progress.npz").exists()
    r = subprocess.run(script + args + ["--out", str(killed)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout
    whole = tmp_path / "whole"  # uninterrupted, in this process (the same code)
    pc = PrepareConfig(source=str(src), tokenizer=minilm_path(), seq_len=SEQ,
                       shard_sequences=256, max_docs=2500)
    prepare_shards(pc, whole, workers=1, say=lambda s: None)
    names = sorted(f.name for f in whole.iterdir())
    assert sorted(f.name for f in killed.iterdir()) == names
    assert len([n for n in names if n.startswith("train-")]) > 5
    for name in names:
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    # the same arguments on a finished directory: nothing to do; other ones are refused
    said = []
    prepare_shards(pc, whole, workers=1, say=said.append)
    assert "already complete" in said[0]
    other = [a if a != str(SEQ) else "64" for a in args]
    r = subprocess.run(script + other + ["--out", str(whole)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --seq-len:"), r.stderr
    assert "choose another --out" in err[0]


def test_bad_input_is_one_line(shard_dir, tmp_path, tok, corpus):
    with pytest.raises(UserError, match=r"data.max_seq_len: .* set data.max_seq_len=32"):
        ShardStream(_stream_cfg(shard_dir, max_seq_len=64), tok, 4)
    other = tmp_path / "other_vocab"
    other.mkdir()
    for f in shard_dir.iterdir():
        (other / f.name).symlink_to(f)
    m = json.loads((shard_dir / "manifest.json").read_text())
    (other / "manifest.json").unlink()
    (other / "manifest.json").write_text(json.dumps({**m, "vocab_hash": "0" * 64}))
    with pytest.raises(UserError, match=r"teacher.name_or_path: .*prepare the shards again"):
        open_pretrain_stream(_stream_cfg(other), tok, 4)
    # a preparation that did not finish is not read as text
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "progress.npz").write_bytes(b"")
    with pytest.raises(UserError, match="unfinished launch/prepare_data.py output"):
        open_pretrain_stream(_stream_cfg(unfinished), tok, 4)
    # another corpus into a finished directory
    with pytest.raises(UserError, match=r"--source: .* choose another --out"):
        _prepare(write_corpus(tmp_path / "c2.jsonl", n_docs=5), shard_dir)
    # a directory that holds something else
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--out: .* holds other files"):
        _prepare(corpus, tmp_path / "busy")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="--out: .* is a file, not a directory"):
        _prepare(corpus, tmp_path / "afile")


def test_prepare_reads_only_the_tokenizer_and_checks_positions(tmp_path, corpus, tiny_teacher):
    """--tokenizer needs no weights; --seq-len beyond the model's positions is refused."""
    tok_only = tmp_path / "tok"
    tok_only.mkdir()
    for f in tiny_teacher.iterdir():
        if "safetensors" not in f.name and not f.name.endswith(".bin"):
            (tok_only / f.name).symlink_to(f)
    m = prepare_shards(PrepareConfig(source=str(corpus), tokenizer=str(tok_only), seq_len=32,
                                     shard_sequences=64), tmp_path / "s", say=lambda s: None)
    assert m["n_sequences"] > 0
    with pytest.raises(UserError, match=r"--seq-len: 256 exceeds the 128 positions"):
        prepare_shards(PrepareConfig(source=str(corpus), tokenizer=str(tok_only), seq_len=256),
                       tmp_path / "s2", say=lambda s: None)


# -- the streaming path -----------------------------------------------------------------------
def test_stream_resume_is_exact_with_tokenizer_workers(tmp_path, tok):
    src = write_corpus(tmp_path / "c.jsonl", n_docs=40)
    cfg = DataConfig(source=str(src), max_seq_len=SEQ, shuffle_buffer=16, heldout_fraction=0.1)
    ref = PretrainStream(cfg, tok, 4, seed=2)
    ref_batches = [ref.next_batch() for _ in range(40)]  # crosses epochs
    a = PretrainStream(cfg, tok, 4, seed=2, workers=2)
    try:
        got = [a.next_batch() for _ in range(9)]
        state = a.state_dict()
        assert isinstance(state["buffer"], torch.Tensor)  # the numpy buffer, one block
        got += [a.next_batch() for _ in range(3)]
    finally:
        a.close()
    b = PretrainStream(cfg, tok, 4, seed=2, workers=2)
    try:
        b.load_state_dict(state)
        rest = [b.next_batch() for _ in range(31)]
    finally:
        b.close()
    assert all(torch.equal(x, y) for x, y in zip(got[:9] + rest, ref_batches))
    assert all(torch.equal(x, y) for x, y in zip(got, ref_batches))  # workers change nothing


def test_loader_state_at_a_mark_replays_the_step(tmp_path, tok):
    """The trainer marks each step start; a step that fails half-way is checkpointed at its
    start, and the resumed loader hands out that step's micro-batches again."""
    src = write_corpus(tmp_path / "c.jsonl", n_docs=30)
    cfg = DataConfig(source=str(src), max_seq_len=SEQ, shuffle_buffer=8, heldout_fraction=0.1)
    ref = PretrainStream(cfg, tok, 4, seed=1)
    ref_batches = [ref.next_batch() for _ in range(14)]
    loader = BatchLoader(PretrainStream(cfg, tok, 4, seed=1), prefetch=2)
    seen = [next(loader) for _ in range(3)]
    at = loader.mark()
    seen += [next(loader) for _ in range(2)]  # half of a step of 4 micro-batches
    state = loader.state_dict(at=at)
    assert len(state["pending"]) >= 2
    loader.close()
    resumed = BatchLoader(PretrainStream(cfg, tok, 4, seed=1), prefetch=2)
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(11)]
    resumed.close()
    assert all(torch.equal(x, y) for x, y in zip(seen[:3] + rest, ref_batches))
    with pytest.raises(ValueError, match="latest mark"):
        BatchLoader(PretrainStream(cfg, tok, 4, seed=1), prefetch=0).state_dict(at=0)


def test_eval_set_is_cached(tmp_path, tok, monkeypatch):
    src = write_corpus(tmp_path / "c.jsonl", n_docs=40)
    cfg = _stream_cfg(src)
    cache = tmp_path / "cache"
    first = build_eval_set(cfg, tok, 4, cache_dir=cache)
    assert len(list(cache.glob("eval-*.npy"))) == 1

    def no_stream(*a, **k):
        raise AssertionError("the cached eval set read the corpus again")

    monkeypatch.setattr(eval_cache, "iter_texts", no_stream)
    assert torch.equal(build_eval_set(cfg, tok, 4, cache_dir=cache), first)
    monkeypatch.undo()
    # another eval size (or corpus, or sequence length) is another entry
    build_eval_set(cfg, tok, 5, cache_dir=cache)
    assert len(list(cache.glob("eval-*.npy"))) == 2


def test_draws_do_not_depend_on_the_micro_batch(tmp_path, tok):
    """Accumulation reproduces one big batch: micro 8 reads what micro 2 x 4 reads."""
    src = write_corpus(tmp_path / "c.jsonl", n_docs=30)
    cfg = DataConfig(source=str(src), max_seq_len=SEQ, shuffle_buffer=8, heldout_fraction=0.1)
    big, small = PretrainStream(cfg, tok, 8, seed=4), PretrainStream(cfg, tok, 2, seed=4)
    for _ in range(12):
        assert torch.equal(big.next_batch(), torch.cat([small.next_batch() for _ in range(4)]))


def test_a_source_failing_mid_batch_resumes_that_batch(tmp_path, tok, monkeypatch):
    """The rows drawn before the failure are in the state; the resumed stream completes the
    batch as the uninterrupted one did."""
    src = write_corpus(tmp_path / "c.jsonl", n_docs=30)
    cfg = DataConfig(source=str(src), max_seq_len=SEQ, shuffle_buffer=4, heldout_fraction=0.1,
                     max_retries=0)
    ref = PretrainStream(cfg, tok, 6, seed=0)
    want = [ref.next_batch() for _ in range(8)]
    s = PretrainStream(cfg, tok, 6, seed=0)
    got = [s.next_batch() for _ in range(3)]
    def dead(self, *a):
        raise stream.StreamError("data source failed 4 times in a row: reset")

    monkeypatch.setattr(stream._Reader, "chunk", dead)
    s._docs = None  # the next document is read through the dead source
    with pytest.raises(stream.StreamError):
        for _ in range(5):
            got.append(s.next_batch())
    state = s.state_dict()
    assert 0 < len(state["partial"]) < 6
    monkeypatch.undo()
    b = PretrainStream(cfg, tok, 6, seed=0)
    b.load_state_dict(state)
    got += [b.next_batch() for _ in range(8 - len(got))]
    assert all(torch.equal(x, y) for x, y in zip(got, want))
