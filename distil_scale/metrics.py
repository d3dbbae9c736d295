"""Metrics: TensorBoard scalars and metrics.jsonl under the same stable names, a console line,
and the FLOP count behind MFU."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .families import family_of


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tb"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values})
                         + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()


def console_line(step: int, max_steps: int, v: dict[str, float]) -> str:
    parts = [f"step {step:>6}/{max_steps}"]
    for key, label, fmt in (("loss/total", "loss", ".4f"), ("loss/ce", "kl", ".4f"),
                            ("loss/mlm", "mlm", ".4f"), ("loss/cos", "cos", ".4f"),
                            ("loss/attn_rel", "rel", ".4f"), ("loss/hidden_mse", "hmse", ".4f"),
                            ("optim/lr", "lr", ".2e"), ("optim/grad_norm", "gnorm", ".2f"),
                            ("perf/tokens_per_s", "tok/s", ".0f"), ("perf/mfu", "mfu", ".1%"),
                            ("perf/data_wait_pct", "wait", ".1f"), ("mem/peak_gib", "mem", ".2f")):
        # the optional terms only when their weight is on (an off term logs 0)
        if key in v and (v[key] or key not in ("loss/attn_rel", "loss/hidden_mse")):
            suffix = "%" if key == "perf/data_wait_pct" else ("G" if key == "mem/peak_gib" else "")
            parts.append(f"{label} {v[key]:{fmt}}{suffix}")
    return "  ".join(parts)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def encoder_flops_per_token(n_layers: int, d: int, ffn: int, seq_len: int) -> float:
    """Forward FLOPs per token of a BERT-style encoder: 2 x weight matmuls + attention."""
    weights = n_layers * (4 * d * d + 2 * d * ffn)
    attention = n_layers * 2 * seq_len * d  # QK^T and AV, per token
    return 2.0 * (weights + attention)


def head_flops_per_position(d: int, vocab: int) -> float:
    return 2.0 * (d * d + d * vocab)


def distill_flops_per_token(tconf, sconf, seq_len: int, head_fraction: float) -> float:
    """Teacher forward + student forward/backward (3x forward), vocabulary head only at the
    fraction of positions where it is computed."""
    def model(c) -> float:
        return (encoder_flops_per_token(c.num_hidden_layers, c.hidden_size,
                                        family_of(c).ffn_size(c), seq_len)
                + head_fraction * head_flops_per_position(c.hidden_size, c.vocab_size))

    return model(tconf) + 3.0 * model(sconf)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None,
                        seconds: float = 0.5) -> float:
    """Achieved matmul FLOP/s on this device and dtype: the denominator of MFU.

    The operands come from a private generator: a run resumed from a checkpoint must not have
    drawn from the global generators before its first step. On a GPU the matmul is 8192^3: a
    1024^3 one is launch-bound on an H100 and would understate the peak (inflating MFU); on a
    CPU 2048^3 reaches the BLAS peak.
    """
    n = n or matmul_peak_size(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, iters = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    sync()
    return 2.0 * n**3 * iters / (time.perf_counter() - t0)


# Dense (no sparsity) tensor-core TFLOP/s of the 16-bit formats (bf16; fp16 on a V100), from the
# vendors' datasheets, matched in this order as a substring of torch.cuda.get_device_name (so
# "L40S" before "L4", "H100 NVL" before "H100"); fp32 rows have no tensor-core figure here.
DATASHEET_16BIT_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
                          ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0),
                          ("A10", 125.0), ("V100", 125.0), ("RTX 4090", 165.0))


def datasheet_entry(device_name: str) -> tuple[str, float] | None:
    """(the table's key, dense 16-bit TFLOP/s) of the first row whose key the device's name
    holds (case aside), or None."""
    name = device_name.lower()
    return next(((key, tf) for key, tf in DATASHEET_16BIT_TFLOPS if key.lower() in name), None)


def datasheet_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The datasheet peak for ``dtype`` on ``device``, or NaN where none is known (CPUs)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return math.nan
    name = torch.cuda.get_device_name(device)
    if dtype == torch.bfloat16 and "V100" in name:
        return math.nan  # no bf16 tensor cores before Ampere
    entry = datasheet_entry(name)
    return entry[1] if entry else math.nan


def matmul_peak_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 2048


def mfu_peak(peak_tflops: float, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, how it was obtained) for MFU: the configured figure, else a measurement."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, f"{peak_tflops:g} TFLOP/s from metrics.peak_tflops"
    flops = measure_matmul_peak(device, dtype)
    n = matmul_peak_size(device)
    name = str(dtype).removeprefix("torch.")
    return flops, (f"{flops / 1e12:.3g} TFLOP/s measured ({name} {n}x{n} matmul on {device}; "
                   "set metrics.peak_tflops to use a datasheet figure)")
