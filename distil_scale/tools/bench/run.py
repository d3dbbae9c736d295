"""One sequence length of the step bench: every configuration built, warmed up and timed in
interleaved rounds, the matmul peak measured around them, the default step profiled by op."""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from ...metrics import datasheet_tflops, matmul_peak_size, measure_matmul_peak
from ...runtime import fused_chunk_rows, resolve_precision
from .common import load_average
from .peak_memory import measure_peak_memory, vocab_loss_memory
from .step import (MEMORY_ROWS, REFERENCE, SHAPES, Runner, Setup, StepStats, Variant,
                   build_teacher, natural_rows, variants)

# -- profile of the default step --------------------------------------------------------------
_CATEGORIES = (  # (category, exact aten names, name prefixes)
    ("matmul", {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_addmm_activation",
                "dot"}, ("mkldnn_", "_mkldnn", "cublas", "gemm")),
    ("casts/copies", {"copy_", "_to_copy", "clone", "contiguous", "to"}, ()),
    ("norm/gelu/dropout", {"native_layer_norm", "native_layer_norm_backward", "gelu",
                           "gelu_backward", "bernoulli_", "native_dropout", "dropout"}, ()),
    ("softmax/loss", {"_softmax", "_log_softmax", "_softmax_backward_data",
                      "_log_softmax_backward_data", "kl_div", "nll_loss", "nll_loss_forward",
                      "nll_loss_backward", "cosine_similarity", "exp", "exp_", "logsumexp",
                      "FusedVocabLoss"}, ()),
    ("optimizer", set(), ("_foreach", "_fused_adam", "optimizer.step", "adam")),
    ("indexing", {"index", "index_put_", "_index_put_impl_", "nonzero", "masked_select",
                  "index_select", "embedding_dense_backward", "gather", "scatter_",
                  "masked_fill_", "embedding", "index_add_"}, ()),
    ("elementwise", {"mul", "mul_", "add", "add_", "div", "div_", "sub", "sub_", "neg", "sqrt",
                     "sum", "fill_", "zero_", "mean", "where", "rsub", "pow", "tanh"}, ()),
)


def _category(key: str) -> str:
    name = key.lower().removeprefix("aten::")
    for cat, exact, prefixes in _CATEGORIES:
        if name in exact or key in exact or name.startswith(prefixes):
            return cat
    return "other"


def profile_breakdown(runner: Runner) -> tuple[dict[str, float], float]:
    """Self time of one step of ``runner`` by op category: (shares, profiled seconds)."""
    cuda = runner.dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        runner.step()
        runner.sync()
    shares: dict[str, float] = {}
    for e in prof.key_averages():
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t > 0:
            cat = _category(e.key)
            shares[cat] = shares.get(cat, 0.0) + t
    total = sum(shares.values())
    return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}, total / 1e6


# -- the run ----------------------------------------------------------------------------------
@dataclass
class Result:
    v: Variant
    dtype: str
    stats: list[StepStats]
    peak: float  # FLOP/s of the dtype: measured matmul
    mem_gib: float  # peak above the libraries' baseline (CPU) / max_memory_allocated (CUDA)
    datasheet: float = math.nan  # FLOP/s of the dtype from the device's datasheet (CUDA)
    hwm_gib: float = math.nan  # CPU: the process's whole VmHWM, libraries included

    def _med(self, f):
        return statistics.median(f(s) for s in self.stats)

    @property
    def tokens_s(self):
        return self._med(lambda s: s.tokens / s.seconds)

    @property
    def seqs_s(self):
        return self._med(lambda s: s.sequences / s.seconds)

    @property
    def step_s(self):
        return self._med(lambda s: s.seconds)

    @property
    def flops_s(self):
        return self._med(lambda s: s.flops / s.seconds)

    @property
    def mfu(self):
        return self.flops_s / self.peak

    @property
    def mfu_datasheet(self):
        return self.flops_s / self.datasheet

    @property
    def faults(self):
        return self._med(lambda s: s.faults)

    @property
    def wait_pct(self):
        return 100.0 * sum(s.wait for s in self.stats) / sum(s.seconds for s in self.stats)

    @property
    def real_pct(self):
        return 100.0 * sum(s.tokens for s in self.stats) / sum(s.padded for s in self.stats)

    def as_dict(self) -> dict:
        return {"name": self.v.name, "switch": self.v.toggle, "variant": asdict(self.v),
                "dtype": self.dtype, "tokens_s": self.tokens_s, "seqs_s": self.seqs_s,
                "step_s": self.step_s, "mfu": self.mfu, "mfu_datasheet": self.mfu_datasheet,
                "peak_flops_measured": self.peak, "peak_flops_datasheet": self.datasheet,
                "peak_gib": self.mem_gib, "hwm_gib": self.hwm_gib,
                "page_faults_per_step": self.faults, "wait_pct": self.wait_pct,
                "real_pct": self.real_pct}


def run_blocks(runners: list[Runner], steps: int, warmup: int, block: int,
               say) -> list[list[StepStats]]:
    """Warm-up, then rounds of ``block`` steps per configuration, ABAB... order."""
    for r in runners:
        for _ in range(warmup):
            r.step()
        r.sync()
    out: list[list[StepStats]] = [[] for _ in runners]
    rounds = math.ceil(steps / block)
    for k in range(rounds):
        for i, r in enumerate(runners):
            t0 = time.perf_counter()
            got = [r.step() for _ in range(block)]
            r.sync()
            if r.dev.type == "cuda":  # per-step times are only meaningful over a synced block
                per = (time.perf_counter() - t0) / block
                for s in got:
                    s.seconds = per
            out[i].extend(got)
        say(f"  round {k + 1}/{rounds} done")
    return out



def peak_sizes(device: torch.device) -> tuple[int, ...]:
    """The square matmuls MFU's denominator is the best of (each before and after the timed
    rounds). One 2048^3 bf16 product read 665 GFLOP/s on 2026-12-02 and 394 on 2026-12-06 with
    the step unchanged; more sizes and samples make a low reading, which inflates MFU, less
    likely. On 2026-12-06 the sizes agreed to 10 % (bf16 365-411, fp32 171-188)."""
    return (matmul_peak_size(device),) if device.type == "cuda" else (1024, 2048, 4096)


def best_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    return max(measure_matmul_peak(device, dtype, n, 0.5) for n in peak_sizes(device))


def bench_one_seq(args, tokenizer, seq: int, say) -> dict:
    sh = SHAPES[args.shapes]
    device = torch.device(args.device)
    steps = args.steps or sh["steps"]
    warmup = sh["warmup"] if args.warmup is None else args.warmup
    block = args.block or (1 if device.type == "cpu" else 5)
    steps = block * math.ceil(steps / block)
    setup = Setup(args.shapes, device, seq, sh["micro"], sh["student_layers"], args.source,
                  tokenizer, seed=args.seed)
    vs = variants(device, args.compile)
    if args.only:
        keep = set(args.only.split(";"))  # row names hold commas
        vs = [v for v in vs if v.name in keep or v.name in (REFERENCE, "default")]
    # the natural rows are tokenized once here and shared (the forked children inherit them)
    setup.rows = natural_rows(setup, setup.micro * (warmup + steps + 2))
    say(f"seq {seq}: {len(vs)} configurations x ({warmup} warm-up + {steps} timed steps), "
        f"micro batch {setup.micro}, device {device}")

    t0 = time.perf_counter()
    load0 = load_average()
    # memory rows: "some" = the headline pair, the unfused loss and the masked-only objective
    mem_vs = {"none": [], "all": vs,
              "some": [v for v in vs if v.name in MEMORY_ROWS]}[args.memory]
    mem = {v.name: (float("nan"), float("nan")) for v in vs}
    if mem_vs:
        mem.update(measure_peak_memory(setup, mem_vs, 2))
        say(f"  peak memory: {len(mem_vs)} configurations, each alone "
            f"({'forked child, VmHWM above its start' if device.type == 'cpu' else 'max_memory_allocated'}), "
            f"{time.perf_counter() - t0:.0f}s")

    base_teacher = build_teacher(setup)
    runners = [Runner(setup, v, base_teacher, warmup + steps) for v in vs]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    need = sorted({r.precision for r in runners})
    peaks = {p: best_matmul_peak(device, dtypes[p]) for p in need}
    t1 = time.perf_counter()
    stats = run_blocks(runners, steps, warmup, block, say)
    for p in need:  # before and after: noise from other work on the machine only lowers it
        peaks[p] = max(peaks[p], best_matmul_peak(device, dtypes[p]))
    say(f"  timed rounds: {time.perf_counter() - t1:.0f}s; matmul peak "
        + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in need))
    sheet = {p: datasheet_tflops(device, dtypes[p]) * 1e12 for p in need}
    results = [Result(r.v, r.precision, s, peaks[r.precision], mem[r.v.name][0],
                      sheet[r.precision], mem[r.v.name][1]) for r, s in zip(runners, stats)]
    load1 = load_average()
    prof = None
    default_runner = runners[[v.name for v in vs].index("default")]
    if args.profile:
        prof = profile_breakdown(default_runner)
    s_conf = default_runner.sconf
    for r in runners:
        r.close()
    del runners
    gc.collect()
    loss_mem = None
    if args.loss_rows:
        t2 = time.perf_counter()
        dt = dtypes.get(resolve_precision("auto", device)) if device.type == "cuda" else None
        # the chunk a GPU run takes (the paper's micro-batch is a GPU's), whatever this device
        chunk = fused_chunk_rows(0, torch.device("cuda"))
        loss_mem = vocab_loss_memory(args.loss_rows, s_conf.dim, s_conf.vocab_size, chunk,
                                     device, dt)
        loss_mem.update(rows=args.loss_rows, dim=s_conf.dim, vocab=s_conf.vocab_size,
                        chunk=chunk, seconds=time.perf_counter() - t2)
    return {"seq": seq, "results": results, "profile": prof, "setup": setup,
            "load": (load0, load1), "loss_memory": loss_mem}

