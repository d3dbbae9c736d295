"""The ZeRO-2 gradient accumulation check: DeepSpeed's accumulated gradient under each shipped
profile's sections against the fp64 sum of the same micro-gradients, run in a child process of
its own (``--zero-child``), one result line per row."""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from ...distributed import ensure_process_group
from ...errors import first_line
from .proc import read_log, run_logged, tail
from .spec import BUDGET_SKIP, MIN_START_S, PROFILES, REPO, SELF, Ctx

ZERO_ROW = "gpu_check zero row: "  # prefix of the child's result lines (DeepSpeed logs to stdout)


def zero_grad_accum_error(ds_sections: dict, precision: str, device, n_micro: int = 64) -> float:
    """Relative error of the gradient DeepSpeed ZeRO accumulates over ``n_micro`` micro-batches,
    against the fp64 sum of the same half-precision micro-gradients.

    ``ds_sections``: the profile's ``zero_optimization`` and ``data_types`` (and optionally its
    ``fp16`` loss-scale settings); ``precision``: bf16 | fp16 (DeepSpeed refuses fp16 on CPU).
    A torch SGD(lr=1) client optimizer without clipping makes the fp32 master weights' change
    equal the accumulated gradient. DeepSpeed's fp32 master starts from the half-rounded
    weights, so the reference start is ``p.to(half).double()``. Sets up a world of one (gloo on
    CPU) when no process group exists: call it in a process of its own.
    """
    device = torch.device(device)
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision: '{precision}' is not bf16 or fp16; pass one of them")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision: fp16 needs a CUDA device (DeepSpeed refuses fp16 on CPU); "
                         "use bf16")
    ensure_process_group(device, deepspeed=True)
    # here, not at the top: only the child process that runs this needs DeepSpeed, and importing
    # it probes the accelerator (seconds, and log lines) in every process that loads the check
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    half = torch.bfloat16 if precision == "bf16" else torch.float16
    sections = copy.deepcopy(ds_sections)
    mixed = {**(sections.get(precision) or {}), "enabled": True}
    for h in ("bf16", "fp16"):
        sections.pop(h, None)
    # fp16 micro-gradients are taken at DeepSpeed's loss scale (its first step's, 2^16 by
    # default, or a static one); unscaled they would fall into fp16's subnormals
    scale = 1.0
    if precision == "fp16":
        scale = float(mixed.get("loss_scale", 0)) or 2.0 ** int(
            mixed.get("initial_scale_power", 16))

    D, micro = 512, 8
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh(), torch.nn.Linear(D, 1))
    xs = [torch.randn(micro, D).to(device=device, dtype=half) for _ in range(n_micro)]
    ref = copy.deepcopy(model).to(device=device, dtype=half)
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in ref.parameters()]
    for x in xs:
        ref.zero_grad(set_to_none=True)
        (ref(x).float().pow(2).mean() / n_micro * scale).backward()
        for a, p in zip(acc, ref.parameters()):
            a += p.grad.double()
    acc = [a / scale for a in acc]
    w0 = [p.detach().to(device=device, dtype=half).double() for p in model.parameters()]

    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": n_micro,
           precision: mixed, **sections, "gradient_clipping": 0.0,
           # the torch SGD, not DeepSpeedCPUAdam, even where the profile offloads the optimizer
           "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
           "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(
        model.parameters(), lr=1.0), config=cfg)
    for x in xs:
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    num = den = moved = 0.0
    for p, w, a in zip(engine.module.parameters(), w0, acc):
        g = w - safe_get_full_fp32_param(p).to(device).double()
        num += float((g - a).pow(2).sum())
        den += float(a.pow(2).sum())
        moved += float(g.abs().sum())
    if moved == 0.0:
        raise RuntimeError("DeepSpeed skipped the update (an fp16 overflow at the first loss "
                           "scale?); the accumulated gradient cannot be compared")
    return math.sqrt(num / den)


def zero_rows(cpu: bool) -> list[dict]:
    """Each shipped profile's sections as shipped and without ``data_types`` (DeepSpeed's
    default: accumulate in the model's dtype), so the report shows what the setting buys."""
    rows = []
    for profile in PROFILES:
        ds = json.loads((REPO / "ds_configs" / f"{profile}.json").read_text())
        shipped = {k: ds[k] for k in ("zero_optimization", "data_types", "bf16", "fp16")
                   if k in ds}
        bare = {k: v for k, v in shipped.items() if k != "data_types"}
        for precision in ("bf16", "fp16"):
            for variant, sections in (("as shipped", shipped), ("without data_types", bare)):
                rows.append({"profile": profile, "precision": precision, "variant": variant,
                             "accum": (sections.get("data_types") or {}).get(
                                 "grad_accum_dtype", f"{precision} (default)"),
                             "sections": sections,
                             "skip": "DeepSpeed refuses fp16 on CPU"
                             if cpu and precision == "fp16" else ""})
    return rows


def zero_child(spec_path: str) -> int:
    """Runs the rows of a spec file in this process, one result line each."""
    spec = json.loads(Path(spec_path).read_text())
    for row in spec["rows"]:
        out = {k: row[k] for k in ("profile", "precision", "variant")}
        try:
            out["error"] = zero_grad_accum_error(row["sections"], row["precision"],
                                                 spec["device"], spec["n_micro"])
        except Exception as e:  # one row's failure is a result, the others still run
            out["failure"] = first_line(e, 10**6, typed=True)
        print(ZERO_ROW + json.dumps(out), flush=True)
    return 0


def run_zero_check(ctx: Ctx, n_micro: int, say) -> tuple[list[dict], str]:
    rows = zero_rows(ctx.cpu)
    todo = [r for r in rows if not r["skip"]]
    spec = ctx.work / "zero-spec.json"
    spec.write_text(json.dumps({"rows": todo, "n_micro": n_micro,
                                "device": "cpu" if ctx.cpu else "cuda"}))
    left = ctx.deadline - time.monotonic()
    if left < MIN_START_S:
        for r in todo:
            r["skip"] = BUDGET_SKIP
        say("gpu_check: ZeRO accumulation check: skipped (budget)")
        return rows, ""
    log = ctx.work / "zero-check"
    rc, wall = run_logged([sys.executable, str(SELF), "--zero-child", str(spec)], ctx.env, log,
                          min(300.0, left))
    got = {}
    for ln in read_log(log / "stdout.log").splitlines():
        if ln.startswith(ZERO_ROW):
            d = json.loads(ln[len(ZERO_ROW):])
            got[(d["profile"], d["precision"], d["variant"])] = d
    for r in rows:
        d = got.get((r["profile"], r["precision"], r["variant"]))
        if d is not None:
            r.update(error=d.get("error"), failure=d.get("failure", ""))
        elif rc is None and left < 300.0 and not r["skip"]:
            r["skip"] = BUDGET_SKIP + ": cut"
    note = "" if rc == 0 else (
        f"the check process {'timed out' if rc is None else f'exited {rc}'}: "
        + " / ".join(tail(read_log(log / "stderr.log"), 3)))
    say(f"gpu_check: ZeRO accumulation check: {len(got)} of {len(todo)} rows, {wall:.0f} s")
    return rows, note
