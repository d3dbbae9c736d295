"""What a run derives from its config, its device and its world, resolved once.

Precision, the autocast dtype, the attention implementation, the frozen teacher's dtype and
the accumulation count each follow from a few config fields plus the hardware. They are
worked out here, at start-up, and every loop (pretraining, GLUE fine-tuning, task
distillation, teacher preparation, the bench) reads the same answer instead of re-deriving it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import distributed
from .config import ConfigError
from .errors import plural


def cuda_bf16_native() -> bool:
    """bf16 in hardware (Ampere and later). A V100 reports bf16 as supported through emulation,
    which is slower than fp16 and not what a run should pick by itself."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware does it natively, else fp16 on CUDA (V100), fp32 on a
    CPU without bf16 matmuls. fp16 on a CPU is refused."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if cuda_bf16_native() else "fp16"
        else:
            # bf16 autocast pays on CPUs with native bf16 matmuls (AVX512-BF16/AMX: measured
            # 1.5-1.8x); elsewhere it emulates and is slower than fp32
            precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA GPU (on CPU it is ~500x slower "
                          "than bf16); use train.precision=bf16 or fp32")
    return precision


def amp_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (a no-op context for fp32)."""
    dtype = amp_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def resolve_attention(attn: str, device: torch.device) -> str:
    # eager is faster than sdpa on this kind of CPU (measured); sdpa's fused kernels win on CUDA
    if attn == "auto":
        return "eager" if device.type == "cpu" else "sdpa"
    return attn


def resolve_teacher_dtype(setting: str, precision: str, device: torch.device) -> torch.dtype:
    """``auto``: half precision on CUDA (fp16 where the run is fp16: a V100 has no bf16), fp32
    on a CPU, where half-precision matmuls without autocast are slow."""
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.float16 if precision == "fp16" else torch.bfloat16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def fused_chunk_rows(setting: int, device: torch.device) -> int:
    """``loss.fused_chunk_rows``; 0: 1024 rows on CUDA (fewer, larger kernels; 0.42 GiB of
    logits per chunk at V = 30522), 256 on a CPU, where a chunk's fp32 (256, V) tensors stay in
    the caches between the loss's elementwise passes (measured 1.3x faster than 1024 rows on a
    2-core Zen4)."""
    if setting:
        return setting
    return 1024 if device.type == "cuda" else 256


def accumulation(global_batch: int, micro_batch: int, world: int) -> int:
    """Micro-batches per optimizer step: the global batch is set, accumulation derived."""
    if global_batch % (micro_batch * world):
        raise ConfigError(f"train.global_batch: {global_batch} is not divisible by "
                          f"train.micro_batch {micro_batch} x "
                          f"{plural(world, 'process', 'processes')} = "
                          f"{micro_batch * world}; make it a multiple")
    return global_batch // (micro_batch * world)


# caps this process's CUDA allocator at N GiB: a big GPU then shows whether a small card's plan
# fits (launch/gpu_check.py runs the RTX 4070 profile under a 12 GiB cap)
MEMORY_CAP_ENV = "DISTIL_CUDA_MEMORY_GIB"


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        cap = os.environ.get(MEMORY_CAP_ENV, "")
        if cap:
            try:
                gib = float(cap)
            except ValueError:
                raise ConfigError(f"{MEMORY_CAP_ENV}: '{cap}' is not a number of GiB; "
                                  "set it to e.g. 12 or unset it") from None
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            torch.cuda.set_per_process_memory_fraction(min(1.0, gib / total), device)
        return device
    return torch.device("cpu")


def init_distributed(backend: str, device: torch.device,
                     timeout_min: float = distributed.DEFAULT_TIMEOUT_MIN
                     ) -> tuple[int, int, int, bool]:
    """Join the launcher's process group when there is one (WORLD_SIZE > 1);
    returns (rank, world, local_rank, created)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 and not dist.is_initialized():
        if backend == "plain":
            raise ConfigError("parallel.backend: 'plain' runs one process but WORLD_SIZE="
                              f"{world}; use parallel.backend=ddp, fsdp or deepspeed")
        distributed.init_process_group(device, deepspeed=backend == "deepspeed",
                                       timeout_min=timeout_min)
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, int(os.environ.get("LOCAL_RANK", "0")), created


@dataclass(frozen=True)
class Runtime:
    """One process's place in the job and the settings derived for it."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    precision: str                 # fp32 | bf16 | fp16, as the engine runs it
    attn: str = "eager"            # the attention implementation models are built with
    teacher_dtype: torch.dtype = torch.float32
    accum: int = 1
    owns_group: bool = False       # this process created the process group (and ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def amp_dtype(self) -> torch.dtype:
        """The dtype matmuls run in (fp32 for an fp32 run)."""
        return amp_dtype(self.precision) or torch.float32

    def autocast(self):
        return autocast(self.device, self.precision)

    def say(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve(*, engine, precision: str, attn: str = "auto", teacher_dtype: str = "auto",
            global_batch: int | None = None, micro_batch: int | None = None,
            ds_config: dict | None = None,
            timeout_min: float = distributed.DEFAULT_TIMEOUT_MIN) -> Runtime:
    """Join the process group, pick the device and resolve every derived setting once.

    ``engine``: the engine class (``engine.engine_class(backend)``), passed in rather than
    looked up so this layer stays below the engines. It has the last word on precision
    (DeepSpeed takes its JSON's bf16/fp16)."""
    device = device_for(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world, local_rank, created = init_distributed(engine.name, device, timeout_min)
    prec = engine.resolve_precision(precision, device, ds_config)
    accum = 1 if global_batch is None else accumulation(global_batch, micro_batch, world)
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=device, precision=prec,
                   attn=resolve_attention(attn, device),
                   teacher_dtype=resolve_teacher_dtype(teacher_dtype, prec, device),
                   accum=accum, owns_group=created)
