"""launch/gpu_check.py without a GPU: the skip line, the whole orchestration on the CPU at tiny
shapes (--cpu-smoke), the ZeRO accumulation check's numbers on CPU bf16, and the pieces that
decide what a GPU run compares (profile copies, refusals, planned memory)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import time

import pytest

from fixtures import PYTHON, REPO, md_table, run_env

SCRIPT = str(REPO / "launch" / "gpu_check.py")
SKIP_LINE = ("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False); "
             "run it on a GPU machine")


def no_cuda_env() -> dict:
    return run_env(CUDA_VISIBLE_DEVICES="")  # a CPU machine, even where a GPU is present


def test_without_cuda_it_skips_with_the_reason_and_writes_nothing():
    before = set((REPO / "docs").iterdir())
    r = subprocess.run([PYTHON, SCRIPT], cwd=REPO, env=no_cuda_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == SKIP_LINE
    assert set((REPO / "docs").iterdir()) == before


def test_fp16_on_the_cpu_smoke_is_a_one_line_error():
    r = subprocess.run([PYTHON, SCRIPT, "--cpu-smoke", "--precisions", "fp16"], cwd=REPO,
                       env=no_cuda_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: --precisions: fp16 needs a CUDA device; use bf16 with "
                      "--cpu-smoke"], r.stderr[-2000:]


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_reports_it(tmp_path):
    report = tmp_path / "r.md"
    t0 = time.time()
    r = subprocess.run([PYTHON, SCRIPT, "--cpu-smoke", "--out", str(report)], cwd=REPO,
                       env=no_cuda_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"cpu smoke: {time.time() - t0:.0f} s", r.stdout, sep="\n")
    text = report.read_text()
    assert "gpu_check: report" in r.stdout.splitlines()[-1]

    cases = md_table(text, "Backends")
    assert [(c["case"], c["precision"]) for c in cases] == [
        ("plain", "bf16"), ("DDP x1", "bf16"), ("DeepSpeed rtx4070.json", "bf16"),
        ("plain, save-reload-continue", "bf16")]
    for c in cases:
        assert c["status"].split(":")[0] == "ok" and c["exit"] == "0", c
        assert c["data wait"].endswith("%") and c["MFU (measured peak)"].endswith("%"), c
        assert float(c["peak GiB"]) > 0 and float(c["planned GiB"]) > 0, c
        assert math.isfinite(float(c["final loss"])) and c["losses finite"] == "yes", c
        assert float(c["s/step"]) > 0 and float(c["tokens/s"].replace(",", "")) > 0, c

    zero = md_table(text, "ZeRO-2 gradient accumulation precision")
    assert len(zero) == 8  # 2 profiles x 2 precisions x (as shipped, without data_types)
    for z in zero:
        if z["precision"] == "fp16":
            assert z["verdict"].startswith("skipped: "), z  # DeepSpeed refuses fp16 on CPU
        else:
            assert re.fullmatch(r"\d\.\d\de[-+]\d\d", z["relative error"]), z
    resumed = cases[-1]["status"]
    assert "after the reload: max relative loss difference" in resumed, resumed
    assert "verdict: everything ran" in text and "IN PROGRESS" not in text
    # the logs stay beside the report
    assert (tmp_path / "r-logs" / "plain-bf16" / "logs" / "stdout.log").is_file()
    bench = text.split("## Bench\n", 1)[1]
    # the bench's own rows are its tests' business; here: it ran and its table came back
    assert "launch/bench.py --shapes tiny" in bench and "`: ok, " in bench and "== seq" in bench


def test_zero_accumulation_error_on_cpu_bf16():
    """In a process of its own: DeepSpeed's process group must not outlive the check."""
    code = (
        "import json, sys\n"
        "from distil_scale.tools.gpu_check.zero import zero_grad_accum_error\n"
        "ds = json.load(open(sys.argv[1]))\n"
        "shipped = {k: ds[k] for k in ('zero_optimization', 'data_types') if k in ds}\n"
        "bare = {'zero_optimization': ds['zero_optimization']}\n"
        "print(json.dumps([zero_grad_accum_error(shipped, 'bf16', 'cpu'),\n"
        "                  zero_grad_accum_error(bare, 'bf16', 'cpu')]))\n")
    r = subprocess.run([PYTHON, "-c", code, str(REPO / "ds_configs" / "rtx4070.json")],
                       cwd=REPO, env=no_cuda_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    shipped, bare = json.loads(r.stdout.strip().splitlines()[-1])
    # the shipped profile accumulates in fp32 (data_types.grad_accum_dtype): only fp32 rounding
    assert shipped < 1e-4, shipped
    # DeepSpeed's default accumulates in bf16: ~1e-2 over 64 micro-batches (measured 8.2e-3)
    assert bare > 1e-3, bare


def test_profile_copies_change_only_the_precision_switches(tmp_path):
    from distil_scale.tools.gpu_check.case import profile_json
    from distil_scale.tools.gpu_check.spec import SMOKE, Ctx

    ctx = Ctx(SMOKE, True, tmp_path, "t", "s", 0.0, 1.0, {}, 1.0)
    for profile in ("rtx4070", "v100x8"):
        shipped = json.loads((REPO / "ds_configs" / f"{profile}.json").read_text())
        for precision, other in (("bf16", "fp16"), ("fp16", "bf16")):
            got = json.loads(profile_json(ctx, profile, precision).read_text())
            assert got[precision]["enabled"] is True
            assert other not in got or got[other]["enabled"] is False
            for key in set(shipped) - {"bf16", "fp16"}:
                assert got[key] == shipped[key], (profile, key)
            if "fp16" in shipped:  # the loss-scale settings travel with the switch
                assert got["fp16"]["initial_scale_power"] == shipped["fp16"][
                    "initial_scale_power"]


def test_refusals_are_read_from_plain_and_torchrun_output():
    from distil_scale.tools.gpu_check.proc import refusal_line
    from distil_scale.tools.gpu_check.spec import CASES, CaseResult

    line = "train.precision: fp16 is not supported with parallel.backend=fsdp here; use bf16"
    assert refusal_line(f"noise\nerror: {line}\nTraceback...") == line
    assert refusal_line(f"[rank0]: error: {line}") == line
    assert refusal_line("error: 5 non-finite steps in a row at step 4") == ""  # not a refusal
    fsdp = CaseResult(CASES["fsdp"], "fp16", status="refused", detail=line)
    assert not fsdp.failed  # FSDP2 refusing fp16 is the code's own guard
    assert CaseResult(CASES["plain"], "fp16", status="refused", detail=line).failed


def test_datasheet_rows_match_the_specific_name_before_the_family():
    """The report's datasheet figure and the bench's MFU column read one table
    (metrics.DATASHEET_16BIT_TFLOPS); a device name takes its most specific row."""
    from distil_scale.metrics import datasheet_entry

    got = {n: datasheet_entry(n) for n in (
        "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
        "NVIDIA L40S", "NVIDIA L4", "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-16GB",
        "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4070")}
    assert {n: e and e[0] for n, e in got.items()} == {
        "NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100 PCIe": "H100 PCIe",
        "NVIDIA H100 NVL": "H100 NVL", "NVIDIA H200": "H200", "NVIDIA L40S": "L40S",
        "NVIDIA L4": "L4", "NVIDIA A100-SXM4-80GB": "A100", "Tesla V100-SXM2-16GB": "V100",
        "NVIDIA GeForce RTX 4090": "RTX 4090", "NVIDIA GeForce RTX 4070": None}
    assert got["NVIDIA H100 PCIe"][1] < got["NVIDIA H100 NVL"][1] < got["NVIDIA H100 80GB HBM3"][1]


def test_planned_memory_at_gpu_shapes(tmp_path):
    """The planner's numbers for the GPU cases (bert-base-uncased's config is built in, so
    nothing is downloaded): the offloading profile plans less than the one that keeps AdamW
    on the GPU, and everything fits the smallest GPU the profiles name."""
    from distil_scale.tools.gpu_check.case import case_command, overrides, planned_gib
    from distil_scale.tools.gpu_check.spec import BBC, CASES, GPU, Ctx

    ctx = Ctx(GPU, False, tmp_path, "bert-base-uncased", BBC, 0.0, 1.0, {}, 80.0)
    plan = {}
    for key in ("plain", "fsdp", "rtx4070", "v100x8"):
        for precision in ("bf16", "fp16"):
            out = tmp_path / f"{key}-{precision}"
            _, ds_path = case_command(ctx, CASES[key], precision, out)
            plan[key, precision] = planned_gib(
                ctx, overrides(ctx, CASES[key], precision, out), ds_path)
    assert all(1.0 < v < 12.0 for v in plan.values()), plan
    for precision in ("bf16", "fp16"):
        assert plan["rtx4070", precision] < plan["v100x8", precision], plan


def shadow_deepspeed(root) -> str:
    """A ``deepspeed`` package without its launcher, first on the path: what a node without
    DeepSpeed (or with its scripts somewhere else) looks like to ``-m deepspeed.launcher``."""
    pkg = root / "shadow" / "deepspeed"
    pkg.mkdir(parents=True)
    # accelerate (through transformers' save_pretrained) imports DeepSpeedEngine from any
    # deepspeed it finds installed, for an isinstance check: a class of that name, and nothing
    # else, keeps this an install whose launcher is missing, not one that breaks every export
    (pkg / "__init__.py").write_text("class DeepSpeedEngine:\n    pass\n")
    return str(root / "shadow")


def test_a_missing_launcher_fails_its_case_and_the_check_goes_on(tmp_path):
    report = tmp_path / "r.md"
    env = no_cuda_env()
    env["PYTHONPATH"] = shadow_deepspeed(tmp_path) + ":" + env["PYTHONPATH"]
    r = subprocess.run([PYTHON, SCRIPT, "--cpu-smoke", "--cases", "rtx4070,plain", "--no-zero",
                        "--no-bench", "--out", str(report)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(ln.startswith("gpu_check: DeepSpeed rtx4070.json bf16: failed (exit code 1")
               for ln in lines), lines
    assert any(ln.startswith("gpu_check: plain bf16: ok") for ln in lines), lines
    assert "FAILED: DeepSpeed rtx4070.json bf16 failed" in lines[-1], lines
    cases = md_table(report.read_text(), "Backends")
    assert [c["status"].split(":")[0] for c in cases] == ["failed", "ok"], cases
    assert "No module named 'deepspeed.launcher'" in cases[0]["status"], cases


def test_what_the_budget_leaves_no_room_for_is_skipped_not_failed(tmp_path):
    report = tmp_path / "r.md"
    r = subprocess.run([PYTHON, SCRIPT, "--cpu-smoke", "--budget", "1", "--out", str(report)],
                       cwd=REPO, env=no_cuda_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [ln for ln in r.stdout.splitlines()[1:-1]]
    assert steps and all("skipped (budget)" in ln for ln in steps), steps
    text = report.read_text()
    assert [c["status"] for c in md_table(text, "Backends")] == ["skipped: budget"] * 4
    assert "verdict: everything ran" in text


def test_a_run_cut_by_the_budget_is_skipped_and_its_stale_build_locks_go(tmp_path, monkeypatch):
    """In process, with a run that would outlast the budget (a sleep for the launcher)."""
    from distil_scale.tools.gpu_check import case as g
    from distil_scale.tools.gpu_check.spec import CASES, SMOKE, Ctx

    sleeper = [PYTHON, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(g, "MIN_START_S", 1.0)  # start with 3 s left, to be cut
    monkeypatch.setattr(g, "case_command",
                        lambda ctx, case, precision, out: (sleeper, g.torch_profile(ctx, "bf16")))
    ext = tmp_path / "ext"
    (ext / "cpu_adam").mkdir(parents=True)
    (ext / "cpu_adam" / "lock").write_text("")
    (ext / "other_op").mkdir()
    (ext / "other_op" / "lock").write_text("")  # not one of ours: left alone
    ctx = Ctx(SMOKE, True, tmp_path, "t", "s", time.monotonic() + 3.0, 150.0,
              {**no_cuda_env(), "TORCH_EXTENSIONS_DIR": str(ext)}, 1.0)
    said = []
    t0 = time.monotonic()
    r = g.run_case(ctx, CASES["rtx4070"], "bf16", said.append)
    assert time.monotonic() - t0 < 30
    assert r.status == "skipped" and r.detail.startswith("budget: cut after"), r
    assert not r.failed
    assert said == [f"gpu_check: DeepSpeed rtx4070.json bf16: skipped ({r.detail}), "
                    f"{r.wall:.0f} s"]
    assert not (ext / "cpu_adam" / "lock").exists() and (ext / "other_op" / "lock").exists()

    late = g.run_case(ctx, CASES["plain"], "bf16", said.append)  # the budget is spent now
    assert (late.status, late.detail, late.wall) == ("skipped", "budget", 0.0)
