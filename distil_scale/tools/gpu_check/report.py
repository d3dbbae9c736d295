"""The check's markdown report: the device and versions, the backends table (beside the
planner's memory), the ZeRO table, the bench's table, and the verdict; rewritten whole after
every part."""
from __future__ import annotations

import datetime
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from ...fsio import atomic_write
from ...metrics import datasheet_entry
from ..plan import RESERVE_GIB
from .spec import CaseResult, Shapes


def problems(results: list[CaseResult], zrows: list[dict],
             bench: tuple[str, list[str], str] | None, build: str = "") -> list[str]:
    """What went wrong, one item each; a budget skip is not a failure, an error is."""
    out = [f"{r.case.label} {r.precision} {r.status}" for r in results if r.failed]
    out += [f"ZeRO check {r['profile']} {r['precision']} {r['variant']}" for r in zrows
            if not r["skip"] and "failure" in r and r.get("error") is None]
    if bench is not None and bench[2].startswith("failed"):
        out.append(f"bench {bench[2]}")
    if "failed" in build:
        out.append(build)
    return out


def device_info(cpu: bool) -> dict:
    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    info = {"torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "deepspeed": version("deepspeed"), "transformers": version("transformers"),
            "datasheet_tflops": math.nan, "datasheet_what": ""}
    if cpu:
        info["name"] = f"CPU smoke run ({platform.processor() or platform.machine()}, " \
                       f"{os.cpu_count()} cores)"
        info["slug"] = "cpu-smoke"
        info["mem_gib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    else:
        props = torch.cuda.get_device_properties(0)
        info["name"] = torch.cuda.get_device_name(0)
        info["slug"] = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
        info["mem_gib"] = props.total_memory / 2 ** 30
        info["capability"] = f"{props.major}.{props.minor}"
        info["arch_list"] = " ".join(torch.cuda.get_arch_list())
        entry = datasheet_entry(info["name"])
        if entry is not None:
            name, tflops = entry
            info["datasheet_tflops"] = tflops
            info["datasheet_what"] = f"{tflops:g} TFLOP/s (datasheet, {name}, dense)"
    return info


def _num(x: float, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pct(x: float) -> str:
    return _num(x * 100, ".1f") + ("%" if x == x else "")


def case_table(results: list[CaseResult], datasheet_tflops: float = math.nan) -> list[str]:
    head = ["case", "precision", "status", "exit", "s/step", "tokens/s", "MFU (measured peak)",
            "MFU (datasheet)", "peak GiB", "reserved GiB", "planned GiB",
            f"peak / (planned − {RESERVE_GIB:g})", "data wait", "loss scale", "skipped steps",
            "final loss", "losses finite", "wall s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ran = r.status not in ("skipped", "pending") or r.wall > 0
        ratio = (r.peak_gib / (r.planned_gib - RESERVE_GIB)
                 if r.planned_gib - RESERVE_GIB > 0 else math.nan)
        status = r.status + (f": {r.detail}" if r.detail else "")
        if r.status == "refused" and not r.failed:
            status += " (expected)"
        sheet = r.mfu * r.peak_tflops / datasheet_tflops
        cells = [r.case.label, r.precision, status.replace("|", "\\|"),
                 "—" if r.rc is None else str(r.rc), _num(r.step_s, ".3f"),
                 _num(r.tokens_s, ",.0f"), _pct(r.mfu), _pct(sheet),
                 _num(r.peak_gib, ".2f"), _num(r.reserved_gib, ".2f"),
                 _num(r.planned_gib, ".2f"), _num(ratio, ".2f"),
                 _num(r.data_wait_pct, ".1f") + ("%" if r.data_wait_pct == r.data_wait_pct
                                                 else ""),
                 _num(r.loss_scale, ".0f"),
                 "—" if r.skipped_steps is None else str(r.skipped_steps),
                 _num(r.losses[-1] if r.losses else math.nan, ".4f"),
                 ("yes" if all(math.isfinite(x) for x in r.losses) else "NO")
                 if r.losses else "—", f"{r.wall:.0f}" if ran else "—"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def zero_table(rows: list[dict]) -> list[str]:
    out = ["| profile | precision | sections | grad_accum_dtype | relative error | verdict |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        err = r.get("error")
        if r["skip"]:
            res, verdict = "—", f"skipped: {r['skip']}"
        elif err is not None:
            res = f"{err:.2e}"
            verdict = "fp32-exact (< 1e-4)" if err < 1e-4 else "lossy (>= 1e-4)"
        elif "failure" in r:
            res, verdict = "—", f"failed: {r.get('failure') or 'no result'}"
        else:
            res, verdict = "—", "pending"
        out.append(f"| {r['profile']}.json | {r['precision']} | {r['variant']} | {r['accum']} "
                   f"| {res} | {verdict.replace('|', '/')} |")
    return out


@dataclass
class Report:
    """What the check has so far; written out after every part."""

    path: Path
    info: dict
    argv: list[str]
    shapes: Shapes
    source: str
    logs: Path
    budget: float
    t0: float
    results: list[CaseResult] = field(default_factory=list)
    zrows: list[dict] = field(default_factory=list)
    znote: str = ""
    n_micro: int = 64
    bench: tuple[str, list[str], str] | None = None
    bench_planned: bool = True
    build: str = ""
    done: bool = False

    def problems(self) -> list[str]:
        return problems(self.results, self.zrows, self.bench, self.build)

    def write(self) -> None:
        write_report(self)


def _peak_line(rep: Report) -> str:
    measured = sorted({r.peak_tflops for r in rep.results if r.peak_tflops == r.peak_tflops})
    got = (f"{measured[0]:.3g}" if len(measured) == 1 else
           f"{measured[0]:.3g}-{measured[-1]:.3g}") if measured else "—"
    sheet = rep.info["datasheet_what"] or "none known for this device (add it to " \
                                          "metrics.DATASHEET_16BIT_TFLOPS)"
    return (f"- MFU peak: measured by each run ({got} TFLOP/s: a matmul in the run's dtype, "
            f"8192^3 on a GPU, `metrics.measure_matmul_peak`); datasheet {sheet}")


def write_report(rep: Report) -> None:
    info, shapes, results = rep.info, rep.shapes, rep.results
    bad = rep.problems()
    cpu = info["slug"] == "cpu-smoke"
    wall = time.monotonic() - rep.t0
    peak_what = ("here the process's RSS high-water mark, not comparable with a GPU plan"
                 if cpu else "torch.cuda.max_memory_allocated")
    verdict = ("FAILED: " + "; ".join(bad) if bad else
               "everything ran (refusals marked expected are the code's own guards; "
               "skipped (budget) means the time budget had no room for it)")
    if not rep.done:
        verdict = "IN PROGRESS (the report is rewritten after every part); so far: " + verdict
    lines = [
        f"# GPU check: {info['name']}, {datetime.date.today().isoformat()}", "",
        f"- command: `{shlex.join(['python', *rep.argv])}` ({wall:.0f} s of a "
        f"{rep.budget:.0f} s budget)",
        f"- device: {info['name']}, {info['mem_gib']:.1f} GiB"
        + (f", compute capability {info['capability']}" if "capability" in info else "")
        + (f"; this torch has kernels for {info['arch_list']}" if info.get("arch_list") else ""),
        f"- versions: torch {info['torch']}, CUDA {info['cuda']}, DeepSpeed {info['deepspeed']}, "
        f"transformers {info['transformers']}, Python {sys.version.split()[0]}",
        f"- shapes: {shapes.name}; seq {shapes.seq}, micro batch {shapes.micro} (unless the case "
        f"says otherwise) x accumulation 2, {shapes.steps} steps, configs/paper.yaml otherwise; "
        f"data {rep.source}",
        "- process groups: DDP x1 and FSDP2 x1 run in a one-rank "
        + ("gloo" if cpu else "NCCL") + " group (torchrun --standalone); DeepSpeed's own "
        "launcher starts the DeepSpeed cases",
        _peak_line(rep),
        f"- {rep.build or 'DeepSpeed CPU ops: not needed (no DeepSpeed case)'}",
        f"- logs: `{rep.logs}` (each run's stdout.log, stderr.log, metrics.jsonl)",
        "- verdict: " + verdict,
        "", "## Backends", "",
        "s/step and tokens/s are the last step's (`perf/*` in metrics.jsonl, every step logged); "
        "MFU is against the peak the run measured and against the datasheet; data wait is the "
        "mean `perf/data_wait_pct` of the steps after the first; peak GiB is `mem/peak_gib` "
        f"({peak_what}), reserved GiB `torch.cuda.max_memory_reserved`; planned GiB is "
        "`distil_scale.tools.plan.make_plan` for the same config, profile and world size, whose "
        "total includes an assumed 1 GiB for the CUDA context and allocator reserve that "
        "max_memory_allocated does not see, hence the ratio's denominator. The torch backends "
        "are planned as ZeRO-0 at the same precision: the planner models DeepSpeed's mixed "
        "precision (half weights + fp32 master), about 6 B/parameter more than torch AMP's "
        "fp32 weights, gradients and AdamW moments. Loss scale and skipped steps are the fp16 "
        "runs' last `optim/loss_scale` and `optim/skipped_steps`. The 12 GiB cap is "
        "`torch.cuda.set_per_process_memory_fraction`. The save-reload-continue case saves at "
        "mid-run, drops the later checkpoints, resumes and compares the resumed steps' losses "
        "with the uninterrupted run's.", "",
        *case_table(results, info["datasheet_tflops"]), "",
    ]
    for r in results:
        if r.tail:
            lines += [f"<details><summary>{r.case.label} {r.precision}: last stderr lines"
                      "</summary>", "", "```", *r.tail, "```", "</details>", ""]
    lines += ["<details><summary>commands</summary>", "", "```",
              *[r.command for r in results if r.command], "```", "</details>", "",
              "## ZeRO-2 gradient accumulation precision", "",
              f"A 512-512-1 MLP, {rep.n_micro} micro-batches of 8 accumulated by DeepSpeed under "
              "each profile's `zero_optimization` and `data_types` sections (world of one), a "
              "torch SGD(lr=1) client optimizer without clipping, so the fp32 master weights' "
              "change is the accumulated gradient; relative error against the fp64 sum of the "
              "same half-precision micro-gradients.", "", *zero_table(rep.zrows), ""]
    if rep.znote:
        lines += [rep.znote, ""]
    lines += ["## Bench", ""]
    if not rep.bench_planned:
        lines += ["not run (--no-bench)", ""]
    elif rep.bench is None:
        lines += ["pending", ""]
    else:
        cmd, body, status = rep.bench
        lines += [f"`{cmd}`: {status}", "", "```", *body, "```", ""]
    rep.path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(rep.path, "\n".join(lines))  # a reader (or a kill) never sees half a report
