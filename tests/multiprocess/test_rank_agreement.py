"""Ranks that agree: a data source that dies on one rank stops every rank together, with one
checkpoint, instead of leaving the others waiting in the next all-reduce."""
import subprocess

from fixtures import launch_cmd, start, tiny_overrides, wait_for, write_corpus


def test_a_dead_stream_on_one_rank_stops_every_rank_with_one_checkpoint(tmp_path, tiny_teacher):
    """2 DDP ranks, each streaming its own file; one file disappears mid-run, so only that
    rank's source fails (after its retries). Both ranks must learn it before the next
    all-reduce, write the same checkpoint together and exit, instead of one hanging."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus / "long.jsonl", n_docs=80, seed=1)
    short = write_corpus(corpus / "short.jsonl", n_docs=6, seed=2)  # its epochs end quickly
    out = tmp_path / "r"
    args = tiny_overrides(tiny_teacher, corpus, out, **{
        "parallel.backend": "ddp", "train.max_steps": 200, "train.log_every": 1,
        "checkpoint.every_steps": 2, "data.max_retries": 1, "data.heldout_fraction": 0.05})
    proc = start(launch_cmd("torchrun", 2, args), tmp_path / "log.txt")
    wait_for(out / "checkpoints" / "step-00000002" / "COMPLETE", proc)
    short.unlink()  # the rank reading it fails when it next opens it (its next epoch)
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("a rank hung after the other's source died")
    log = (tmp_path / "log.txt").read_text()
    assert rc != 0
    assert "data source failed 2 times in a row" in log, log[-3000:]
    assert "the data source failed on another rank" in log, log[-3000:]
    step = int(log.split("checkpoint saved at step ")[1].split(",")[0])
    assert (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file()
