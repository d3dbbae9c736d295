"""Peak memory of the step bench's configurations, each as if it ran alone, and of the
vocabulary loss alone (naive chain against the fused loss)."""
from __future__ import annotations

import gc
import multiprocessing as mp
import resource

import torch
import torch.nn.functional as F

from ...losses import LossWeights, VocabTargets, fused_vocab_loss, mlm_chunk_bounds, soft_target_kl
from ..memory import LiveStorage
from .step import Runner, Setup, Variant, build_teacher


def _status_gib(field: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM) in GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    if field == "VmHWM":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_job(setup: Setup, v: Variant, steps: int) -> tuple[float, float]:
    """Build one configuration from nothing and run ``steps`` steps: (its peak memory, the
    process's whole high-water mark) in GiB."""
    dev = setup.device
    base = _status_gib("VmRSS") if dev.type == "cpu" else 0.0
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    r = Runner(setup, v, build_teacher(setup), steps)
    for _ in range(steps):
        r.step()
    r.sync()
    r.close()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
        del r
        gc.collect()
        torch.cuda.empty_cache()
        return peak, float("nan")
    hwm = _status_gib("VmHWM")
    return hwm - base, hwm


def _memory_child(conn, setup, v, steps):
    try:
        conn.send(("ok", _memory_job(setup, v, steps)))
    except BaseException as e:  # reported by the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def measure_peak_memory(setup: Setup, vs: list[Variant],
                        steps: int) -> dict[str, tuple[float, float]]:
    """Peak memory of each configuration as if it ran alone: (peak, process high-water mark).

    CPU: RSS's high-water mark only ever rises within a process (ru_maxrss, VmHWM) and freed
    memory may stay with the allocator, so in one process the configuration measured second would
    inherit the first one's peak. Each configuration therefore runs in a child forked from this
    process BEFORE it has loaded a model or run a parallel kernel (forking after OpenMP has
    started can hang the child); the child builds its models and data from nothing, runs a
    warm-up and a measured step, and reports its VmHWM. Fork rather than a fresh interpreter:
    importing torch+transformers again costs ~5-10 s per configuration on 2 cores. The peak is
    VmHWM less the child's resident memory when it starts (the imported libraries, the same in
    every child): what the configuration itself adds, models, optimizer state, activations and
    allocator slack included. That is what CUDA's max_memory_allocated counts too (it leaves out
    the CUDA context and the libraries), so CPU and GPU ratios mean the same thing; the whole
    VmHWM is reported beside it.
    CUDA: torch's allocator statistics can be reset, so each configuration is built, run and
    freed in turn in this process and its max_memory_allocated read (no high-water mark).
    """
    out = {}
    if setup.device.type == "cuda":
        for v in vs:
            out[v.name] = _memory_job(setup, v, steps)
        return out
    ctx = mp.get_context("fork")
    for v in vs:
        if v.compile:
            out[v.name] = (float("nan"), float("nan"))  # compiling again in a child: 30 s
            continue
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_memory_child, args=(child, setup, v, steps))
        p.start()
        child.close()
        try:
            status, val = parent.recv()
        except EOFError:
            status, val = "error", f"child exited with code {p.exitcode}"
        p.join()
        if status != "ok":
            raise RuntimeError(f"peak-memory run of '{v.name}' failed: {val}")
        out[v.name] = val
    return out


def vocab_loss_memory(n: int, d: int, vocab: int, chunk: int, device: torch.device,
                      dtype: torch.dtype | None) -> dict[str, float]:
    """Peak live tensor bytes (``tools.memory.LiveStorage``) of the vocabulary terms alone,
    forward and backward, at ``n`` rows: the naive chain (full student and teacher logits,
    ``soft_target_kl`` + cross-entropy at 15 % of the rows, under autograd) and the fused loss.
    Inputs (rows, weights) are made before the measurement and are not counted."""
    g = torch.Generator(device=device).manual_seed(0)
    hs = torch.randn(n, d, device=device, generator=g).requires_grad_()
    w = (0.05 * torch.randn(vocab, d, device=device, generator=g)).requires_grad_()
    b = torch.zeros(vocab, device=device, requires_grad=True)
    ht, wt, bt = torch.randn(n, d, device=device, generator=g), w.detach().clone(), b.detach()
    n_mlm = max(1, round(0.15 * n))
    rows = torch.sort(torch.randperm(n, device=device)[:n_mlm]).values
    labels = torch.randint(vocab, (n_mlm,), device=device, generator=g)
    w_loss = LossWeights()
    amp = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(
        device.type, enabled=False)
    out = {}
    with LiveStorage() as naive, amp:
        zs = F.linear(hs, w, b)
        with torch.no_grad():
            zt = F.linear(ht, wt, bt)
        loss = w_loss.alpha_ce * soft_target_kl(zs, zt, w_loss.temperature) \
            + w_loss.alpha_mlm * F.cross_entropy(zs[rows].float(), labels)
        del zs, zt
        loss.backward()
        del loss
    out["naive"] = naive.peak / 2**30
    hs.grad = w.grad = b.grad = None
    t = VocabTargets(ht, wt, bt, labels, rows, mlm_chunk_bounds(rows.cpu(), n, chunk), chunk,
                     w_loss.temperature, w_loss.alpha_ce, w_loss.alpha_mlm)
    with LiveStorage() as fused, amp:
        loss, _, _ = fused_vocab_loss(hs, w, b, t)
        loss.backward()
        del loss
    out["fused"] = fused.peak / 2**30
    return out

