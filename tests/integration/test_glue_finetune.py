"""Fine-tuning and task distillation end to end with tiny real models (in process), the
distillation loss against hand-computed values, the refusal of untrained teachers, report.py."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from distil_scale.errors import UserError
from distil_scale.glue.config import load_glue_config
from distil_scale.glue.distill import TaskDistillLoss, distill_task
from distil_scale.glue.modeling import load_teacher, student_from_teacher
from distil_scale.glue.report import report_main
from distil_scale.glue.runner import finetune
from distil_scale.glue.tasks import TASKS
from fixtures import make_tiny_model, write_fixture

from fixtures import REPO  # noqa: E402
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FIELDS = ("task", "protocol", "metrics", "main_metric", "majority_baseline", "seed", "model",
          "steps", "wall_s")


def cfg_for(task, data_dir, out, *extra):
    return load_glue_config(task, None, [f"data.data_dir={data_dir}", f"run.output_dir={out}",
                                         "train.epochs=2", "train.batch_size=8",
                                         "train.lr=1e-3", "data.max_length=32",
                                         "train.progress_bar=false", *extra])


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("glue")
    for t in ("rte", "stsb", "mnli", "sst2"):
        write_fixture(d, t, n_train=48, n_dev=16)
    return d


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    """What the pretraining core exports: a DistilBertForMaskedLM directory."""
    return make_tiny_model(tmp_path_factory.mktemp("m") / "student")


@pytest.fixture(scope="module")
def rte_teacher(tmp_path_factory, glue_dir):
    """A tiny BERT fine-tuned on the RTE fixture: the teacher for distillation tests."""
    base = make_tiny_model(tmp_path_factory.mktemp("t") / "bert", arch="bert", n_layers=4)
    out = tmp_path_factory.mktemp("t_run")
    r = finetune(TASKS["rte"], str(base), cfg_for("rte", glue_dir, out))
    return out / "model", r


def test_finetune_mlm_export_writes_results_and_model(rte_teacher, tiny_mlm, glue_dir, tmp_path):
    r = finetune(TASKS["rte"], str(tiny_mlm), cfg_for("rte", glue_dir, tmp_path,
                                                       "data.max_train_samples=24"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(r))
    for k in FIELDS:
        assert k in saved, k
    assert saved["task"] == "rte" and saved["protocol"] == "dev" and saved["main_metric"] == "accuracy"
    assert set(saved["metrics"]) == {"accuracy"} == set(saved["majority_baseline"])
    assert saved["train_examples"] == 24 and saved["steps"] == 2 * 3  # 24 / 8 per epoch, 2 epochs
    assert len(saved["epochs"]) == 2 and saved["best_epoch"] in (1, 2)
    # the dev score reported is the best epoch's
    assert saved["metrics"]["accuracy"] == max(e["dev"]["accuracy"] for e in saved["epochs"])
    assert "pre_classifier.weight" in saved["model_info"]["new_weights"]
    info = json.loads((tmp_path / "model" / "glue_task.json").read_text())
    assert info["task"] == "rte" and info["num_labels"] == 2
    assert (tmp_path / "config.yaml").is_file()


def test_carved_protocol_with_two_seeds_reports_median(tiny_mlm, glue_dir, tmp_path):
    r = finetune(TASKS["sst2"], str(tiny_mlm),
                 cfg_for("sst2", glue_dir, tmp_path, "run.protocol=carved", "run.seeds=2",
                         "train.epochs=1", "run.save_model=false"))
    assert r["protocol"] == "carved" and [s["seed"] for s in r["seeds"]] == [42, 43]
    accs = [s["metrics"]["accuracy"] for s in r["seeds"]]
    assert r["median"]["accuracy"] == pytest.approx(sum(accs) / 2) == r["metrics"]["accuracy"]
    for s in (42, 43):
        one = json.loads((tmp_path / f"seed_{s}" / "results.json").read_text())
        assert one["select_split"] == "val" and one["report_splits"] == {"test": 7}
        assert one["train_examples"] == 51  # 80 % of 48 + 16
    assert json.loads((tmp_path / "results.json").read_text())["median"] == r["median"]


def test_stsb_regression_and_mnli_two_dev_sets(tiny_mlm, glue_dir, tmp_path):
    r = finetune(TASKS["stsb"], str(tiny_mlm), cfg_for("stsb", glue_dir, tmp_path / "s",
                                                        "train.epochs=1"))
    assert set(r["metrics"]) == {"pearson", "spearman"} and r["main_metric"] == "spearman"
    assert all(math.isfinite(v) for v in r["metrics"].values())
    assert r["majority_baseline"] == {"spearman": 0.0, "pearson": 0.0}
    r = finetune(TASKS["mnli"], str(tiny_mlm), cfg_for("mnli", glue_dir, tmp_path / "m",
                                                        "train.epochs=1"))
    assert set(r["metrics"]) == {"accuracy", "accuracy_mm"}
    assert set(r["majority_baseline"]) == {"accuracy", "accuracy_mm"}
    assert r["report_splits"] == {"dev": 16, "dev_mm": 16}


def test_distill_loss_matches_hand_computation():
    s = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    t = torch.tensor([[2.0, 0.0], [-1.0, 1.0]])
    y = torch.tensor([0, 1])
    fake = lambda logits: (lambda **kw: SimpleNamespace(logits=logits, hidden_states=None))  # noqa
    teacher, student = fake(t), fake(s.clone().requires_grad_(True))
    for m in (teacher, student):  # model_inputs() reads the forward signature
        m.forward = lambda input_ids=None, labels=None, output_hidden_states=False: None
    loss = TaskDistillLoss(teacher, alpha=0.3, temperature=2.0, alpha_cos=0.0, regression=False)
    total, parts = loss(student, {"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": y})
    T = 2.0
    kl = 0.0
    for i in range(2):
        ps = torch.softmax(s[i] / T, -1)
        pt = torch.softmax(t[i] / T, -1)
        kl += float((pt * (pt.log() - ps.log())).sum())
    kl = kl / 2 * T * T
    ce = -(math.log(torch.softmax(s[0], -1)[0]) + math.log(torch.softmax(s[1], -1)[1])) / 2
    assert parts["kd"].item() == pytest.approx(kl, rel=1e-5)
    assert parts["task"].item() == pytest.approx(ce, rel=1e-5)
    assert total.item() == pytest.approx(0.3 * kl + 0.7 * ce, rel=1e-5)


def test_student_from_teacher_layers(rte_teacher):
    teacher = load_teacher(str(rte_teacher[0]), TASKS["rte"])
    student, layers = student_from_teacher(teacher, [], "teacher-layers", seed=0)
    # half the depth, spread as pretraining spreads it (models.even_layer_map: 4 -> 0, 3)
    assert layers == [0, 3] and student.config.num_hidden_layers == 2
    sd_t, sd_s = teacher.state_dict(), student.state_dict()
    for k, v in sd_s.items():
        src = k.replace("layer.1.", "layer.3.") if ".layer.1." in k else k
        assert torch.equal(v, sd_t[src]), k
    rnd, _ = student_from_teacher(teacher, [1, 3], "random", seed=0)
    assert not torch.equal(rnd.state_dict()["bert.encoder.layer.0.attention.self.query.weight"],
                           sd_t["bert.encoder.layer.1.attention.self.query.weight"])


def test_distill_task_runs_from_finetuned_teacher(rte_teacher, tiny_mlm, glue_dir, tmp_path):
    teacher_dir, _ = rte_teacher
    r = distill_task(TASKS["rte"], str(teacher_dir), "init:teacher-layers",
                     cfg_for("rte", glue_dir, tmp_path / "a", "train.epochs=1",
                             "distill.alpha_cos=1.0"))
    assert r["mode"] == "distill" and r["model_info"]["teacher_layers"] == [0, 3]
    assert set(r["teacher_metrics"]) == {"accuracy"}
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    for k in FIELDS:
        assert k in saved, k
    assert saved["distill"]["alpha"] == 0.5 and saved["distill"]["alpha_cos"] == 1.0
    # a DistilBERT student directory (no token_type_ids) under a BERT teacher
    r = distill_task(TASKS["rte"], str(teacher_dir), str(tiny_mlm),
                     cfg_for("rte", glue_dir, tmp_path / "b", "train.epochs=1",
                             "run.save_model=false"))
    assert r["model_info"]["init"] == "pretrained" and r["model_info"]["cls"].startswith("Distil")


def test_untrained_teacher_is_refused(tiny_mlm, rte_teacher, tmp_path):
    # DistilBERT MLM export: pre_classifier + classifier missing
    with pytest.raises(UserError, match=r"no trained classification head \(missing classifier"):
        load_teacher(str(tiny_mlm), TASKS["rte"])
    # BERT MLM: pooler + classifier missing
    bert = make_tiny_model(tmp_path / "bert_mlm", arch="bert")
    with pytest.raises(UserError, match=r"bert\.pooler\.dense\.bias"):
        load_teacher(str(bert), TASKS["rte"])
    # a trained 2-label head for a 3-label task
    with pytest.raises(UserError, match="has 2 output labels but task mnli needs 3"):
        load_teacher(str(rte_teacher[0]), TASKS["mnli"])
    # fine-tuned on another task with the same label count
    with pytest.raises(UserError, match="fine-tuned on rte, not qnli"):
        load_teacher(str(rte_teacher[0]), TASKS["qnli"])


def test_untrained_teacher_refused_by_launcher(tiny_mlm, glue_dir):
    p = subprocess.run([sys.executable, str(REPO / "launch" / "distill_task.py"), "--task", "rte",
                        "--teacher", str(tiny_mlm), "--student", "init:teacher-layers",
                        "--data-dir", str(glue_dir)],
                       capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "no trained classification head" in err[0]
    assert "launch/finetune.py --task rte" in err[0]


def test_report_markdown_and_png(rte_teacher, tmp_path):
    _, r = rte_teacher
    run_dir = rte_teacher[0].parent
    out = tmp_path / "rep"
    assert report_main([str(run_dir), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "BERT-base (paper)" in md and "DistilBERT (paper)" in md and "majority" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| RTE"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["RTE", "accuracy", "69.3", "59.9"]
    assert float(cells[4]) == pytest.approx(100 * r["metrics"]["accuracy"], abs=0.06)
    assert float(cells[5]) == pytest.approx(100 * r["majority_baseline"]["accuracy"], abs=0.06)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
