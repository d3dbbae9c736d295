"""GLUE readers (local tsv layouts, made in code), the two protocols, the config, and the real
files in ../shared/data (skipped when absent)."""

import pytest

from distil_scale.errors import UserError
from distil_scale.config import ConfigError
from distil_scale.glue.config import load_glue_config
from distil_scale.glue.data import Example, carve, make_splits, read_local, read_tsv
from distil_scale.glue.tasks import TASKS, get_task
from fixtures import write_fixture

from fixtures import SHARED  # noqa: E402

SHARED_GLUE = SHARED / "data" / "glue"


def test_cola_has_no_header_and_keeps_quotes(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text('gj04\t1\t\tHe said "hi.\nck01\t0\t*\tBill "the man" left.\n')
    ex = read_tsv(TASKS["cola"], f)
    assert ex == [Example('He said "hi.', None, 1), Example('Bill "the man" left.', None, 0)]


def test_mrpc_bom_header_is_skipped(tmp_path):
    write_fixture(tmp_path, "mrpc", n_train=5, n_dev=3)
    raw = (tmp_path / "MRPC" / "train.tsv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfQuality")
    splits = read_local(TASKS["mrpc"], tmp_path)
    assert len(splits["train"]) == 5 and len(splits["dev"]) == 3
    assert all(e.label in (0, 1) and e.text_b for e in splits["train"])


def test_qqp_reader_and_wrong_column_count(tmp_path):
    write_fixture(tmp_path, "qqp", n_train=6, n_dev=4)
    splits = read_local(TASKS["qqp"], tmp_path)
    assert len(splits["train"]) == 6 and splits["train"][0].text_a.endswith("?")
    f = tmp_path / "QQP" / "dev.tsv"
    lines = f.read_text().splitlines()
    lines[3] = lines[3] + "\textra"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"dev\.tsv:4: expected 6 tab-separated columns.*found 7"):
        read_local(TASKS["qqp"], tmp_path)


def test_mnli_reader_matched_and_mismatched(tmp_path):
    write_fixture(tmp_path, "mnli", n_train=8, n_dev=5)
    splits = read_local(TASKS["mnli"], tmp_path)
    assert set(splits) == {"train", "dev", "dev_mm"}
    assert len(splits["train"]) == 8 and len(splits["dev"]) == 5 == len(splits["dev_mm"])
    assert {e.label for e in splits["train"] + splits["dev"]} <= {0, 1, 2}
    # gold_label is the last column (16 in dev, 12 in train)
    row = (tmp_path / "MNLI" / "dev_matched.tsv").read_text().splitlines()[1].split("\t")
    assert len(row) == 16 and splits["dev"][0].label == TASKS["mnli"].labels.index(row[-1])


def test_label_outside_task_set(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n")
    with pytest.raises(UserError, match=r"train\.tsv:3: label 'neutral' is not one of task rte"):
        read_tsv(TASKS["rte"], f)
    f.write_text("sentence\tlabel\nok\t1\nbad\t2\n")
    with pytest.raises(UserError, match=r":3: label '2'"):
        read_tsv(TASKS["sst2"], f)
    f.write_text("\t".join(["x"] * 10) + "\n" + "\t".join(["0"] * 9 + ["high"]) + "\n")
    with pytest.raises(UserError, match="not a number"):
        read_tsv(TASKS["stsb"], f)


def test_missing_files(tmp_path):
    with pytest.raises(UserError, match="no 'RTE' folder"):
        read_local(TASKS["rte"], tmp_path)
    (tmp_path / "RTE").mkdir()
    with pytest.raises(UserError, match=r"missing file .*RTE/train\.tsv"):
        read_local(TASKS["rte"], tmp_path)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(UserError, match="unknown task 'foo'; valid tasks: cola, sst2"):
        get_task("foo")
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").name == "stsb"


def test_carve_is_fixed_disjoint_80_10_10():
    ex = [Example(str(i), None, i % 2) for i in range(1000)]
    tr, va, te = carve(ex, seed=0)
    assert (len(tr), len(va), len(te)) == (800, 100, 100)
    assert len({e.text_a for e in tr + va + te}) == 1000
    assert carve(ex, seed=0) == (tr, va, te)
    assert carve(ex, seed=1)[0] != tr


def test_make_splits_protocols(tmp_path):
    write_fixture(tmp_path, "rte", n_train=80, n_dev=20)
    task = TASKS["rte"]
    raw = read_local(task, tmp_path)
    dev = make_splits(task, raw, "dev", carve_seed=0, max_train_samples=30)
    assert len(dev.train) == 30 and dev.train_total == 80 and dev.select is dev.report["dev"]
    assert dev.select_name == "dev" and len(dev.report["dev"]) == 20
    # the subset is fixed and does not depend on the training seed
    assert make_splits(task, raw, "dev", carve_seed=0, max_train_samples=30).train == dev.train
    carved = make_splits(task, raw, "carved", carve_seed=0)
    assert (len(carved.train), len(carved.select), len(carved.report["test"])) == (80, 10, 10)
    assert carved.select_name == "val"
    pooled = {(e.text_a, e.text_b) for e in raw["train"] + raw["dev"]}
    got = {(e.text_a, e.text_b) for e in carved.train + carved.select + carved.report["test"]}
    assert got == pooled


def test_config_layers_and_smoke_overrides(tmp_path):
    cfg = load_glue_config("rte")
    assert cfg.train.batch_size == 32 and cfg.data.max_length == 128
    assert cfg.train.lr == pytest.approx(3e-5)  # configs/glue/rte.yaml over default.yaml
    assert load_glue_config("sst2").data.max_length == 64
    cfg = load_glue_config("rte", None, ["data.max_train_samples=50", "train.epochs=1"])
    assert cfg.data.max_train_samples == 50 and cfg.train.epochs == 1
    extra = tmp_path / "x.yaml"
    extra.write_text("train:\n  lr: 1.0e-4\n")
    assert load_glue_config("rte", str(extra)).train.lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_glue_config("rte", None, ["train.epoch=1"])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_glue_config("rte", None, ["train.epochs=two"])
    with pytest.raises(ConfigError, match="run.protocol: must be one of dev, carved"):
        load_glue_config("rte", None, ["run.protocol=test"])


# real files -------------------------------------------------------------------------------

COUNTS = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "rte": (2490, 277),
          "stsb": (5749, 1500), "wnli": (635, 71)}


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason=f"no shared GLUE data at {SHARED_GLUE}")
@pytest.mark.parametrize("task", sorted(COUNTS))
def test_shared_glue_counts(task):
    splits = read_local(TASKS[task], SHARED_GLUE)
    assert (len(splits["train"]), len(splits["dev"])) == COUNTS[task]
    if task == "cola":
        assert sum(e.label for e in splits["train"]) == 6023
    if task == "mrpc":
        assert sum(e.label for e in splits["train"]) == 2474
    if task == "rte":
        assert sum(e.label == 0 for e in splits["train"]) == 1249  # entailment
