"""End-to-end runs of launch/pretrain.py's main, in process, on a tiny real teacher and a
corpus made in code (the launcher's own start: tests/integration/test_console_scripts.py and
test_demo.py)."""
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import DistilBertForMaskedLM, pipeline

from fixtures import make_tiny_teacher, pretrain_in_process, read_metrics, tiny_overrides


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_teacher, corpus):
    out = tmp_path_factory.mktemp("run") / "r"
    r = pretrain_in_process(tiny_overrides(tiny_teacher, corpus, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_run_directory_layout(finished_run):
    out, r = finished_run
    for name in ("config.yaml", "metrics.jsonl", "tb", "checkpoints", "student"):
        assert (out / name).exists(), name
    assert "done: student held-out masked-token accuracy" in r.stdout
    assert str(out / "student") in r.stdout


def test_metrics_jsonl_and_tensorboard_agree(finished_run):
    out, _ = finished_run
    rows = read_metrics(out)
    train_rows = [m for m in rows if "loss/total" in m]
    assert [m["step"] for m in train_rows] == [2, 4, 6]
    for key in ("loss/total", "loss/ce", "loss/mlm", "loss/cos", "loss/ce_weighted",
                "optim/lr", "optim/grad_norm", "perf/tokens_per_s", "perf/mfu",
                "perf/data_wait_pct", "mem/peak_gib", "data/sequences"):
        assert key in train_rows[-1], key
    m = train_rows[-1]
    assert m["loss/total"] == pytest.approx(5 * m["loss/ce"] + 2 * m["loss/mlm"] + m["loss/cos"],
                                            rel=1e-5)
    assert m["data/sequences"] == 6 * 8
    evals = [m for m in rows if "eval/student_mlm_acc" in m]
    assert [m["step"] for m in evals] == [0, 3, 6]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("loss/total")}
    assert tb == pytest.approx({m["step"]: m["loss/total"] for m in train_rows}, rel=1e-6)
    assert "eval/teacher_mlm_acc" in acc.Tags()["scalars"]


def test_checkpoints_complete_and_pruned(finished_run):
    out, _ = finished_run
    ck = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ck == ["step-00000003", "step-00000006"]  # keep_last 2, no temp dirs left
    for d in (out / "checkpoints").iterdir():
        assert (d / "COMPLETE").is_file()
        st = torch.load(d / "trainer_rank0.pt", weights_only=False)
        assert {"step", "data", "masker", "rng", "counters"} <= set(st)
        eng = torch.load(d / "engine.pt", weights_only=False)
        assert {"model", "optimizer", "scheduler"} <= set(eng)


def test_export_loads_with_stock_transformers(finished_run):
    out, _ = finished_run
    model = DistilBertForMaskedLM.from_pretrained(out / "student")
    assert model.config.n_layers == 2
    assert model.vocab_projector.weight.data_ptr() == \
        model.distilbert.embeddings.word_embeddings.weight.data_ptr()
    fill = pipeline("fill-mask", model=str(out / "student"), device="cpu")
    answers = fill("the river runs through the [MASK] .")
    assert len(answers) == 5 and all("token_str" in a for a in answers)


def test_refuses_existing_run_then_resumes(finished_run, tiny_teacher, corpus):
    out, _ = finished_run
    before = (out / "metrics.jsonl").read_text()
    r = pretrain_in_process(tiny_overrides(tiny_teacher, corpus, out))
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert (out / "metrics.jsonl").read_text() == before
    r = pretrain_in_process(tiny_overrides(tiny_teacher, corpus, out,
                                                   **{"train.max_steps": 8}) + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resume:" in r.stdout and "step 6" in r.stdout
    steps = [m["step"] for m in read_metrics(out) if "loss/total" in m]
    assert steps == [2, 4, 6, 8]


def test_batch_arithmetic_is_checked(tmp_path, tiny_teacher, corpus):
    r = pretrain_in_process(tiny_overrides(tiny_teacher, corpus, tmp_path / "r",
                                                   **{"train.global_batch": 10}))
    assert r.returncode == 2
    assert "train.global_batch: 10 is not divisible by train.micro_batch 4" in r.stderr


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_teacher, corpus):
    """Same global batch, micro 8 x 1 vs micro 2 x 4: same loss trajectory (fp32, no dropout)."""
    common = {"student.dropout": 0, "student.attention_dropout": 0, "train.global_batch": 8,
              "train.max_steps": 4, "train.log_every": 1, "train.eval_every": 100,
              "data.prefetch": 0}
    a = pretrain_in_process(tiny_overrides(tiny_teacher, corpus, tmp_path / "a",
                                                   **common, **{"train.micro_batch": 8}))
    b = pretrain_in_process(tiny_overrides(tiny_teacher, corpus, tmp_path / "b",
                                                   **common, **{"train.micro_batch": 2}))
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-1500:], b.stderr[-1500:])
    la = [m["loss/total"] for m in read_metrics(tmp_path / "a") if "loss/total" in m]
    lb = [m["loss/total"] for m in read_metrics(tmp_path / "b") if "loss/total" in m]
    assert len(la) == 4
    assert la == pytest.approx(lb, rel=1e-5)
    assert la[-1] < la[0]


def test_headless_teacher_refused_or_prepared(tmp_path, corpus):
    enc = make_tiny_teacher(tmp_path / "enc", layers=2, with_head=False)
    base = tiny_overrides(enc, corpus, tmp_path / "r1")
    r = pretrain_in_process(base + ["teacher.prepare_steps=0"])
    assert r.returncode == 2 and "has no MLM head" in r.stderr and "Traceback" not in r.stderr
    env = {"DISTIL_SCALE_CACHE": str(tmp_path / "cache")}
    r = pretrain_in_process(base + ["teacher.prepare_steps=4", "teacher.prepare_batch=4",
                                            "train.max_steps=2"], env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "preparing it for 4 steps" in r.stdout
    assert "held-out masked-token accuracy" in r.stdout
    prepared = list((tmp_path / "cache" / "teachers").iterdir())
    assert len(prepared) == 1 and (prepared[0] / "PREPARED.json").is_file()
    r = pretrain_in_process(tiny_overrides(enc, corpus, tmp_path / "r2")
                     + ["teacher.prepare_steps=4", "teacher.prepare_batch=4",
                        "train.max_steps=2"], env=env)
    assert r.returncode == 0 and "preparing" not in r.stdout  # reused
    assert f"prepared MLM head from {prepared[0]}" in r.stdout
