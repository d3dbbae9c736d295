"""The step bench's table, the verdicts under it (which switches pay here, the CPU goals) and
its JSON; the headline ratios against the grouped reference."""
from __future__ import annotations

import json
import math
import os

import torch

from .common import page_setting
from .run import Result, peak_sizes
from .step import REFERENCE

# CPU goals at demo shapes: default/reference tokens/s, peak memory ratio, MFU
GOALS = {"tokens/s": 6.0, "peak memory": 0.35, "MFU": 0.40, "data-wait": 5.0}


def fmt_table(results: list[Result], default: Result, cuda: bool) -> list[str]:
    mfu_cols = f"{'MFU meas':>8} {'MFU spec':>8}" if cuda else f"{'MFU':>6}"
    # page faults are host memory: a CUDA step's tensors never fault
    fault_col = "" if cuda else f" {'pgflt k':>7}"
    head = (f"{'configuration':<30} {'switch measured':<25} {'dtype':>5} {'tok/s':>8} "
            f"{'seq/s':>7} {'step s':>7} {mfu_cols} {'peak GiB':>8}{fault_col} {'wait%':>6} "
            f"{'real%':>6} {'vs default':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        mem = f"{r.mem_gib:8.2f}" if not math.isnan(r.mem_gib) else f"{'n/a':>8}"
        mfu = f"{r.mfu:8.1%} {r.mfu_datasheet:8.1%}" if cuda else f"{r.mfu:6.1%}"
        faults = "" if cuda else f" {r.faults / 1e3:7.1f}"
        lines.append(f"{r.v.name:<30} {r.v.toggle or '-':<25} {r.dtype:>5} {r.tokens_s:8.0f} "
                     f"{r.seqs_s:7.2f} {r.step_s:7.3f} {mfu} {mem}{faults} {r.wait_pct:6.1f} "
                     f"{r.real_pct:6.1f} {r.tokens_s / default.tokens_s:10.2f}")
    return lines



def headline(res: dict) -> tuple[float, float, Result, Result]:
    by = {r.v.name: r for r in res["results"]}
    ref, default = by[REFERENCE], by["default"]
    return default.tokens_s / ref.tokens_s, default.mem_gib / ref.mem_gib, default, ref


def report(res: dict, device: torch.device, say) -> str:
    results = res["results"]
    cuda = device.type == "cuda"
    tok_ratio, mem_ratio, default, ref = headline(res)
    for line in fmt_table(results, default, cuda):
        say(line)
    say("")
    if cuda:
        say(f"  MFU meas: against the matmul measured here ({default.peak / 1e12:.0f} TFLOP/s "
            f"{default.dtype}); MFU spec: against the datasheet "
            f"({default.datasheet / 1e12:.0f} TFLOP/s dense {default.dtype}, "
            f"{torch.cuda.get_device_name(device)})")
    else:
        sizes = ", ".join(f"{n}^2" for n in peak_sizes(device))
        say(f"  MFU: against the best of {sizes} matmuls measured here in the row's dtype "
            f"({default.dtype} {default.peak / 1e9:.0f} GFLOP/s); a CPU has no datasheet "
            "figure to divide by")
        say(f"  peak GiB: the process's high-water mark above its start (the libraries), like "
            f"CUDA's max_memory_allocated; whole VmHWM default {default.hwm_gib:.2f}, "
            f"reference {ref.hwm_gib:.2f} GiB ({default.hwm_gib / ref.hwm_gib:.2f}x)")
        pages = page_setting()
        say(f"  pgflt k: minor page faults per step, in thousands (the whole process's): each a "
            f"fresh page touched for the first time, zeroed by the kernel. Pages here: "
            f"THP_MEM_ALLOC_ENABLE={pages['THP_MEM_ALLOC_ENABLE']}, kernel THP "
            f"{pages['kernel_thp']}, glibc malloc "
            f"{' '.join(f'{k}={v}' for k, v in pages['glibc_malloc'].items()) or 'default'}; "
            "the reference's fp32 (N, V) tensors fault most, so its time and the ratio depend "
            "on them (docs/performance.md)")
    # which switches pay on this device: an ablation row faster than the default means the
    # default should flip here
    for r in results:
        if r.v.toggle and not r.v.compile:
            gain = default.tokens_s / r.tokens_s
            verdict = "pays" if gain >= 1.02 else ("costs" if gain < 0.98 else "neutral")
            say(f"  {r.v.toggle:<29} default/without = {gain:5.2f}x tokens/s  ({verdict})")
        elif r.v.compile:
            say(f"  {r.v.toggle:<29} with/without = {r.tokens_s / default.tokens_s:5.2f}x "
                "tokens/s (train.compile; compile time not included)")
    lm = res.get("loss_memory")
    if lm:
        say(f"  vocabulary loss alone, forward + backward, N={lm['rows']} rows, V={lm['vocab']},"
            f" D={lm['dim']} (peak live tensors): naive {lm['naive']:.2f} GiB, fused "
            f"{lm['fused']:.3f} GiB ({lm['naive'] / lm['fused']:.1f}x less; chunks of "
            f"{lm['chunk']} rows; {lm['seconds']:.0f}s)")
    if device.type == "cpu":
        say("")
        say(f"goals (CPU, demo shapes): default/reference tokens/s >= {GOALS['tokens/s']}, "
            f"peak memory <= {GOALS['peak memory']}x, MFU >= {GOALS['MFU']:.0%} of the dtype's "
            f"measured peak, data-wait < {GOALS['data-wait']:g}%")
        checks = [("tokens/s", tok_ratio >= GOALS["tokens/s"], f"{tok_ratio:.2f}x"),
                  ("peak memory", mem_ratio <= GOALS["peak memory"], f"{mem_ratio:.2f}x"),
                  ("MFU", default.mfu >= GOALS["MFU"],
                   f"{default.mfu:.1%} of {default.dtype} peak {default.peak / 1e9:.0f} "
                   "GFLOP/s"),
                  ("data-wait", default.wait_pct < GOALS["data-wait"],
                   f"{default.wait_pct:.1f}%")]
        for name, ok, val in checks:
            say(f"  {name:<12} {val:<40} {'met' if ok else 'MISSED'}")
        # the same FLOPs per token in both (same objective, ~99 % real tokens in the grouped
        # reference), so tokens/s scales with MFU: the ceiling the goal sits under
        say(f"  at 100 % MFU the default would run {tok_ratio / default.mfu:.1f}x the reference; "
            f"{GOALS['tokens/s']:g}x needs {GOALS['tokens/s'] * default.mfu / tok_ratio:.0%} "
            f"MFU at this peak")
    if res["profile"] is not None:
        shares, total = res["profile"]
        say(f"  default step by op (one profiled step, {total:.2f}s of op time): "
            + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    load = res.get("load")
    if load is not None and device.type == "cpu":
        say(f"  machine load (1-min average) {load[0]:.1f} -> {load[1]:.1f} on "
            f"{os.cpu_count()} cores during this run (above ~{os.cpu_count()} the timings are "
            "slowed by other work; ratios measured in one interleaved run stay comparable)")
    return (f"default/reference tokens/s: {tok_ratio:.2f}  peak-mem: {mem_ratio:.2f}  "
            f"MFU: {default.mfu * 100:.1f}%  (reference grouped by length)")


def write_json(path: str, outs: list[dict], args, device: torch.device) -> None:
    """The measurements as data (what tests and the GPU check read, not the table)."""
    doc = {"shapes": args.shapes, "device": str(device), "torch": torch.__version__,
           "threads": torch.get_num_threads(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
           "pages": page_setting(), "seqs": []}
    for res in outs:
        tok_ratio, mem_ratio, default, _ = headline(res)
        doc["seqs"].append({
            "seq": res["seq"], "micro": res["setup"].micro,
            "rows": [r.as_dict() for r in res["results"]],
            "headline": {"tokens_s_ratio": tok_ratio, "peak_mem_ratio": mem_ratio,
                         "mfu": default.mfu, "reference": REFERENCE},
            "loss_memory": res["loss_memory"],
            "profile": res["profile"][0] if res["profile"] else None,
            "load": list(res["load"])})
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)

