"""A run is never lost: faults injected at each write point (checkpoint, export, lock) and
resumes that must continue exactly or refuse with exit 2, leaving every byte on disk as it was.

Runs go through launch/pretrain.py's ``main`` in process (a few seconds each), so the exit code
and the one-line message are the ones a user sees.
"""
import errno
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fixtures import read_metrics, tiny_overrides
from distil_scale import pretrain_cli
from distil_scale.fsio import LOCK


def _cli(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["launch/pretrain.py", *args])
    with pytest.raises(SystemExit) as e:
        pretrain_cli.main()
    out = capsys.readouterr()
    return e.value.code, [ln for ln in out.err.splitlines() if ln.startswith("error:")], out.err


def _snapshot(root):
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _steps(out):
    return [m["step"] for m in read_metrics(out) if "loss/total" in m]


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_teacher, corpus):
    """A finished 6-step run with checkpoints at steps 3 and 6; tests copy it."""
    out = tmp_path_factory.mktemp("done") / "r"
    args = tiny_overrides(tiny_teacher, corpus, out, **{"train.log_every": 1})
    rc = subprocess.run([sys.executable, "-c", "from distil_scale import pretrain_cli; "
                         "pretrain_cli.main()", *args], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr[-2000:]
    return out, args


@pytest.fixture
def run(done, tmp_path):
    import shutil

    src, args = done
    out = tmp_path / "r"
    shutil.copytree(src, out)
    return out, [a.replace(str(src), str(out)) for a in args]


@pytest.mark.parametrize("change, named", [
    ("student.n_layers=1", "student.n_layers: 1 now, 2 in the checkpoint"),
    ("train.lr=0.001", "train.lr: 0.001 now, 0.0005 in the checkpoint"),
    ("data.max_seq_len=24", "data.max_seq_len: 24 now, 32 in the checkpoint"),
])
def test_resume_with_a_changed_config_refuses_and_touches_nothing(monkeypatch, capsys, run,
                                                                  change, named):
    out, args = run
    before = _snapshot(out)
    rc, lines, err = _cli(monkeypatch, capsys, args + [change, "--resume"])
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert "differs from the one step-00000006 was written with" in lines[0]
    assert any(named in ln for ln in lines[1:]), lines
    assert _snapshot(out) == before  # every byte of every checkpoint, metrics and export


def test_resume_with_other_shapes_and_no_recorded_config_refuses(monkeypatch, capsys, run):
    """A checkpoint that reads fine but does not fit (an older one, without its config):
    refused with the shape named, never "start from step 0"."""
    out, args = run
    for marker in (out / "checkpoints").glob("step-*/COMPLETE"):
        meta = json.loads(marker.read_text())
        del meta["config"]
        marker.write_text(json.dumps(meta))
    before = _snapshot(out)
    rc, lines, err = _cli(monkeypatch, capsys, args + ["student.n_layers=1", "--resume"])
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert "step-00000006 does not fit this run" in lines[0]
    assert "Unexpected key" in lines[1] or "size mismatch" in lines[1], lines
    assert _snapshot(out) == before


def test_resume_with_every_checkpoint_truncated_refuses(monkeypatch, capsys, run):
    out, args = run
    for f in (out / "checkpoints").glob("step-*/engine.pt"):
        f.write_bytes(f.read_bytes()[:1000])
    before = _snapshot(out)
    rc, lines, err = _cli(monkeypatch, capsys, args + ["--resume"])
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert "no checkpoint in" in lines[0] and "loads" in lines[0]
    assert [ln.split("/")[0] for ln in lines[1:]] == ["error:   step-00000006",
                                                      "error:   step-00000003"]
    assert all("engine.pt: cannot be read" in ln for ln in lines[1:])
    assert _snapshot(out) == before
    assert _steps(out) == [1, 2, 3, 4, 5, 6]  # metrics not rewritten


def test_a_trainer_file_that_reads_but_does_not_fit_refuses(monkeypatch, capsys, run):
    """engine.pt loads before the trainer state is applied; a trainer state that does not fit
    must stop the run, not leave trained weights under a "fresh" start."""
    out, args = run
    torch.save({"step": 6}, out / "checkpoints" / "step-00000006" / "trainer_rank0.pt")
    before = _snapshot(out)
    rc, lines, err = _cli(monkeypatch, capsys, args + ["train.max_steps=9", "--resume"])
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert "step-00000006 does not fit" in lines[0] and "KeyError" in lines[1]
    assert _snapshot(out) == before


def test_a_corrupt_newest_checkpoint_falls_back_with_nothing_half_loaded(monkeypatch, capsys,
                                                                         caplog, run):
    out, args = run
    (out / "checkpoints" / "step-00000006" / "trainer_rank0.pt").write_bytes(b"garbage")
    first = {m["step"]: m["loss/total"] for m in read_metrics(out) if "loss/total" in m}
    rc, _, err = _cli(monkeypatch, capsys, args + ["--resume"])
    assert rc == 0, err[-2000:]
    assert "step-00000006/trainer_rank0.pt: cannot be read" in caplog.text
    assert _steps(out) == [1, 2, 3, 4, 5, 6]  # resumed at 3: 4..6 once each, none twice
    again = {m["step"]: m["loss/total"] for m in read_metrics(out) if "loss/total" in m}
    for step in (4, 5, 6):  # step 3's state alone: step 6's weights were never applied
        assert again[step] == pytest.approx(first[step], abs=1e-6, rel=0), step


def test_an_allowed_change_takes_effect(monkeypatch, capsys, run):
    """train.max_steps may change on a resume, and the schedule follows the new length."""
    out, args = run
    rc, _, err = _cli(monkeypatch, capsys, args + ["train.max_steps=9", "--resume"])
    assert rc == 0, err[-2000:]
    rows = {m["step"]: m for m in read_metrics(out) if "loss/total" in m}
    assert sorted(rows) == list(range(1, 10))
    # linear decay over 9 steps after 1 warmup step: after 8 steps, 1/8 of train.lr
    assert rows[8]["optim/lr"] == pytest.approx(5e-4 / 8)
    card = (out / "student" / "README.md").read_text()
    assert "9" in card and not (out / "student.tmp").exists()


def test_resume_into_a_directory_without_a_run_starts_one_and_says_so(monkeypatch, capsys,
                                                                      tmp_path, tiny_teacher,
                                                                      corpus):
    """A requeued job's first attempt runs the same --resume command; the line it prints
    shows a mistyped directory at once."""
    out = tmp_path / "typo"
    args = tiny_overrides(tiny_teacher, corpus, out, **{"train.max_steps": 2})
    monkeypatch.setattr(sys, "argv", ["launch/pretrain.py", *args, "--resume"])
    with pytest.raises(SystemExit) as e:
        pretrain_cli.main()
    printed = capsys.readouterr()
    assert e.value.code == 0 and "Traceback" not in printed.err
    assert f"--resume: '{out}' holds no run yet" in printed.out
    assert "starting a new one there" in printed.out
    assert (out / "student" / "model.safetensors").is_file()
    assert max(r.get("step", 0) for r in read_metrics(out)) == 2


def test_a_second_run_into_a_live_directory_exits_2_at_once(monkeypatch, capsys, run):
    out, args = run
    live = subprocess.Popen(["sleep", "60"])  # stands for a training process still running
    try:
        (out / LOCK).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        before = _snapshot(out)
        for extra in (["--resume"], ["--overwrite"]):
            rc, lines, err = _cli(monkeypatch, capsys, args + extra)
            assert rc == 2 and "Traceback" not in err, err[-2000:]
            assert lines == [f"error: run.output_dir: '{out}' is in use by a running job (pid "
                             f"{live.pid} on {socket.gethostname()}); wait for it to finish or "
                             f"choose another run.output_dir (if that job is dead on another "
                             f"machine, delete {out / LOCK})"]
            assert "run:" not in capsys.readouterr().out  # refused before anything was built
        assert _snapshot(out) == before
    finally:
        live.kill()
        live.wait()



def test_two_real_runs_into_one_directory_then_a_kill_and_a_resume(monkeypatch, capsys, tmp_path,
                                                                   tiny_teacher, corpus):
    """A live run's directory: a second run exits 2 at once; SIGKILL the first, and --resume
    takes over its stale lock and continues from its checkpoint."""
    import time

    from fixtures import PYTHON, REPO, start, wait_for

    out = tmp_path / "r"
    args = tiny_overrides(tiny_teacher, corpus, out, **{"train.max_steps": 400,
                                                        "checkpoint.every_steps": 2})
    first = start([PYTHON, str(REPO / "launch" / "pretrain.py"), *args], tmp_path / "first.log")
    try:
        wait_for(out / "checkpoints" / "step-00000002" / "COMPLETE", first)
        t0 = time.perf_counter()
        rc, lines, err = _cli(monkeypatch, capsys, args + ["--resume"])
        assert rc == 2 and "is in use by a running job (pid" in lines[0], err[-2000:]
        assert time.perf_counter() - t0 < 10  # refused before the teacher or corpus is read
    finally:
        first.kill()
        first.wait()
    assert (out / LOCK).exists()  # the killed run's, now stale
    last = max(int(c.parent.name[5:]) for c in (out / "checkpoints").glob("step-*/COMPLETE"))
    rc, _, err = _cli(monkeypatch, capsys, args + [f"train.max_steps={last + 2}", "--resume"])
    assert rc == 0, err[-2000:]
    steps = _steps(out)
    assert steps[-1] == last + 2 and steps == sorted(set(steps))  # continued, nothing twice
    assert not (out / LOCK).exists()

def test_a_stale_lock_is_taken_over_and_released_at_exit(monkeypatch, capsys, run):
    out, args = run
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    rc, _, err = _cli(monkeypatch, capsys, args + ["train.max_steps=7", "--resume"])
    assert rc == 0, err[-2000:]
    assert not (out / LOCK).exists()


def test_a_failed_run_releases_its_lock(monkeypatch, capsys, run):
    out, args = run
    rc, _, _ = _cli(monkeypatch, capsys, args + ["student.n_layers=1", "--resume"])
    assert rc == 2 and not (out / LOCK).exists()


@pytest.mark.parametrize("out_kind", ["file", "under-a-file", "readonly"])
def test_an_unwritable_output_dir_is_refused_before_any_data_is_read(monkeypatch, capsys,
                                                                     tmp_path, tiny_teacher,
                                                                     out_kind):
    if out_kind == "file":
        out = tmp_path / "afile"
        out.write_text("x")
        want = f"run.output_dir: '{out}' is a file, not a directory"
    elif out_kind == "under-a-file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "r"
        want = f"run.output_dir: cannot write to '{out}' (Not a directory)"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "r"
        want = f"run.output_dir: cannot write to '{out}'"
    missing = tmp_path / "no-corpus-here"  # read first, it would be the error
    rc, lines, err = _cli(monkeypatch, capsys, tiny_overrides(tiny_teacher, missing, out))
    assert rc == 2 and "Traceback" not in err
    assert len(lines) == 1 and want in lines[0], lines


def test_disk_full_while_checkpointing_removes_the_partial_copy(monkeypatch, capsys, run):
    from distil_scale.train import setup

    out, args = run
    real = setup.save_torch

    def fill(obj, path):
        real(obj, path)
        if "step-00000007" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(setup, "save_torch", fill)
    rc, lines, err = _cli(monkeypatch, capsys, args + ["train.max_steps=7", "--resume"])
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert lines == [f"error: checkpoint: writing step 7 to {out / 'checkpoints'} failed (the "
                     "disk is full); the partial copy was removed and the older checkpoints "
                     "are untouched: free space (or fix the path) and resume with --resume"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003",
                                                                       "step-00000006"]
    assert not (out / LOCK).exists()



@pytest.mark.parametrize("point", ["write", "marker"])
def test_disk_full_at_any_point_of_a_save_is_one_line_and_leaves_no_partial_copy(tmp_path,
                                                                                 monkeypatch,
                                                                                 point):
    from distil_scale import checkpoint
    from distil_scale.checkpoint import CheckpointManager
    from distil_scale.errors import UserError

    m = CheckpointManager(tmp_path / "ck", keep_last=2)
    m.save(1, lambda d: (d / "x").write_text("v1"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if point == "marker":
        monkeypatch.setattr(checkpoint, "atomic_write", full)
    with pytest.raises(UserError, match=r"writing step 2 .* failed \(the disk is full\)"):
        m.save(2, full if point == "write" else lambda d: (d / "x").write_text("v2"))
    assert sorted(p.name for p in m.root.iterdir()) == ["step-00000001"]

def test_checkpoint_files_are_on_disk_before_the_marker(monkeypatch, capsys, run):
    from distil_scale import checkpoint

    out, args = run
    seen = []
    real = checkpoint.fsync_tree

    def spy(d):
        seen.append(sorted(p.name for p in d.iterdir()))
        real(d)

    monkeypatch.setattr(checkpoint, "fsync_tree", spy)
    rc, _, err = _cli(monkeypatch, capsys, args + ["train.max_steps=7", "--resume"])
    assert rc == 0, err[-2000:]
    assert seen == [["engine.pt", "trainer_rank0.pt"]]  # synced, and no COMPLETE yet


def test_a_kill_during_export_leaves_the_previous_student_whole(monkeypatch, capsys, run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from distil_scale.train import loop

    out, args = run
    before = _snapshot(out / "student")

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies between the weights and the card

    monkeypatch.setattr(loop, "write_card", killed)
    monkeypatch.setattr(sys, "argv", ["launch/pretrain.py", *args, "train.max_steps=7",
                                      "--resume"])
    with pytest.raises(KeyboardInterrupt):
        pretrain_cli.main()
    assert _snapshot(out / "student") == before
    assert len(AutoTokenizer.from_pretrained(out / "student")) == 30522
    AutoModelForMaskedLM.from_pretrained(out / "student")
    assert not (out / LOCK).exists()
    monkeypatch.undo()
    rc, _, err = _cli(monkeypatch, capsys, args + ["train.max_steps=7", "--resume"])
    assert rc == 0, err[-2000:]  # the half-written student.tmp is no obstacle
    assert not (out / "student.tmp").exists()
    assert "7" in (out / "student" / "README.md").read_text()



# -- each write point of a checkpoint, killed -----------------------------------------------------


@pytest.mark.parametrize("point", ["write", "fsync", "marker", "swap", "prune"])
@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "same-step"])
def test_a_kill_at_any_point_of_a_checkpoint_save_loses_nothing_complete(tmp_path, monkeypatch,
                                                                         point, resave):
    from distil_scale import checkpoint, fsio
    from distil_scale.checkpoint import CheckpointManager

    m = CheckpointManager(tmp_path / "ck", keep_last=2)
    for step in (1, 2):
        m.save(step, lambda d, s=step: (d / "x").write_text(f"v{s}"))
    step = 2 if resave else 3

    def die(*a, **k):
        raise KeyboardInterrupt

    def writer(d):
        (d / "x").write_text("half")
        if point == "write":
            die()

    target = {"fsync": (checkpoint, "fsync_tree"), "marker": (checkpoint, "atomic_write"),
              "prune": (CheckpointManager, "_prune")}.get(point)
    if target:
        monkeypatch.setattr(*target, die)
    if point == "swap":  # between moving the old copy aside and renaming the new one in
        real = fsio.Path.rename
        monkeypatch.setattr(fsio.Path, "rename", lambda self, to: (
            die() if self.name.startswith(".tmp-step") else real(self, to)))
    with pytest.raises(KeyboardInterrupt):
        m.save(step, writer)
    monkeypatch.undo()
    done = {d.name: (d / "x").read_text() for d in m.complete()}
    # what was complete stays complete, with its own content (or the new one, once complete)
    assert done.get("step-00000001") == "v1"
    assert done.get("step-00000002") in ("v2", "half" if resave else None)
    assert set(done) <= {"step-00000001", "step-00000002", "step-00000003"}
    m.save(4, lambda d: (d / "x").write_text("v4"))  # the next save is not in the way
    assert [d.name for d in m.complete()][0] == "step-00000004"
    assert not [p.name for p in m.root.iterdir() if p.name.startswith(".")]

# -- GLUE outputs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    from fixtures import make_tiny_model, write_fixture

    d = tmp_path_factory.mktemp("glue")
    for t in ("rte", "mrpc"):
        write_fixture(d, t, n_train=16, n_dev=8)
    return d, make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def _glue_cfg(task, data_dir, out):
    from distil_scale.glue.config import load_glue_config

    return load_glue_config(task, None, [f"data.data_dir={data_dir}", f"run.output_dir={out}",
                                         "train.epochs=1", "train.batch_size=8",
                                         "data.max_length=32", "train.progress_bar=false"])


def test_glue_refuses_a_directory_holding_another_tasks_run(glue, tmp_path, monkeypatch):
    from distil_scale.errors import UserError
    from distil_scale.glue import runner
    from distil_scale.glue.runner import finetune
    from distil_scale.glue.tasks import TASKS

    data, model = glue
    out = tmp_path / "rte-run"
    finetune(TASKS["rte"], str(model), _glue_cfg("rte", data, out))
    assert json.loads((out / "results.json").read_text())["task"] == "rte"
    assert not (out / LOCK).exists() and not (out / "model.tmp").exists()
    before = _snapshot(out)
    monkeypatch.setattr(runner, "prepare_data", lambda *a: pytest.fail("data read first"))
    with pytest.raises(UserError, match=r"holds a finetune run of rte; this is a finetune run "
                                        r"of mrpc: choose another output directory"):
        finetune(TASKS["mrpc"], str(model), _glue_cfg("mrpc", data, out))
    assert _snapshot(out) == before
    monkeypatch.undo()
    # a rerun of the same task replaces it, metrics and all (not appended to the old ones)
    finetune(TASKS["rte"], str(model), _glue_cfg("rte", data, out))
    assert len([m for m in read_metrics(out) if "train/epoch_loss" in m]) == 1


def test_glue_into_a_live_directory_is_refused_before_any_data_is_read(glue, tmp_path,
                                                                      monkeypatch):
    """The lock is taken right after the process group exists (rank 0 takes it, every rank
    hears the refusal), before the data or the model is read."""
    from distil_scale.errors import UserError
    from distil_scale.glue import distill, runner
    from distil_scale.glue.distill import distill_task
    from distil_scale.glue.runner import finetune
    from distil_scale.glue.tasks import TASKS

    data, model = glue
    out = tmp_path / "busy"
    out.mkdir()
    live = subprocess.Popen(["sleep", "60"])  # stands for a fine-tune still running there
    try:
        (out / LOCK).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        before = _snapshot(out)
        for mod in (runner, distill):
            monkeypatch.setattr(mod, "prepare_data", lambda *a: pytest.fail("data read first"))
        want = (rf"--output-dir \(run.output_dir\): '{out}' is in use by a running job "
                rf"\(pid {live.pid} on ")
        with pytest.raises(UserError, match=want):
            finetune(TASKS["rte"], str(model), _glue_cfg("rte", data, out))
        with pytest.raises(UserError, match=want):
            distill_task(TASKS["rte"], str(model), "init:teacher-layers",
                         _glue_cfg("rte", data, out))
        assert _snapshot(out) == before  # the live run's lock and files untouched
    finally:
        live.kill()
        live.wait()


def test_a_kill_while_saving_the_glue_model_keeps_the_previous_one(glue, tmp_path, monkeypatch):
    from distil_scale.glue import rundir
    from distil_scale.glue.runner import finetune
    from distil_scale.glue.tasks import TASKS

    data, model = glue
    out = tmp_path / "rte-run"
    finetune(TASKS["rte"], str(model), _glue_cfg("rte", data, out))
    before = _snapshot(out / "model"), (out / "results.json").read_bytes()

    def killed(*a):
        raise KeyboardInterrupt  # dies with the new model written, before it is swapped in

    monkeypatch.setattr(rundir, "replace_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(TASKS["rte"], str(model), _glue_cfg("rte", data, out))
    assert (_snapshot(out / "model"), (out / "results.json").read_bytes()) == before
    assert not (out / LOCK).exists()


# -- prepared teachers ----------------------------------------------------------------------------


def test_a_prepared_teacher_is_reused_only_for_the_teacher_it_was_prepared_from(
        monkeypatch, capsys, tmp_path, corpus):
    from fixtures import make_tiny_teacher

    a = make_tiny_teacher(tmp_path / "a", layers=2, with_head=False, seed=1)
    b = make_tiny_teacher(tmp_path / "b", layers=2, with_head=False, seed=2)
    pdir = tmp_path / "prepared"
    common = {"teacher.prepare_steps": 2, "teacher.prepared_dir": str(pdir),
              "train.max_steps": 1, "checkpoint.every_steps": 1}
    rc, _, err = _cli(monkeypatch, capsys, tiny_overrides(a, corpus, tmp_path / "ra", **common))
    assert rc == 0, err[-2000:]
    record = json.loads((pdir / "PREPARED.json").read_text())
    assert record["source"] == str(a) and record["key"]
    before = _snapshot(pdir)
    rc, lines, err = _cli(monkeypatch, capsys, tiny_overrides(b, corpus, tmp_path / "rb",
                                                               **common))
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert lines == [f"error: teacher.prepared_dir: '{pdir}' holds a teacher prepared from "
                     f"'{a}', not for this run's teacher '{b}'; point teacher.prepared_dir at "
                     "another directory (or leave it empty for the per-teacher cache)"]
    assert _snapshot(pdir) == before
    # one prepared by an older version records nothing: refused too, not trusted
    del record["source"], record["key"]
    (pdir / "PREPARED.json").write_text(json.dumps(record))
    rc, lines, _ = _cli(monkeypatch, capsys, tiny_overrides(a, corpus, tmp_path / "rc",
                                                             **common))
    assert rc == 2 and "by an older version that did not record from what" in lines[0]


# -- shards ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_teacher, corpus):
    from distil_scale.data.shards import PrepareConfig, prepare_shards

    out = tmp_path_factory.mktemp("shards") / "s"
    prepare_shards(PrepareConfig(source=str(corpus), tokenizer=str(tiny_teacher), seq_len=32,
                                 shard_sequences=64, heldout_fraction=0.1), out,
                   say=lambda s: None)
    return out


def test_a_second_preparation_into_a_busy_out_is_refused(tmp_path, tiny_teacher, corpus):
    from distil_scale.data.shards import PrepareConfig, prepare_shards
    from distil_scale.errors import UserError

    out = tmp_path / "s"
    out.mkdir()
    live = subprocess.Popen(["sleep", "60"])  # the first preparation, still running
    try:
        (out / LOCK).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(UserError, match=r"--out: .* is in use by a running job"):
            prepare_shards(PrepareConfig(source=str(corpus), tokenizer=str(tiny_teacher),
                                         seq_len=32), out, say=lambda s: None)
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    finally:
        live.kill()
        live.wait()
    # once it is gone its lock is stale: the preparation runs, and leaves no lock behind
    m = prepare_shards(PrepareConfig(source=str(corpus), tokenizer=str(tiny_teacher),
                                     seq_len=32), out, say=lambda s: None)
    assert m["n_sequences"] > 0 and not (out / LOCK).exists()


def test_a_damaged_shard_is_one_line_not_an_index_error(monkeypatch, capsys, tmp_path,
                                                         tiny_teacher, shards):
    import shutil

    import numpy as np

    bad = tmp_path / "s"
    shutil.copytree(shards, bad)
    arr = np.load(bad / "train-00000.npy", mmap_mode="r+")
    arr[:] = 65000  # ids past the 30522-token vocabulary, as a garbled file holds
    arr.flush()
    del arr
    out = tmp_path / "r"
    rc, lines, err = _cli(monkeypatch, capsys, tiny_overrides(tiny_teacher, bad, out))
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert lines == [f"error: data.source: a shard in '{bad}' (train-00000.npy) holds token id "
                     "65000, outside the vocabulary of 30522; the shards are damaged: prepare "
                     "them again with launch/prepare_data.py"]
    assert not (out / LOCK).exists()
