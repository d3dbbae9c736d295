"""The distillation loop: read it top to bottom, it is one step of DistilBERT training.

source -> pack -> mask -> engine.module (student) + frozen teacher -> triple loss -> step.
"""
from __future__ import annotations

import functools
import logging
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import distributed
from .checkpoint import CheckpointManager, load_torch, save_torch
from .cli import UserError
from .config import Config, ConfigError, dump_yaml
from .data.loader import (BatchLoader, StreamError, build_eval_set, open_pretrain_stream,
                          scan_token_counts)
from .data.masking import MaskedBatch
from .distributed import barrier, rank0_first
from .engine import engine_class
from .losses import LossWeights, distillation_loss
from .metrics import (MetricsLogger, console_line, distill_flops_per_token, mfu_peak,
                      peak_memory_gib)
from .model_card import write_card
from .models import (StudentForDistillation, TeacherForDistillation, build_student,
                     load_tokenizer, resolve_model_path)
from .teacher import fixed_eval_batches, load_teacher, make_eval_masker, make_masker, mlm_eval

log = logging.getLogger(__name__)

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged, source dead); the message says what to do."""


def distill_step(student, teacher, mb, weights: LossWeights, kl_all: bool, device):
    """Teacher forward (inference mode) and student forward; returns (total, raw terms).

    Every selection is a gather by flat row indices the masker computed on the host: no
    boolean indexing, so nothing in the step waits for the device to count positions.
    """
    ids = mb.input_ids.to(device, non_blocking=True)
    mask = mb.attention_mask.to(device, non_blocking=True)
    real = mb.real_rows.to(device, non_blocking=True)
    labels = mb.labels.to(device, non_blocking=True)
    # Vocabulary logits only where a loss reads them: every real token when the KL term covers
    # all of them (the MLM term then reads the masked rows among those), else the masked ones.
    if kl_all:
        positions, mlm_rows = real, mb.masked_in_real.to(device, non_blocking=True)
    else:
        positions, mlm_rows = mb.masked_rows.to(device, non_blocking=True), slice(None)
    with torch.inference_mode():
        t_hidden, t_logits = teacher(ids, mask, positions)
    # inference tensors cannot be saved for backward; a clone outside the mode is a normal one
    t_hidden, t_logits = t_hidden.clone(), t_logits.clone()
    s_hidden, s_logits = student(ids, mask, positions)
    return distillation_loss(s_hidden, t_hidden, s_logits, t_logits, labels, real, mlm_rows,
                             weights)


def setup_distributed(backend: str) -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if backend == "plain":
            raise ConfigError("parallel.backend: 'plain' runs one process but WORLD_SIZE="
                              f"{world}; use parallel.backend=ddp, fsdp or deepspeed")
        if backend == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available()
                                       else "gloo")
        else:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def mean_over_ranks(terms: dict) -> dict[str, float]:
    """Loss terms averaged over the data-parallel ranks: the global batch's loss, not rank 0's
    share of it (one small all-reduce, at the log interval only)."""
    keys = sorted(terms)
    t = torch.stack([torch.as_tensor(terms[k]).float() for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a directory holding another run before anything is loaded or written."""
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if holds_run and not (resume or overwrite):
        raise UserError(f"run.output_dir: '{out}' holds another run; pass --resume to continue "
                        "it, --overwrite to replace it, or choose another run.output_dir")


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Clear a replaced run only once every input has been validated and loaded: a bad input
    with --overwrite must not cost the previous run."""
    if overwrite and not resume and is_main and out.is_dir():
        for name in (*RUN_MARKERS, "tb", "student"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes the current step and checkpoints."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C really stops
        self.flag = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume from step N, lines past N from the killed run would be duplicates."""
    if not path.is_file():
        return
    import json

    keep = [ln for ln in path.read_text().splitlines() if ln.strip()
            and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False,
          ds_config: dict | None = None, resume_command: str = "") -> dict:
    rank, world, local_rank = setup_distributed(cfg.parallel.backend)
    distributed.init_control_group()
    is_main = rank == 0
    say = (lambda s: print(s, flush=True)) if is_main else (lambda s: None)
    t_start = time.time()

    micro, glob = cfg.train.micro_batch, cfg.train.global_batch
    if glob % (micro * world):
        raise ConfigError(f"train.global_batch: {glob} is not divisible by train.micro_batch "
                          f"{micro} x {world} processes = {micro * world}; make it a multiple")
    accum = glob // (micro * world)
    assert accum * micro * world == glob

    out = Path(cfg.run.output_dir)
    check_output_dir(out, resume, overwrite)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_all(cfg.run.seed)

    # -- models and data ----------------------------------------------------------------------
    teacher_path = resolve_model_path(cfg.teacher.name_or_path)
    tokenizer = load_tokenizer(teacher_path)
    # The eval set and token counts of a text source are built by rank 0 and kept on disk: the
    # other ranks, restarts and resumes read them back instead of streaming the corpus again.
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else out / "cache"
    eval_ids = rank0_first(lambda: build_eval_set(
        cfg.data, tokenizer, cfg.data.eval_sequences, seed=cfg.run.seed, cache_dir=cache_dir))
    cls = engine_class(cfg.parallel.backend)
    precision = cls.resolve_precision(cfg.train.precision, device, ds_config)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA GPU (on CPU it is ~500x slower "
                          "than bf16); use train.precision=bf16 or fp32")
    amp = torch.bfloat16 if precision == "bf16" else torch.float16
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if precision != "fp32" else (
        lambda: torch.autocast(device.type, enabled=False))
    # token frequencies are read once, for whoever needs them first (a headless teacher's
    # unigram prior, frequency-smoothed masking)
    token_counts = functools.cache(lambda: scan_token_counts(
        cfg.data, tokenizer, cfg.masking.count_docs, seed=cfg.run.seed, cache_dir=cache_dir))
    if cfg.masking.smoothing > 0:
        rank0_first(token_counts)
    teacher_mlm, teacher_info = load_teacher(cfg, tokenizer, device, autocast, eval_ids,
                                             token_counts, is_main=is_main, barrier=barrier,
                                             say=say)
    attn = cfg.train.attn_implementation
    if attn == "auto":
        attn = "eager" if device.type == "cpu" else "sdpa"
    if cfg.data.max_seq_len > teacher_mlm.config.max_position_embeddings:
        raise ConfigError(f"data.max_seq_len: {cfg.data.max_seq_len} exceeds the teacher's "
                          f"{teacher_mlm.config.max_position_embeddings} positions; lower it")
    seed_all(cfg.run.seed)  # the same student init on every rank, prepared teacher or not
    student_mlm, layer_map = build_student(teacher_mlm, cfg.student, attn,
                                           cosine_loss=cfg.loss.alpha_cos > 0)
    teacher_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                     # half precision on CUDA; fp16 where the run is fp16 (V100: no bf16)
                     "auto": (torch.float16 if precision == "fp16" else torch.bfloat16)
                     if device.type == "cuda" else torch.float32}[
        cfg.teacher.dtype]
    teacher = TeacherForDistillation(teacher_mlm).to(device=device, dtype=teacher_dtype)
    student = StudentForDistillation(student_mlm)

    masker = make_masker(tokenizer, cfg.masking, seed=cfg.run.seed,
                         counts=token_counts() if cfg.masking.smoothing > 0 else None)
    eval_batches = fixed_eval_batches(eval_ids, make_eval_masker(tokenizer, cfg.masking), micro)
    stream = open_pretrain_stream(cfg.data, tokenizer, micro, seed=cfg.run.seed, rank=rank,
                                  world=world, workers=cfg.data.tokenize_workers)
    first_step = [0]  # the step of the loader's first batch: 0, or where a resume starts

    def prepare_batch(ids: torch.Tensor, k: int) -> MaskedBatch:
        # in the loader's thread: batch k of the loader belongs to step first + k // accum
        mb = masker(ids, torch.ones_like(ids), first_step[0] + k // accum)
        return mb.pin_memory() if device.type == "cuda" else mb

    loader = BatchLoader(stream, cfg.data.prefetch, transform=prepare_batch)

    engine = cls(student, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                 adam_eps=cfg.train.adam_eps, warmup_steps=cfg.train.warmup_steps,
                 total_steps=cfg.train.max_steps, max_grad_norm=cfg.train.max_grad_norm,
                 precision=precision, accum_steps=accum, device=device,
                 compile=cfg.train.compile, **({"ds_config": ds_config} if ds_config else {}))

    # -- resume -------------------------------------------------------------------------------
    prepare_output_dir(out, resume, overwrite, is_main)
    barrier()
    ckpts = CheckpointManager(out / "checkpoints", cfg.checkpoint.keep_last)
    start_step = 0
    counters = {"skipped_total": 0, "nonfinite_run": 0, "sequences": 0, "acc_start": None}
    rng_at_start = None
    if resume:
        def _load(d: Path):
            engine.load(d)
            return load_torch(d / f"trainer_rank{rank}.pt")

        found = ckpts.load_latest(_load, world=world)
        if found is None:
            say(f"resume: no complete checkpoint in {ckpts.root}; starting from step 0")
        else:
            d, st = found
            start_step = first_step[0] = st["step"]
            loader.load_state_dict(st["data"])
            masker.load_state_dict(st["masker"])
            rng_at_start = st["rng"]  # restored just before the first step
            counters.update(st["counters"])
            say(f"resume: {d} (step {start_step})")
            if is_main:
                _truncate_metrics(out / "metrics.jsonl", start_step)
    if is_main:
        dump_yaml(cfg, out / "config.yaml")
    barrier()

    metrics = MetricsLogger(out, enabled=is_main, tensorboard=cfg.metrics.tensorboard)
    weights = LossWeights.from_config(cfg.loss)
    kl_all = cfg.loss.kl_positions == "all"
    seq_len = cfg.data.max_seq_len
    head_frac = 1.0 if kl_all else cfg.masking.mlm_prob
    flops_tok = distill_flops_per_token(teacher_mlm.config, student_mlm.config, seq_len,
                                        head_frac)
    peak, peak_how = mfu_peak(cfg.metrics.peak_tflops, device,
                              amp if precision != "fp32" else torch.float32)

    def student_logits(ids, mask, pos):
        return engine.module(ids, mask, pos)[1]

    def teacher_logits(ids, mask, pos):
        return teacher(ids, mask, pos)[1]

    def evaluate(step: int) -> dict:
        engine.module.eval()
        s_loss, s_acc = mlm_eval(student_logits, eval_batches, device, autocast)
        engine.module.train()
        vals = {"eval/student_mlm_loss": s_loss, "eval/student_mlm_acc": s_acc,
                "eval/teacher_mlm_loss": t_eval[0], "eval/teacher_mlm_acc": t_eval[1]}
        metrics.log(step, vals)
        say(f"eval step {step}: student mlm acc {s_acc:.1%} (loss {s_loss:.3f})  "
            f"teacher {t_eval[1]:.1%} (loss {t_eval[0]:.3f})")
        return vals

    t_eval = mlm_eval(teacher_logits, eval_batches, device, autocast)

    # ZeRO-3 leaves each rank an empty shard of every parameter; ds_numel is the full size
    n_s = sum(getattr(p, "ds_numel", p.numel()) for p in student_mlm.parameters())
    n_t = sum(p.numel() for p in teacher_mlm.parameters())
    say(f"run: {out.resolve()}  backend {engine.name} x{world}  precision {precision}  "
        f"device {device}")
    say(f"student: DistilBertForMaskedLM {student_mlm.config.n_layers} layers, "
        f"{n_s / 1e6:.1f}M params, init {cfg.student.init}"
        + (f" from teacher layers {layer_map}" if cfg.student.init == "teacher" else ""))
    say(f"teacher: {teacher_path} ({n_t / 1e6:.1f}M params, frozen, {teacher_dtype})")
    say(f"batch: global {glob} = micro {micro} x accumulation {accum} x {world} processes, "
        f"seq {seq_len}; {cfg.train.max_steps} steps; eval on {len(eval_ids)} held-out "
        "sequences")
    say(f"objective: {weights.alpha_ce:g} x KL(T={weights.temperature:g}) over "
        f"{'every token' if kl_all else 'masked tokens'} + {weights.alpha_mlm:g} x MLM + "
        f"{weights.alpha_cos:g} x cosine"
        + (f" + {weights.alpha_mse:g} x logit MSE" if weights.alpha_mse else "")
        + f"; masking {cfg.masking.mlm_prob:g}"
        + (f", smoothing {cfg.masking.smoothing:g}" if cfg.masking.smoothing else "")
        + ("; position embeddings frozen" if cfg.student.freeze_position_embeddings else ""))
    say(f"mfu peak: {peak_how}")
    say(f"writing: {out / 'config.yaml'}, {out / 'metrics.jsonl'}, {out / 'tb'}, "
        f"{out / 'checkpoints'}, {out / 'student'}")

    if start_step == 0:
        counters["acc_start"] = evaluate(0)["eval/student_mlm_acc"]

    def save_checkpoint(step: int, data_state: dict | None = None) -> Path:
        state = {"step": step, "data": data_state or loader.state_dict(),
                 "masker": masker.state_dict(),
                 "rng": rng_state(), "counters": dict(counters)}

        def write(d: Path):
            engine.save(d)
            save_torch(state, d / f"trainer_rank{rank}.pt")

        return ckpts.save(step, write, {"world_size": world, "backend": engine.name})

    # -- the loop -----------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.train.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (is_main and cfg.metrics.progress_bar and sys.stdout.isatty()),
               file=sys.stdout)
    acc_terms: dict[str, torch.Tensor] = {}
    window_t, window_wait, window_steps = 0.0, 0.0, 0
    last_eval = None
    last_log: dict = {}  # the last logged window's losses, for the model card
    step = start_step
    engine.module.train()
    # Nothing may draw from the global generators between here and the first step: a resumed
    # run must see the dropout masks the uninterrupted run saw.
    if rng_at_start is not None:
        set_rng_state(rng_at_start)
    else:
        seed_all(cfg.run.seed + 1000 * rank)  # dropout differs per rank, as in data parallelism
    try:
        with _Preemption() as pre:
            while step < cfg.train.max_steps:
                t0 = time.perf_counter()
                wait = 0.0
                step_start = loader.mark()
                step_loss = 0.0
                for micro_i in range(accum):
                    tw = time.perf_counter()
                    failure = ""
                    try:
                        mb = next(loader)
                    except StreamError as e:
                        failure = str(e)
                    # every rank learns of a dead stream before the next collective, and all of
                    # them checkpoint the start of this step (its micro-batches are read again)
                    if distributed.any_rank(bool(failure)):
                        save_checkpoint(step, loader.state_dict(at=step_start))
                        raise TrainingError(
                            f"{failure or 'the data source failed on another rank'}; checkpoint "
                            f"saved at step {step}, resume with {resume_command or '--resume'}")
                    wait += time.perf_counter() - tw
                    with engine.accumulate(last=micro_i == accum - 1):
                        with engine.autocast():
                            loss, raw = distill_step(engine.module, teacher, mb, weights,
                                                     kl_all, device)
                        engine.backward(loss)
                    for k, v in raw.items():
                        acc_terms[k] = acc_terms.get(k, 0.0) + v.detach() / accum
                    step_loss = step_loss + loss.detach() / accum
                acc_terms["total"] = acc_terms.get("total", 0.0) + step_loss
                result = engine.step()
                step += 1
                counters["sequences"] += glob
                window_t += time.perf_counter() - t0
                window_wait += wait
                window_steps += 1
                if result.skipped:
                    counters["skipped_total"] += 1
                    # an fp16 loss-scale backoff on a finite loss is the scaler calibrating
                    if result.diverged(loss_finite=bool(torch.isfinite(step_loss))):
                        counters["nonfinite_run"] += 1
                else:
                    counters["nonfinite_run"] = 0
                if counters["nonfinite_run"] >= cfg.train.max_nonfinite_steps:
                    raise TrainingError(
                        f"{counters['nonfinite_run']} non-finite steps in a row at step "
                        f"{step}; lower train.lr or check the data; last good checkpoint "
                        f"in {ckpts.root}")
                bar.update(1)

                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    vals = {f"loss/{k}": v / window_steps
                            for k, v in mean_over_ranks(acc_terms).items()}
                    for k in ("ce", "mlm", "cos", "mse"):
                        vals[f"loss/{k}_weighted"] = vals[f"loss/{k}"] * getattr(
                            weights, f"alpha_{k}")
                    step_s = window_t / window_steps
                    tps = glob * seq_len / step_s
                    vals.update({
                        "optim/lr": engine.lr(), "optim/grad_norm": float(result.grad_norm),
                        "optim/skipped_steps": counters["skipped_total"],
                        "data/sequences": counters["sequences"], "data/epoch": loader.epoch,
                        "perf/step_s": step_s, "perf/tokens_per_s": tps,
                        "perf/mfu": tps * flops_tok / (peak * world),
                        "perf/data_wait_pct": 100.0 * window_wait / window_t,
                        "mem/peak_gib": peak_memory_gib(device)})
                    metrics.log(step, vals)
                    bar.write(console_line(step, cfg.train.max_steps, vals)) if is_main else None
                    bar.set_postfix(loss=f"{vals['loss/total']:.3f}")
                    last_log = {"losses": {k: v for k, v in vals.items()
                                           if k.startswith("loss/")},
                                "loss_window": [step - window_steps + 1, step]}
                    acc_terms, window_t, window_wait, window_steps = {}, 0.0, 0.0, 0
                if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                    last_eval = evaluate(step)
                if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps:
                    save_checkpoint(step)
                if distributed.any_rank(pre.flag) and step < cfg.train.max_steps:
                    if step % cfg.checkpoint.every_steps:
                        save_checkpoint(step)
                    say(f"preempted: checkpoint saved at step {step}; resume with "
                        f"{resume_command or 'the same command plus --resume'}")
                    return {"preempted": True, "step": step}
    finally:
        bar.close()
        loader.close()

    # -- export -------------------------------------------------------------------------------
    export_dir = out / "student"
    full = engine.export_module()
    if is_main and full is not None:
        export_dir.mkdir(parents=True, exist_ok=True)
        full.mlm.save_pretrained(export_dir)
        tokenizer.save_pretrained(export_dir)
    barrier()
    if last_eval is None:
        last_eval = evaluate(step)
    acc_end = last_eval["eval/student_mlm_acc"]
    summary = {"steps": step, "wall_s": time.time() - t_start, "acc_start": counters["acc_start"],
               "acc_end": acc_end, "teacher_acc": t_eval[1], "teacher": teacher_info,
               "export": str(export_dir)}
    if counters["acc_start"] is not None:
        say(f"done: student held-out masked-token accuracy {counters['acc_start']:.1%} -> "
            f"{acc_end:.1%} (teacher {t_eval[1]:.1%}) in {summary['wall_s']:.0f}s")
    else:
        say(f"done: student held-out masked-token accuracy {acc_end:.1%} "
            f"(teacher {t_eval[1]:.1%}) in {summary['wall_s']:.0f}s")
    if is_main and full is not None:
        dump_yaml(cfg, export_dir / "training_args.yaml")
        write_card(export_dir, cfg, {
            **summary, **last_log, "start_step": start_step, "layers": layer_map,
            "n_layers": student_mlm.config.n_layers, "dim": student_mlm.config.dim,
            "params": n_s, "precision": precision, "backend": engine.name, "world": world,
            "accum": accum, "export_dir": str(export_dir)})
    say(f"export: {export_dir} (DistilBertForMaskedLM.from_pretrained / pipeline('fill-mask'); "
        "model card README.md, training_args.yaml)")
    metrics.close()
    return summary
