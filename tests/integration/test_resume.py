"""Runs that survive: SIGKILL + --resume is exact, SIGTERM checkpoints and exits 0, corrupt or
unfinished checkpoints are skipped, a failing source is retried."""
import shutil
import signal

import pytest

from fixtures import (PYTHON, REPO, pretrain_in_process, read_metrics, start, tiny_overrides,
                      wait_for)

STEPS, EVERY = 40, 5


def _args(teacher, corpus, out, **kw):
    """The demo config's code paths, shrunk only in model and data: its precision (bf16 where
    the CPU has it), dropout on, and the MFU peak measured at start (a matmul on random data:
    it must not disturb the restored generators)."""
    return tiny_overrides(teacher, corpus, out, **{
        "train.max_steps": STEPS, "checkpoint.every_steps": EVERY, "train.log_every": 1,
        "train.eval_every": 1000, "checkpoint.keep_last": 2, "train.precision": "auto", **kw})


def _train_rows(out):
    return {m["step"]: m for m in read_metrics(out) if "loss/total" in m}


def _start(args, log):
    return start([PYTHON, str(REPO / "launch" / "pretrain.py"), *args], log)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher, corpus):
    out = tmp_path_factory.mktemp("ref") / "r"
    r = pretrain_in_process(_args(tiny_teacher, corpus, out))
    assert r.returncode == 0, r.stderr[-2000:]
    return _train_rows(out)


def _kill_then_resume(args, out, reference):
    """SIGKILL after the step-10 checkpoint, then --resume: every later step's loss is the
    uninterrupted run's and every sequence is read once."""
    proc = _start(args, out.parent / "killed.log")
    wait_for(out / "checkpoints" / "step-00000010" / "COMPLETE", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {int(p.name[5:]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step")}
    killed_at = max(_train_rows(out))
    assert killed_at < STEPS, "the run finished before the kill; make it longer"
    r = pretrain_in_process(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    resumed_from = max(s for s in done if s <= killed_at)
    assert f"(step {resumed_from})" in r.stdout
    rows = _train_rows(out)
    assert sorted(rows) == list(range(1, STEPS + 1))  # nothing missing, nothing twice
    for step in range(resumed_from + 1, STEPS + 1):
        assert rows[step]["loss/total"] == pytest.approx(reference[step]["loss/total"],
                                                         abs=1e-6, rel=0), step
        # exactly the sequences of the uninterrupted run: none repeated, none skipped
        assert rows[step]["data/sequences"] == reference[step]["data/sequences"] == step * 8


def test_sigkill_then_resume_is_exact(tmp_path, tiny_teacher, corpus, reference):
    out = tmp_path / "r"
    _kill_then_resume(_args(tiny_teacher, corpus, out), out, reference)
    # the eval set was built once, then read back from the run's cache on resume
    assert len(list((out / "cache").glob("eval-*.npy"))) == 1


def test_sigkill_then_resume_is_exact_on_prepared_shards(tmp_path, tiny_teacher, corpus):
    from distil_scale.data.shards import PrepareConfig, prepare_shards

    shards = tmp_path / "shards"
    prepare_shards(PrepareConfig(source=str(corpus), tokenizer=str(tiny_teacher), seq_len=32,
                                 shard_sequences=64, heldout_fraction=0.1), shards,
                   say=lambda s: None)
    ref = tmp_path / "ref"
    r = pretrain_in_process(_args(tiny_teacher, shards, ref))
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "r"
    _kill_then_resume(_args(tiny_teacher, shards, out), out, _train_rows(ref))
    assert not (out / "cache").exists()  # the shard directory holds its eval set and counts


def test_sigterm_checkpoints_and_exits_zero(tmp_path, tiny_teacher, corpus, reference):
    out = tmp_path / "r"
    args = _args(tiny_teacher, corpus, out)
    proc = _start(args, tmp_path / "log.txt")
    wait_for(out / "checkpoints" / "step-00000005" / "COMPLETE", proc)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    stdout = (tmp_path / "log.txt").read_text()
    assert rc == 0, stdout[-2000:]
    assert "preempted: checkpoint saved at step" in stdout and "--resume" in stdout
    step = int(stdout.split("preempted: checkpoint saved at step ")[1].split(";")[0])
    assert step < STEPS
    assert (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file()
    r = pretrain_in_process(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _train_rows(out)
    assert rows[STEPS]["loss/total"] == pytest.approx(reference[STEPS]["loss/total"], abs=1e-6)


def test_unfinished_and_corrupt_checkpoints_are_skipped(tmp_path, tiny_teacher, corpus):
    out = tmp_path / "r"
    args = _args(tiny_teacher, corpus, out, **{"train.max_steps": 10})
    assert pretrain_in_process(args).returncode == 0
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000005", "step-00000010"]
    (ck / "step-00000010" / "engine.pt").write_bytes(b"not a checkpoint")  # corrupt latest
    shutil.copytree(ck / "step-00000005", ck / "step-00000099")
    (ck / "step-00000099" / "COMPLETE").unlink()  # a newer one that never finished
    r = pretrain_in_process(_args(tiny_teacher, corpus, out,
                                          **{"train.max_steps": 12}) + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step-00000099 has no COMPLETE marker" in r.stderr
    assert "step-00000010 failed to load" in r.stderr
    assert "(step 5)" in r.stdout
    assert max(_train_rows(out)) == 12


def test_keep_last_never_deletes_the_only_complete_checkpoint(tmp_path):
    from distil_scale.checkpoint import CheckpointManager

    m = CheckpointManager(tmp_path / "ck", keep_last=1)
    m.save(1, lambda d: (d / "x").write_text("1"))
    (tmp_path / "ck" / "step-00000002").mkdir()  # incomplete: does not count
    m._prune()
    assert [p.name for p in m.complete()] == ["step-00000001"]
    m.save(3, lambda d: (d / "x").write_text("3"))
    assert [p.name for p in m.complete()] == ["step-00000003"]


def test_diverging_run_stops_after_k_nonfinite_steps(tmp_path, tiny_teacher, corpus):
    out = tmp_path / "r"
    r = pretrain_in_process(tiny_overrides(
        tiny_teacher, corpus, out, **{"train.lr": 1e25, "train.warmup_steps": 0,
                                      "train.max_grad_norm": 0, "train.max_nonfinite_steps": 3,
                                      "train.max_steps": 20, "train.log_every": 1}))
    assert r.returncode == 1, r.stdout[-1000:] + r.stderr[-1000:]
    assert "non-finite steps in a row" in r.stderr and "Traceback" not in r.stderr
    skipped = [m["optim/skipped_steps"] for m in read_metrics(out) if "optim/skipped_steps" in m]
    assert skipped and skipped[-1] >= 2


class _FlakyRows:
    """A datasets-like stream that raises a network error after ``fail_after`` rows."""

    def __init__(self, texts, fail_after, failures):
        self.texts, self.fail_after, self.failures = texts, fail_after, failures
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        self.pos = sd["pos"]

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        while self.pos < len(self.texts):
            if self.pos == self.fail_after and self.failures > 0:
                self.failures -= 1
                raise ConnectionError("connection reset by peer")
            self.pos += 1
            yield {"text": self.texts[self.pos - 1]}


def test_stream_retries_then_gives_up(monkeypatch):
    from transformers import AutoTokenizer

    from fixtures import minilm_path
    from distil_scale.config import DataConfig
    from distil_scale.data import stream as L

    monkeypatch.setattr(L.time, "sleep", lambda s: None)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    texts = [f"text number {i} " + "the river and the city " * 10 for i in range(30)]
    cfg = DataConfig(source="x", max_seq_len=32, shuffle_buffer=1, heldout_fraction=1e-9,
                     max_retries=2)
    ok = L.PretrainStream(cfg, tok, 2, open_fn=lambda c, **k: _FlakyRows(texts, 5, 2))
    ref = L.PretrainStream(cfg, tok, 2, open_fn=lambda c, **k: _FlakyRows(texts, 5, 0))
    for _ in range(6):  # two failures, each retried from the last good row: same batches
        assert ok.next_batch().tolist() == ref.next_batch().tolist()
    dead = L.PretrainStream(cfg, tok, 2, open_fn=lambda c, **k: _FlakyRows(texts, 5, 99))
    with pytest.raises(L.StreamError, match="failed 3 times"):
        for _ in range(6):
            dead.next_batch()


def test_a_text_stream_on_another_world_size_needs_restart_data(tmp_path, tiny_teacher,
                                                                 corpus):
    """A text stream's position is per rank: a checkpoint of 2 processes goes on in 1 only with
    --restart-data, which reads the stream again from its start and says so."""
    import json

    out = tmp_path / "r"
    args = _args(tiny_teacher, corpus, out, **{"train.max_steps": 3, "checkpoint.every_steps": 3})
    assert pretrain_in_process(args).returncode == 0
    marker = out / "checkpoints" / "step-00000003" / "COMPLETE"
    meta = json.loads(marker.read_text())
    assert meta["world_size"] == 1
    # as a 2-rank run writes it (rank 0's trainer file is the one another world reads)
    marker.write_text(json.dumps({**meta, "world_size": 2}))
    r = pretrain_in_process(args + ["--resume"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert ("written by 2 processes and this run has 1; a text stream's position is per rank "
            "and cannot be re-dealt: resume with 2, or pass --restart-data") in r.stderr
    assert "Traceback" not in r.stderr
    assert marker.is_file()  # nothing already written is lost
    r = pretrain_in_process(args + ["--resume", "--restart-data", "train.max_steps=4"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("resume: step 3 written by 2 processes, continuing on 1: --restart-data: the text "
            "stream starts again from its beginning") in r.stdout
    assert max(_train_rows(out)) == 4
