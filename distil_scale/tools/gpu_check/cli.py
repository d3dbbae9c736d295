"""``launch/gpu_check.py``'s command line: the parts in order of value (backend cases, the
bench, the ZeRO check) within the budget, each guarded, the report rewritten after each."""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ...errors import UserError, first_line
from .case import run_case
from .inputs import build_teacher, pick_source
from .proc import child_env, prebuild_ops, read_log, run_logged, shown, tail
from .report import Report, device_info
from .spec import (BENCH, BUDGET_SKIP, CASES, DEFAULT_BUDGET_S, GPU, MIN_START_S, REPO, SELF,
                   SMOKE, SMOKE_BUDGET_S, CaseResult, Ctx, Shapes)
from .zero import run_zero_check, zero_child, zero_rows

SKIP_LINE = ("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False); "
             "run it on a GPU machine")


def run_bench(ctx: Ctx, bench_args: tuple[str, ...], say) -> tuple[str, list[str], str]:
    """launch/bench.py with its default rows (the fused and the unfused loss among them),
    through its command line: the check reads only its printed table."""
    cmd = [sys.executable, str(BENCH), *bench_args]
    left = ctx.deadline - time.monotonic()
    if left < MIN_START_S:
        say("gpu_check: bench: skipped (budget)")
        return shown(cmd), [], f"skipped ({BUDGET_SKIP})"
    log = ctx.work / "bench"
    rc, wall = run_logged(cmd, ctx.env, log, left)
    lines = read_log(log / "stdout.log").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("== seq")), None)
    if rc == 0 and start is not None:
        body, status = lines[start:], f"ok, {wall:.0f} s"
    elif rc is None:
        body = tail("\n".join(lines), 20)
        status = f"skipped ({BUDGET_SKIP}: cut after {wall:.0f} s)"
    else:
        body = tail(read_log(log / "stderr.log"), 20) or tail("\n".join(lines), 20)
        status = f"failed: exit code {rc}, {wall:.0f} s"
    say(f"gpu_check: bench: {status}")
    return shown(cmd), body, status


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="launch/gpu_check.py",
        description="On a CUDA machine: train a few steps on every backend (plain, DDP x1, "
                    "FSDP2 x1, DeepSpeed with each shipped profile, the RTX 4070 profile at "
                    "micro-batch 16 under a 12 GiB cap, save-reload-continue, torch.compile) at "
                    "BERT-base/6-layer shapes, compare memory with launch/plan.py, run "
                    "launch/bench.py, check ZeRO-2's gradient accumulation precision, all in "
                    "order of value within --budget, and write one markdown report (rewritten "
                    "after every part). Without CUDA: one line, exit 0.")
    p.add_argument("--out", help="report path (default: docs/gpu-check-<device>-<date>.md); "
                                 "the runs' logs go beside it, in <out without .md>-logs/")
    p.add_argument("--quick", action="store_true", help="bf16 cases only")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the same orchestration on the CPU at tiny shapes (plain, DDP x1, "
                        "DeepSpeed rtx4070.json, save-reload-continue; bf16); for testing this "
                        "script")
    p.add_argument("--cases", default="",
                   help=f"comma list of {','.join(CASES)} (default: the plan, in order of "
                        "value)")
    p.add_argument("--precisions", default="", help="comma list of bf16,fp16 (default: both)")
    p.add_argument("--no-bench", dest="bench", action="store_false",
                   help="skip launch/bench.py")
    p.add_argument("--no-zero", dest="zero", action="store_false",
                   help="skip the ZeRO accumulation check")
    p.add_argument("--case-timeout", type=float, default=150.0,
                   help="seconds per training run (default 150); a run killed by it failed")
    p.add_argument("--budget", type=float,
                   help="seconds for everything; a part that would start with under "
                        f"{MIN_START_S:g} s left, or is cut by it, is reported skipped (budget), "
                        f"not failed (default {DEFAULT_BUDGET_S:g}; {SMOKE_BUDGET_S:g} with "
                        "--cpu-smoke)")
    p.add_argument("--work-dir", help="where the runs and their logs go (default: beside the "
                                      "report)")
    p.add_argument("--zero-child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _pick(value: str, allowed, flag: str) -> tuple[str, ...]:
    picked = tuple(v.strip() for v in value.split(",") if v.strip())
    for v in picked:
        if v not in allowed:
            raise UserError(f"{flag}: unknown '{v}'; choose from {','.join(allowed)}")
    return picked


def plan_for(shapes: Shapes, cases: tuple[str, ...], precisions: tuple[str, ...],
             bench: bool, zero: bool) -> list[str]:
    """The parts to run, in order: the shapes' plan filtered, or the cases asked for (each at
    each precision) followed by the bench and the ZeRO check."""
    plan = list(shapes.plan)
    if cases:
        plan = [f"{c}:{p}" for c in cases for p in precisions or ("bf16", "fp16")]
        plan += [x for x in shapes.plan if ":" not in x]
    elif precisions:
        plan = [x for x in plan if ":" not in x or x.split(":")[1] in precisions]
    return [x for x in plan if (x != "bench" or bench) and (x != "zero" or zero)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.zero_child:
        return zero_child(args.zero_child)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(SKIP_LINE, flush=True)
        return 0
    if args.cpu_smoke:
        # the planner imports DeepSpeed here too; on a CPU its accelerator probe only warns
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.monotonic()
    say = lambda s: print(s, flush=True)  # noqa: E731
    shapes = SMOKE if args.cpu_smoke else GPU
    if args.budget is None:
        args.budget = SMOKE_BUDGET_S if args.cpu_smoke else DEFAULT_BUDGET_S
    cases = _pick(args.cases, CASES, "--cases")
    precisions = (_pick(args.precisions, ("bf16", "fp16"), "--precisions")
                  or (("bf16",) if args.quick or args.cpu_smoke else ()))
    if args.cpu_smoke and "fp16" in precisions:
        raise UserError("--precisions: fp16 needs a CUDA device; use bf16 with --cpu-smoke")
    plan = plan_for(shapes, cases, precisions, args.bench, args.zero)
    info = device_info(args.cpu_smoke)
    out = Path(args.out) if args.out else (
        REPO / "docs" / f"gpu-check-{info['slug']}-{datetime.date.today().isoformat()}.md")
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + "-logs")
    work.mkdir(parents=True, exist_ok=True)
    argv_shown = [os.path.relpath(SELF, Path.cwd()) if SELF.is_relative_to(Path.cwd())
                  else str(SELF), *(argv if argv is not None else sys.argv[1:])]
    rep = Report(out, info, argv_shown, shapes, "", work, args.budget, t0,
                 bench_planned="bench" in plan)
    rep.results = [CaseResult(CASES[x.split(":")[0]], x.split(":")[1]) for x in plan if ":" in x]
    rep.zrows = zero_rows(args.cpu_smoke) if "zero" in plan else []
    say(f"gpu_check: {info['name']}, {info['mem_gib']:.1f} GiB; {len(plan)} parts within "
        f"{args.budget:.0f} s; report {out}, logs in {work}")
    try:
        rep.source = pick_source()
        teacher = build_teacher(work / "teacher", shapes)
        ctx = Ctx(shapes, args.cpu_smoke, work, teacher, rep.source, t0 + args.budget,
                  args.case_timeout, child_env(args.cpu_smoke), info["mem_gib"])
        rep.write()
        if any(r.case.launcher == "deepspeed" for r in rep.results) or "zero" in plan:
            rep.build = prebuild_ops(ctx, say)
            rep.write()
        slot = 0
        for part in plan:
            try:
                if part == "zero":
                    rep.zrows, rep.znote = run_zero_check(ctx, rep.n_micro, say)
                elif part == "bench":
                    rep.bench = run_bench(ctx, shapes.bench_args, say)
                else:
                    slot += 1
                    want = rep.results[slot - 1]
                    rep.results[slot - 1] = run_case(ctx, want.case, want.precision, say)
            except Exception as e:  # guarded like the cases: the next part still runs
                why = first_line(e, 10**6, typed=True)
                say(f"gpu_check: {part}: failed ({why})")
                if part == "bench":
                    rep.bench = ("launch/bench.py", [], f"failed: {why}")
                elif part == "zero":
                    rep.znote = f"the ZeRO check failed: {why}"
            rep.write()
    finally:
        # the random teacher is ~0.5 GB at GPU shapes; the logs and metrics stay
        shutil.rmtree(work / "teacher", ignore_errors=True)
        rep.done = True
        rep.write()
    bad = rep.problems()
    say(f"gpu_check: report {out} ({time.monotonic() - t0:.0f} s); "
        + ("everything ran" if not bad else "FAILED: " + "; ".join(bad)))
    return 1 if bad else 0
