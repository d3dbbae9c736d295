"""Bad input to the GLUE launchers: one line on stderr, exit code 2, no traceback."""
import os
import subprocess
import sys

import pytest

from fixtures import make_tiny_model, write_fixture

from fixtures import REPO  # noqa: E402
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args, script="finetune.py"):
    p = subprocess.run([sys.executable, str(REPO / "launch" / script), *map(str, args)],
                       capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    return p


def assert_user_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, p.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture
def rte_dir(tmp_path):
    return write_fixture(tmp_path / "glue", "rte", n_train=10, n_dev=4)


def test_unknown_task(tiny):
    assert_user_error(run("--task", "squad", "--model", tiny, "--data-dir", "x"),
                      "unknown task 'squad'", "cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli")


def test_wrong_column_count_names_file_and_line(tiny, rte_dir):
    f = rte_dir / "RTE" / "train.tsv"
    lines = f.read_text().splitlines()
    lines[5] = lines[5].rsplit("\t", 1)[0]  # drop the label column of data row 5 (line 6)
    f.write_text("\n".join(lines) + "\n")
    assert_user_error(run("--task", "rte", "--model", tiny, "--data-dir", rte_dir),
                      f"{f}:6", "expected 4 tab-separated columns", "found 3")


def test_label_outside_task_set(tiny, rte_dir):
    f = rte_dir / "RTE" / "dev.tsv"
    f.write_text(f.read_text().replace("not_entailment", "contradiction", 1))
    assert_user_error(run("--task", "rte", "--model", tiny, "--data-dir", rte_dir),
                      "label 'contradiction' is not one of task rte's labels")


def test_missing_data_dir_files(tiny, tmp_path):
    write_fixture(tmp_path, "rte", n_train=4, n_dev=4)
    (tmp_path / "RTE" / "dev.tsv").unlink()
    assert_user_error(run("--task", "rte", "--model", tiny, "--data-dir", tmp_path),
                      "missing file", "RTE/dev.tsv")
    assert_user_error(run("--task", "cola", "--model", tiny, "--data-dir", tmp_path),
                      "no 'CoLA' folder")


def test_model_without_weights(rte_dir, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert_user_error(run("--task", "rte", "--model", d, "--data-dir", rte_dir), "has no weights")
    assert_user_error(run("--task", "rte", "--model", tmp_path / "nope", "--data-dir", rte_dir),
                      "no such directory")


def test_bad_override_and_hub_offline(tiny):
    assert_user_error(run("--task", "rte", "--model", tiny, "train.epoch=1"),
                      "unknown config key 'train.epoch'")
    # no --data-dir: the hub, which is unreachable offline -> suggest --data-dir
    assert_user_error(run("--task", "rte", "--model", tiny), "nyu-mll/glue", "--data-dir")


def test_distill_bad_student_spec(tiny, rte_dir):
    assert_user_error(run("--task", "rte", "--teacher", tiny, "--student", "init:magic",
                          "--data-dir", rte_dir, script="distill_task.py"),
                      "unknown init 'init:magic'")


def test_a_decoder_is_refused(tmp_path, rte_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    p = run("--task", "rte", "--model", tmp_path / "gpt2", "--data-dir", rte_dir,
            "--output-dir", tmp_path / "o")
    assert_user_error(p, f"--model: '{tmp_path / 'gpt2'}' is a 'gpt2' model; GLUE fine-tuning "
                         "here takes an encoder of one of: bert")
