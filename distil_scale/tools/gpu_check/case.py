"""One backend case: its command (the real launcher, the paper recipe, the profile's JSON at
the case's precision), its planned memory, its run within the budget, and its figures read
back from metrics.jsonl; a save-reload-continue case compares the resumed losses."""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

from ...config import load_config
from ...distributed import free_port
from ...ds_config import load_ds_config
from ...errors import first_line
from ...runtime import MEMORY_CAP_ENV
from ..plan import GiB, make_plan
from .proc import (DEEPSPEED, TORCHRUN, clear_build_locks, read_log, refusal_line, run_logged,
                   shown, tail)
from .spec import (BBC, BIG, BUDGET_SKIP, MIN_START_S, PAPER, PRETRAIN, REPO, RESUME_RTOL, Case,
                   CaseResult, Ctx)


def overrides(ctx: Ctx, case: Case, precision: str, out: Path) -> list[str]:
    s = ctx.shapes
    micro = case.micro or s.micro
    ov = [f"run.output_dir={out}", f"teacher.name_or_path={ctx.teacher}",
          f"data.source={ctx.source}", f"data.max_seq_len={s.seq}",
          "data.heldout_fraction=0.05", f"data.eval_sequences={s.eval_sequences}",
          "data.shuffle_buffer=64", "masking.count_docs=50",
          f"student.n_layers={s.student_layers}", f"student.layers={s.student_map}",
          f"train.max_steps={s.steps}", f"train.micro_batch={micro}",
          # accumulation 2: the micro-step path without sync is exercised too
          f"train.global_batch={2 * micro}", "train.warmup_steps=1",
          # every step logged: the last line's s/step is one warm step, not the first one's
          "train.log_every=1", f"train.eval_every={BIG}",
          # the resume case saves at mid-run and reloads that checkpoint
          f"checkpoint.every_steps={s.steps // 2 if case.resume else BIG}",
          "metrics.progress_bar=false", f"train.precision={precision}"]
    if case.compile:
        ov.append("train.compile=true")
    if ctx.source == BBC:
        ov.append("data.encoding_errors=replace")  # one BBC article is Latin-1
    if case.backend in ("ddp", "fsdp"):
        ov.append(f"parallel.backend={case.backend}")
    return ov


def profile_json(ctx: Ctx, profile: str, precision: str) -> Path:
    """The shipped profile with only its bf16/fp16 switches set to ``precision`` (the JSON
    decides a DeepSpeed run's precision); everything else as shipped."""
    ds = json.loads((REPO / "ds_configs" / f"{profile}.json").read_text())
    for h in ("bf16", "fp16"):
        if h == precision or h in ds:
            ds[h] = {**(ds.get(h) or {}), "enabled": h == precision}
    path = ctx.work / f"ds-{profile}-{precision}.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def torch_profile(ctx: Ctx, precision: str) -> Path:
    """What the planner is given for the torch backends: ZeRO-0 at the same precision with
    fp32 gradients (torch AMP keeps fp32 weights and gradients)."""
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "gradient_clipping": "auto",
          "zero_optimization": {"stage": 0}, "data_types": {"grad_accum_dtype": "fp32"}}
    if precision in ("bf16", "fp16"):
        ds[precision] = {"enabled": True}
    path = ctx.work / f"torch-{precision}.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def planned_gib(ctx: Ctx, ov: list[str], ds_path: Path) -> float:
    cfg = load_config(str(PAPER), ov)
    ds = load_ds_config(str(ds_path), cfg, 1)
    return make_plan(cfg, ds, gpus=1, nodes=1, gpu_mem_gib=ctx.gpu_mem_gib).total / GiB


def case_command(ctx: Ctx, case: Case, precision: str, out: Path) -> tuple[list[str], Path]:
    ov = overrides(ctx, case, precision, out)
    # --overwrite: a kept --work-dir may hold the previous check's run of the same case
    args = [str(PRETRAIN), "--config", str(PAPER), "--overwrite"]
    if case.launcher == "deepspeed":
        ds_path = profile_json(ctx, case.profile, precision)
        cmd = [*DEEPSPEED, "--num_gpus", "1", "--master_port", str(free_port()),
               *args, "--ds", str(ds_path), *ov]
    elif case.launcher == "torchrun":
        ds_path = torch_profile(ctx, precision)
        cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=1", *args, *ov]
    else:
        ds_path = torch_profile(ctx, precision)
        cmd = [sys.executable, *args, *ov]
    return cmd, ds_path


def read_run(out: Path) -> list[dict]:
    rows = []
    for ln in read_log(out / "metrics.jsonl").splitlines():
        if ln.strip():
            rows.append(json.loads(ln))  # json reads NaN/Infinity, which a diverged run logs
    return rows


_PEAK = re.compile(r"^mfu peak: ([0-9.eE+-]+) TFLOP/s", re.M)


def _last(rows: list[dict], key: str) -> float:
    vals = [float(x[key]) for x in rows if key in x]
    return vals[-1] if vals else math.nan


def read_results(r: CaseResult, out: Path, stdout: str) -> list[dict]:
    """Fills ``r``'s figures from the run's metrics.jsonl and stdout; returns the step rows."""
    rows = read_run(out)
    train_rows = [x for x in rows if "loss/total" in x and "perf/step_s" in x]
    r.losses = [float(x["loss/total"]) for x in train_rows]
    peaks = [float(x["mem/peak_gib"]) for x in rows if "mem/peak_gib" in x]
    r.peak_gib = max(peaks) if peaks else math.nan
    reserved = [float(x["mem/reserved_gib"]) for x in rows if "mem/reserved_gib" in x]
    r.reserved_gib = max(reserved) if reserved else math.nan
    r.loss_scale = _last(rows, "optim/loss_scale")
    skipped = _last(rows, "optim/skipped_steps")
    r.skipped_steps = None if math.isnan(skipped) else int(skipped)
    if train_rows:
        last = train_rows[-1]
        r.step_s, r.tokens_s = float(last["perf/step_s"]), float(last["perf/tokens_per_s"])
        r.mfu = float(last.get("perf/mfu", math.nan))
        # the first step waits for the loader's first batch; the warm steps are the figure
        waits = [float(x["perf/data_wait_pct"]) for x in train_rows[1:] or train_rows
                 if "perf/data_wait_pct" in x]
        r.data_wait_pct = sum(waits) / len(waits) if waits else math.nan
    m = _PEAK.search(stdout)
    r.peak_tflops = float(m.group(1)) if m else math.nan
    return train_rows


def run_case(ctx: Ctx, case: Case, precision: str, say) -> CaseResult:
    """One backend run; whatever goes wrong is this case's result, never the check's end."""
    r = CaseResult(case, precision)
    try:
        _run_case(ctx, r)
    except Exception as e:  # guarded: the check goes on with the next case
        r.status, r.detail = "failed", f"gpu_check: {first_line(e, 10**6, typed=True)}"
    say(f"gpu_check: {case.label} {precision}: {r.status}"
        + (f" ({r.detail})" if r.detail else "")
        + (f", {r.step_s:.3f} s/step, peak {r.peak_gib:.2f} GiB (plan {r.planned_gib:.2f})"
           if r.status == "ok" else "") + f", {r.wall:.0f} s")
    return r


def _launch(ctx: Ctx, r: CaseResult, cmd: list[str], env: dict, log_dir: Path,
            limit_by_budget: list[bool]) -> int | None:
    left = ctx.deadline - time.monotonic()
    limit = min(ctx.case_timeout, left)
    limit_by_budget.append(left < ctx.case_timeout)
    rc, wall = run_logged(cmd, env, log_dir, limit)
    r.wall += wall
    r.rc = rc
    if rc is None and r.case.launcher == "deepspeed":
        clear_build_locks(env)  # the kill may have hit an op build
    return rc


def _run_case(ctx: Ctx, r: CaseResult) -> None:
    case, precision = r.case, r.precision
    out = ctx.work / f"{case.key}-{precision}"
    r.log_dir = str(out / "logs")
    cmd, ds_path = case_command(ctx, case, precision, out)
    r.command = shown(cmd)
    env = dict(ctx.env)
    if case.cap_gib and not ctx.cpu:
        env[MEMORY_CAP_ENV] = f"{case.cap_gib:g}"
        r.command = f"{MEMORY_CAP_ENV}={case.cap_gib:g} {r.command}"
    try:
        r.planned_gib = planned_gib(ctx, overrides(ctx, case, precision, out), ds_path)
    except Exception as e:  # the plan is a column, not a reason to skip the run
        r.detail = f"plan: {first_line(e, 10**6, typed=True)}"
    if ctx.deadline - time.monotonic() < MIN_START_S * (2 if case.resume else 1):
        r.status, r.detail = "skipped", BUDGET_SKIP
        return
    by_budget: list[bool] = []
    rc = _launch(ctx, r, cmd, env, out / "logs", by_budget)
    first = []
    if case.resume and rc == 0:
        # an interrupted run: drop the checkpoints after mid-run and continue from there
        first = read_results(r, out, "")
        ckpts = out / "checkpoints"
        for d in ckpts.glob("step-*"):
            if int(d.name.split("-")[1]) > ctx.shapes.steps // 2:
                shutil.rmtree(d)
        # the resumed run rewrites metrics.jsonl from its step on: its rows are the newer ones
        resumed_at = time.time()
        again = [w for w in cmd if w != "--overwrite"] + ["--resume"]
        r.command += "\n" + shown(again)
        rc = _launch(ctx, r, again, env, out / "logs-resumed", by_budget)
    stderr = read_log(out / "logs" / "stderr.log")
    stdout = read_log(out / "logs" / "stdout.log")
    if case.resume and first:
        stderr = read_log(out / "logs-resumed" / "stderr.log")
        train_rows = read_results(r, out, stdout)
        again_rows = [x for x in train_rows if float(x.get("time", 0)) >= resumed_at]
        ref = {int(x["step"]): float(x["loss/total"]) for x in first}
        got = {int(x["step"]): float(x["loss/total"]) for x in again_rows}
        r.losses = [ref[k] for k in sorted(ref)]
    else:
        train_rows = read_results(r, out, stdout)
    if rc is None:
        if by_budget[-1]:
            r.status, r.detail = "skipped", f"{BUDGET_SKIP}: cut after {r.wall:.0f} s"
        else:
            r.status = "timeout"
            r.detail = f"killed after {r.wall:.0f} s (--case-timeout)"
    elif rc != 0:
        line = refusal_line(stderr)
        r.status, r.detail = ("refused", line) if line else (
            "failed", f"exit code {rc}" + (f": {tail(stderr, 1)[0][:200]}" if tail(stderr, 1)
                                            else ""))
    elif len(train_rows) < ctx.shapes.steps:
        r.status = "failed"
        r.detail = f"{len(train_rows)} of {ctx.shapes.steps} steps in metrics.jsonl"
    elif not all(math.isfinite(x) for x in r.losses):
        r.status, r.detail = "failed", "non-finite loss"
    elif case.resume:
        after = sorted(k for k in got if k in ref)
        if not after:
            r.status, r.detail = "failed", "the resumed run logged no step after mid-run"
        else:
            diff = max(abs(got[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in after)
            ok = diff <= RESUME_RTOL
            r.status = "ok" if ok else "failed"
            r.detail = (f"steps {after[0]}-{after[-1]} after the reload: max relative loss "
                        f"difference {diff:.1e} (tolerance {RESUME_RTOL:g})")
    else:
        r.status = "ok"
    if r.failed:
        r.tail = tail(stderr) or tail(stdout)
    # checkpoints are ~1 GB a case at these shapes; the metrics and logs are what is read
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "student", ignore_errors=True)
