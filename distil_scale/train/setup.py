"""Build a pretraining run: runtime, data, teacher, student, engine, checkpoints, metrics.

:func:`build` does everything that can fail on bad input before the output directory is
touched, so a mistake with ``--overwrite`` never costs the previous run.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed, runtime
from ..checkpoint import CheckpointManager, load_torch_agreed, save_torch
from ..errors import UserError, plural
from ..config import (RESUMABLE, WORLD_CHANGE, Config, ConfigError, config_changes,
                      dump_yaml, to_dict)
from ..data.eval_cache import build_eval_set, scan_token_counts
from ..data.loader import BatchLoader
from ..data.masking import MaskedBatch, make_eval_masker, make_masker
from ..data.stream import is_shard_dir, open_pretrain_stream
from ..distributed import barrier, rank0_first
from ..engine import OptimSpec, engine_class, make_engine
from ..evaluate import fixed_eval_batches, mlm_eval
from ..losses import LossWeights
from ..metrics import MetricsLogger, distill_flops_per_token, mfu_peak
from ..families import max_positions, teacher_config
from ..fsio import RunLock, atomic_write, claim_output_dir
from ..hub import load_tokenizer, resolve_model_path
from ..models import TeacherForDistillation, build_student, wrap_for_distillation
from .state import TrainState, seed_all
from .step import distill_step
from .teacher import load_teacher

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")


def check_output_dir(out: Path, resume: bool, overwrite: bool, say=print) -> None:
    """Refuse a directory holding another run before anything is loaded or written.

    ``--resume`` where no run is yet starts one and says so: that is a requeued job's first
    attempt (the same command every time), and the line shows a mistyped directory at once."""
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if holds_run and not (resume or overwrite):
        raise UserError(f"run.output_dir: '{out}' holds another run; pass --resume to continue "
                        "it, --overwrite to replace it, or choose another run.output_dir")
    if resume and not holds_run:
        say(f"--resume: '{out}' holds no run yet (no {', '.join(RUN_MARKERS)}): starting a new "
            "one there; if you meant to continue another run, stop and check run.output_dir")


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Clear a replaced run only once every input has been validated and loaded: a bad input
    with --overwrite must not cost the previous run."""
    if overwrite and not resume and is_main and out.is_dir():
        for name in (*RUN_MARKERS, "tb", "student", "student.tmp", ".old-student"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume from step N, lines past N from the killed run would be duplicates."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip()
            and json.loads(ln).get("step", 0) <= step]
    atomic_write(path, "".join(ln + "\n" for ln in keep))


def resolved_config(cfg: Config, rt: runtime.Runtime) -> dict:
    """The config with what "auto" became on this machine: what a resume must match."""
    return {**to_dict(cfg), "resolved": {
        "precision": rt.precision, "accumulation": rt.accum,
        "teacher_dtype": str(rt.teacher_dtype)}}


def resume_check(cfg: Config, rt: runtime.Runtime):
    now = resolved_config(cfg, rt)

    def check(meta: dict) -> list[str]:
        if "config" not in meta:
            return []
        other_world = meta.get("world_size", rt.world) != rt.world
        return config_changes(meta["config"], now,
                              RESUMABLE + WORLD_CHANGE if other_world else RESUMABLE)

    return check


@dataclass
class Run:
    """A built run: what the loop drives, and the few things it reports at the end."""

    cfg: Config
    rt: runtime.Runtime
    out: Path
    tokenizer: object
    teacher: TeacherForDistillation
    teacher_info: dict
    student_mlm: torch.nn.Module
    layer_map: list[int]
    state: TrainState
    loader: BatchLoader
    engine: object
    ckpts: CheckpointManager
    eval_batches: list
    lock: RunLock | None = None
    resuming: bool = False  # this attempt continues a run (--resume, or an auto-restart)
    saved_at: int = -1      # the step of the newest checkpoint this run holds
    weights: LossWeights = field(init=False)
    metrics: MetricsLogger | None = None
    teacher_eval: tuple[float, float] = (float("nan"), float("nan"))

    def __post_init__(self):
        self.weights = LossWeights.from_config(
            self.cfg.loss, teacher_heads=self.teacher.mlm.config.num_attention_heads)
        self.kl_all = self.cfg.loss.kl_positions == "all"

    def micro_loss(self, module, mb: MaskedBatch):
        return distill_step(module, self.teacher, mb, self.weights, self.kl_all, self.rt.device)

    def evaluate(self, step: int) -> dict:
        self.engine.module.eval()
        s_loss, s_acc = mlm_eval(lambda *a: self.engine.module(*a)[1], self.eval_batches,
                                 self.rt.device, self.rt.autocast)
        self.engine.module.train()
        t_loss, t_acc = self.teacher_eval
        vals = {"eval/student_mlm_loss": s_loss, "eval/student_mlm_acc": s_acc,
                "eval/teacher_mlm_loss": t_loss, "eval/teacher_mlm_acc": t_acc}
        self.metrics.log(step, vals)
        self.rt.say(f"eval step {step}: student mlm acc {s_acc:.1%} (loss {s_loss:.3f})  "
                    f"teacher {t_acc:.1%} (loss {t_loss:.3f})")
        return vals

    def save_checkpoint(self, data_at: int | None = None) -> Path:
        state = self.state.state_dict(data_at)

        def write(d: Path):
            self.engine.save(d)
            save_torch(state, d / f"trainer_rank{self.rt.rank}.pt")

        path = self.ckpts.save(self.state.step, write,
                               {"world_size": self.rt.world, "backend": self.engine.name,
                                "config": resolved_config(self.cfg, self.rt)})
        self.saved_at = self.state.step
        return path

    def resume(self) -> None:
        check = resume_check(self.cfg, self.rt)
        world, shards = self.rt.world, is_shard_dir(self.cfg.data.source)
        loaded: dict = {}

        def other_world(d: Path, saved: int) -> None:
            # before any file is read: what cannot go on with another number of processes
            self.engine.check_other_world(d, saved)
            if not shards and not self.cfg.data.restart_on_world_change:
                raise UserError(
                    f"--resume: {d} was written by {plural(saved, 'process', 'processes')} and "
                    f"this run has {world}; a text stream's position is per rank and cannot be "
                    f"re-dealt: resume with {saved}, or pass --restart-data to read the stream "
                    "again from its start (prepared shards, launch/prepare_data.py, resume on "
                    "any number)")

        def load(d: Path, saved: int):
            # every file is read before anything is applied; what reads but does not fit
            # (shapes, keys) stops the run, so a half-restored model never trains. On another
            # world the old ranks' files are not this one's: rank 0's step, counters and data
            # position stand for all (they agree at a step boundary)
            same = saved == world
            # agreed: a sharded engine's load is a collective, which a rank that cannot read
            # its own trainer file must not leave the others waiting in
            st = load_torch_agreed(d / f"trainer_rank{self.rt.rank if same else 0}.pt")
            self.engine.load(d)
            how = "exact" if same else "redeal" if shards else "restart"
            loaded.update(saved=saved, start=self.state.load_state_dict(st, how))

        found = self.ckpts.load_latest(load, world=world, check=check, other_world=other_world)
        if found is None:
            self.rt.say(f"resume: no complete checkpoint in {self.ckpts.root} yet (the run "
                        "stopped before its first); starting from step 0")
            return
        d, _ = found
        step, saved = self.state.step, loaded["saved"]
        self.saved_at = step
        if saved != world:
            data = (f"data re-dealt from global micro-batch {loaded['start']}" if shards else
                    "--restart-data: the text stream starts again from its beginning")
            self.rt.say(f"resume: step {step} written by {plural(saved, 'process', 'processes')}"
                        f", continuing on {world}: {data}")
        self.rt.say(f"resume: {d} (step {step})")
        if self.rt.is_main:
            truncate_metrics(self.out / "metrics.jsonl", step)


def build(cfg: Config, *, resume: bool, overwrite: bool, ds_config: dict | None) -> Run:
    rt = runtime.resolve(engine=engine_class(cfg.parallel.backend),
                         precision=cfg.train.precision, attn=cfg.train.attn_implementation,
                         teacher_dtype=cfg.teacher.dtype,
                         global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch,
                         ds_config=ds_config, timeout_min=cfg.parallel.timeout_minutes)
    distributed.init_control_group()
    if rt.world > 1:  # every rank: which node and device each one has is the first thing to check
        print(f"{distributed.who()}: local rank {rt.local_rank}, {rt.world} processes, device "
              f"{rt.device}", flush=True)
    resume, overwrite = restart_policy(resume, overwrite, rt.say)
    out = Path(cfg.run.output_dir)
    check_output_dir(out, resume, overwrite, rt.say)
    lock = claim_output_dir(out, "run.output_dir")
    try:
        check_shared(out, "run.output_dir")
        run = _build(cfg, rt, out, lock, resume=resume, overwrite=overwrite,
                     ds_config=ds_config)
    except BaseException:
        if lock:
            lock.release()
        raise
    run.resuming = resume
    return run


RESTART_ENVS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def restart_policy(resume: bool, overwrite: bool, say=print) -> tuple[bool, bool]:
    """(resume, overwrite) for this attempt. An auto-restart (torchrun --max-restarts, a SLURM
    requeue) reruns the first attempt's command: its --overwrite must not delete the
    checkpoints that attempt wrote, so a restart continues them instead."""
    for var in RESTART_ENVS:
        n = int(os.environ.get(var, "0") or 0)
        if n and overwrite and not resume:
            say(f"--overwrite: this is restart {n} of the job ({var}={n}); continuing the run "
                "its first attempt started (as --resume) instead of deleting its checkpoints")
            return True, False
    return resume, overwrite


def check_shared(path: Path, flag: str) -> None:
    """Every rank must see rank 0's directory: on node-local disks the saves would seem to
    succeed and a resume would find each node's own half. One line on every rank, before
    any data is read."""
    missing = distributed.unshared(path)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{flag}: '{path}' is not one directory shared by every node: "
                        f"{missing[0]}{more} does not see rank 0's files there; put {flag} "
                        "on a filesystem every node mounts (NFS, Lustre, GPFS...)")


def _build(cfg: Config, rt: runtime.Runtime, out: Path, lock: RunLock | None, *, resume: bool,
           overwrite: bool, ds_config: dict | None) -> Run:
    ckpts = CheckpointManager(out / "checkpoints", cfg.checkpoint.keep_last)
    if resume:  # a changed config is refused before the corpus or the teacher is read
        ckpts.refuse_changes(resume_check(cfg, rt))
    seed_all(cfg.run.seed)

    teacher_path = resolve_model_path(cfg.teacher.name_or_path)
    n_pos = max_positions(teacher_config(teacher_path))
    if cfg.data.max_seq_len > n_pos:
        raise ConfigError(f"data.max_seq_len: {cfg.data.max_seq_len} exceeds the teacher's "
                          f"{n_pos} positions; lower it")
    tokenizer = load_tokenizer(teacher_path)
    # The eval set and token counts of a text source are built by rank 0 and kept on disk: the
    # other ranks, restarts and resumes read them back instead of streaming the corpus again.
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else out / "cache"
    eval_ids = rank0_first(lambda: build_eval_set(
        cfg.data, tokenizer, cfg.data.eval_sequences, seed=cfg.run.seed, cache_dir=cache_dir))
    # token frequencies are read once, for whoever needs them first (a headless teacher's
    # unigram prior, frequency-smoothed masking)
    token_counts = functools.cache(lambda: scan_token_counts(
        cfg.data, tokenizer, cfg.masking.count_docs, seed=cfg.run.seed, cache_dir=cache_dir))
    if cfg.masking.smoothing > 0:
        rank0_first(token_counts)
    teacher_mlm, teacher_info = load_teacher(cfg, tokenizer, rt, eval_ids, token_counts)
    seed_all(cfg.run.seed)  # the same student init on every rank, prepared teacher or not
    student_mlm, layer_map = build_student(teacher_mlm, cfg.student, rt.attn)
    teacher, student = wrap_for_distillation(teacher_mlm, student_mlm, layer_map, cfg.loss)
    teacher.to(device=rt.device, dtype=rt.teacher_dtype)

    state = TrainState(make_masker(tokenizer, cfg.masking, seed=cfg.run.seed,
                                   counts=token_counts() if cfg.masking.smoothing > 0 else None))
    micro, accum = cfg.train.micro_batch, rt.accum

    def prepare_batch(ids: torch.Tensor, k: int) -> MaskedBatch:
        # in the loader's thread: batch k of the loader belongs to step first + k // accum
        mb = state.masker(ids, torch.ones_like(ids), state.first_step + k // accum)
        return mb.pin_memory() if rt.device.type == "cuda" else mb

    stream = open_pretrain_stream(cfg.data, tokenizer, micro, seed=cfg.run.seed, rank=rt.rank,
                                  world=rt.world, workers=cfg.data.tokenize_workers)
    state.loader = BatchLoader(stream, cfg.data.prefetch, transform=prepare_batch)
    t = cfg.train
    optim = OptimSpec(lr=t.lr, total_steps=t.max_steps, warmup_steps=t.warmup_steps,
                      weight_decay=t.weight_decay, adam_eps=t.adam_eps,
                      max_grad_norm=t.max_grad_norm)
    engine = make_engine(cfg.parallel.backend, student, optim, precision=rt.precision,
                         accum_steps=accum, device=rt.device, compile=t.compile,
                         **engine_options(cfg, ds_config))
    eval_batches = fixed_eval_batches(eval_ids, make_eval_masker(tokenizer, cfg.masking), micro)
    prepare_output_dir(out, resume, overwrite, rt.is_main)
    barrier()
    return Run(cfg, rt, out, tokenizer, teacher, teacher_info, student_mlm, layer_map, state,
               state.loader, engine, ckpts, eval_batches, lock)


def engine_options(cfg: Config, ds_config: dict | None) -> dict:
    """What one backend's constructor takes beyond the common arguments."""
    if cfg.parallel.backend == "fsdp":
        return {"shard_degree": cfg.parallel.fsdp_shard_degree}
    return {"ds_config": ds_config} if ds_config else {}


def start(run: Run) -> None:
    """Config dump, metrics, the teacher's score and the start-up banner (after a resume)."""
    cfg, rt = run.cfg, run.rt
    if rt.is_main:
        dump_yaml(cfg, run.out / "config.yaml")
    barrier()
    run.metrics = MetricsLogger(run.out, enabled=rt.is_main, tensorboard=cfg.metrics.tensorboard)
    run.teacher_eval = mlm_eval(lambda *a: run.teacher(*a)[1], run.eval_batches, rt.device,
                                rt.autocast)
    head_frac = 1.0 if run.kl_all else cfg.masking.mlm_prob
    run.flops_per_token = distill_flops_per_token(run.teacher.mlm.config, run.student_mlm.config,
                                                  cfg.data.max_seq_len, head_frac)
    run.peak_flops, peak_how = mfu_peak(cfg.metrics.peak_tflops, rt.device, rt.amp_dtype)
    # ZeRO-3 leaves each rank an empty shard of every parameter; ds_numel is the full size
    run.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in run.student_mlm.parameters())
    say, w, t = rt.say, run.weights, cfg.train
    say(f"run: {run.out.resolve()}  backend {run.engine.name} x{rt.world}{run.engine.layout}  "
        f"precision {rt.precision}  device {rt.device}")
    say(f"student: {type(run.student_mlm).__name__} {len(run.layer_map)} layers, "
        f"{run.n_params / 1e6:.1f}M params, init {cfg.student.init}"
        + (f" from teacher layers {run.layer_map}" if cfg.student.init == "teacher" else ""))
    n_t = sum(p.numel() for p in run.teacher.parameters())
    say(f"teacher: {run.teacher_info['path']} ({n_t / 1e6:.1f}M params, frozen, "
        f"{rt.teacher_dtype})")
    say(f"batch: global {t.global_batch} = micro {t.micro_batch} x accumulation {rt.accum} x "
        f"{plural(rt.world, 'process', 'processes')}, seq {cfg.data.max_seq_len}; "
        f"{t.max_steps} steps; eval on "
        f"{sum(len(b.input_ids) for b in run.eval_batches)} held-out sequences")
    say(f"objective: {w.alpha_ce:g} x KL(T={w.temperature:g}) over "
        f"{'every token' if run.kl_all else 'masked tokens'} + {w.alpha_mlm:g} x MLM + "
        f"{w.alpha_cos:g} x cosine"
        + (f" + {w.alpha_mse:g} x logit MSE" if w.alpha_mse else "")
        + (f" + {w.alpha_hidden_mse:g} x hidden MSE ({w.hidden_mse_layers} layers)"
           if w.alpha_hidden_mse else "")
        + (f" + {w.alpha_attn_rel:g} x attention relations ({w.attn_rel_heads} heads, teacher "
           f"layer {cfg.loss.attn_rel_teacher_layer})" if w.alpha_attn_rel else "")
        + f"; masking {cfg.masking.mlm_prob:g}"
        + (f", smoothing {cfg.masking.smoothing:g}" if cfg.masking.smoothing else "")
        + ("; position embeddings frozen" if cfg.student.freeze_position_embeddings else ""))
    say(f"mfu peak: {peak_how}")
    say(f"writing: {run.out / 'config.yaml'}, {run.out / 'metrics.jsonl'}, {run.out / 'tb'}, "
        f"{run.out / 'checkpoints'}, {run.out / 'student'}")
