"""The pretraining loop: build, resume, step until done, export. Read it in one sitting.

source -> pack -> mask -> engine.module (student) + frozen teacher -> triple loss -> step.
"""
from __future__ import annotations

import math
import shutil
import signal
import sys
import time

import torch

from .. import distributed
from ..config import Config, dump_yaml
from ..data.stream import StreamError
from ..distributed import barrier
from ..fsio import replace_dir
from ..metrics import console_line, peak_memory_gib
from ..model_card import write_card
from .setup import Run, build, start
from .step import StepOutcome, Window, mean_over_ranks, train_step


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged, source dead); the message says what to do."""


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False,
          ds_config: dict | None = None, resume_command: str = "") -> dict:
    t_start = time.time()
    run = build(cfg, resume=resume, overwrite=overwrite, ds_config=ds_config)
    try:
        return _train(run, t_start, resume_command)
    finally:
        if run.lock:
            run.lock.release()


def _train(run: Run, t_start: float, resume_command: str) -> dict:
    cfg = run.cfg
    if run.resuming:
        run.resume()
    start(run)
    state, t = run.state, cfg.train
    start_step = state.step
    if start_step == 0:
        state.counters["acc_start"] = run.evaluate(0)["eval/student_mlm_acc"]
    again = resume_command or "the same command plus --resume"
    window, last_eval = Window(), None
    bar = progress_bar(run, start_step)
    run.engine.module.train()
    state.start_generators(cfg.run.seed, run.rt.rank)  # nothing draws from here to step one
    try:
        with Preemption() as pre:
            stop = Stop(pre, t_start, t.max_wall_minutes)
            while state.step < t.max_steps:
                step_start, t0 = run.loader.mark(), time.perf_counter()
                state.mark_step_start()
                out = train_step(run.engine, lambda: next_batch(run, stop), run.rt.accum,
                                 run.micro_loss, agree=stop)
                if out is None:  # every rank stopped at the same micro-batch
                    return stop_early(run, stop, step_start, again)
                if state.count_step(out, t.global_batch) >= t.max_nonfinite_steps:
                    good = run.ckpts.complete()
                    raise TrainingError(
                        f"{state.counters['nonfinite_run']} non-finite steps in a row at step "
                        f"{state.step}; lower train.lr or check the data; "
                        + (f"last good checkpoint: {good[0]}" if good else
                           "no checkpoint was written yet"))
                window.add(out, time.perf_counter() - t0)
                bar.update(1)
                step, last = state.step, state.step == t.max_steps
                if step % t.log_every == 0 or last:
                    log_window(run, window, out, bar)
                if step % t.eval_every == 0 or last:
                    last_eval = run.evaluate(step)
                if step % cfg.checkpoint.every_steps == 0 or last:
                    run.save_checkpoint()
    finally:
        bar.close()
        run.loader.close()
    return export(run, last_eval or run.evaluate(state.step), window.last, start_step,
                  time.time() - t_start)


class Stop:
    """Why a run stops before train.max_steps: this rank's dead stream, a signal (SIGTERM,
    SIGUSR1, SIGINT), train.max_wall_minutes. Agreed at every micro-batch (``train_step``
    posts before the forward, reads after the backward), so a preemption saves within one
    micro-batch even with a long accumulation, and a dead stream on one rank never leaves the
    others waiting in a collective."""

    def __init__(self, pre: "Preemption", t_start: float, max_wall_minutes: float):
        self.pre = pre
        self.failure = ""
        self.deadline = t_start + 60 * max_wall_minutes if max_wall_minutes else math.inf
        self.max_wall_minutes = max_wall_minutes
        self.agreed = [0, 0, 0]  # (a dead stream, a signal, the wall clock) on any rank
        self._agreement = distributed.Agreement()

    def post(self) -> None:
        self._agreement.post([int(bool(self.failure)), int(self.pre.flag),
                              int(time.time() > self.deadline)])

    def stopped(self) -> bool:
        self.agreed = self._agreement.result()
        return any(self.agreed)


def next_batch(run: Run, stop: Stop):
    """The next micro-batch. A dead stream is flagged for the agreement and a held-out batch
    stands in, so this rank still runs the micro-batch's collectives; the step is then
    abandoned by every rank."""
    try:
        return next(run.loader)
    except StreamError as e:
        stop.failure = str(e)
        return run.eval_batches[0]


def stop_early(run: Run, stop: Stop, step_start: int, again: str) -> dict:
    """Checkpoint the start of the abandoned step (its micro-batches are read again on
    resume), unless the checkpoint of that point was just written."""
    step = run.state.step
    if run.saved_at != step:
        run.save_checkpoint(data_at=step_start)
    dead, signalled, _ = stop.agreed
    if dead:
        raise TrainingError(f"{stop.failure or 'the data source failed on another rank'}; "
                            f"checkpoint saved at step {step}, resume with {again}")
    why = ("preempted" if signalled else
           f"train.max_wall_minutes={stop.max_wall_minutes:g} reached")
    run.rt.say(f"{why}: checkpoint saved at step {step}; resume with {again}")
    if run.rt.world > 1:  # each rank says it stopped cleanly: a rank that does not is the one to look at
        print(f"{distributed.who()}: stopped at step {step}, exit 0", flush=True)
    return {"preempted": True, "step": step}


def log_window(run: Run, w: Window, out: StepOutcome, bar) -> None:
    cfg, rt, c = run.cfg, run.rt, run.state.counters
    vals = {f"loss/{k}": v / w.steps for k, v in mean_over_ranks(w.terms).items()}
    for k in list(vals):
        alpha = getattr(run.weights, f"alpha_{k[5:]}", None)
        if alpha is not None:
            vals[f"{k}_weighted"] = vals[k] * alpha
    step_s = w.seconds / w.steps
    fastest, slowest = distributed.min_max(step_s)  # a straggler shows as a wide gap
    tps = cfg.train.global_batch * cfg.data.max_seq_len / step_s
    vals.update({
        "optim/lr": run.engine.lr(), "optim/grad_norm": float(out.result.grad_norm),
        "optim/skipped_steps": c["skipped_total"], "data/sequences": c["sequences"],
        "data/epoch": run.loader.epoch, "perf/step_s": step_s, "perf/tokens_per_s": tps,
        "perf/step_s_min_rank": fastest, "perf/step_s_max_rank": slowest,
        "perf/mfu": tps * run.flops_per_token / (run.peak_flops * rt.world),
        "perf/data_wait_pct": 100.0 * w.wait / w.seconds,
        "mem/peak_gib": peak_memory_gib(rt.device)})
    if rt.device.type == "cuda":
        # what the caching allocator holds: the figure a memory cap or an OOM is about
        vals["mem/reserved_gib"] = torch.cuda.max_memory_reserved(rt.device) / 2**30
    if rt.precision == "fp16":
        vals["optim/loss_scale"] = run.engine.loss_scale()
    step = run.state.step
    run.metrics.log(step, vals)
    if rt.is_main:
        bar.write(console_line(step, cfg.train.max_steps, vals))
    bar.set_postfix(loss=f"{vals['loss/total']:.3f}")
    w.last = {"losses": {k: v for k, v in vals.items() if k.startswith("loss/")},
              "loss_window": [step - w.steps + 1, step]}
    w.reset()


def progress_bar(run: Run, start_step: int):
    from tqdm.auto import tqdm

    return tqdm(total=run.cfg.train.max_steps, initial=start_step, unit="step",
                dynamic_ncols=True, file=sys.stdout,
                disable=not (run.rt.is_main and run.cfg.metrics.progress_bar
                             and sys.stdout.isatty()))


class Preemption:
    """SIGTERM, SIGUSR1 (SLURM's ``--signal``) and SIGINT set a flag; the loop checkpoints the
    start of the current step and exits 0."""

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C really stops
        self.flag = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def export(run: Run, last_eval: dict, last_log: dict, start_step: int, wall_s: float) -> dict:
    """The student as a stock ``*ForMaskedLM`` with its tokenizer, model card and config."""
    cfg, rt, c = run.cfg, run.rt, run.state.counters
    export_dir = run.out / "student"
    # written whole under a temporary name, then renamed: a kill never leaves a student/ that
    # loads with a missing tokenizer or card
    tmp_dir = run.out / "student.tmp"
    full = run.engine.export_module()  # a collective on sharded engines: every rank calls it
    if rt.is_main and full is not None:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir(parents=True)
        full.mlm.save_pretrained(tmp_dir)
        run.tokenizer.save_pretrained(tmp_dir)
    acc_end, t_acc = last_eval["eval/student_mlm_acc"], run.teacher_eval[1]
    summary = {"steps": run.state.step, "wall_s": wall_s, "acc_start": c["acc_start"],
               "acc_end": acc_end, "teacher_acc": t_acc, "teacher": run.teacher_info,
               "export": str(export_dir)}
    began = f"{c['acc_start']:.1%} -> " if c["acc_start"] is not None else ""
    rt.say(f"done: student held-out masked-token accuracy {began}{acc_end:.1%} "
           f"(teacher {t_acc:.1%}) in {wall_s:.0f}s")
    if rt.is_main and full is not None:
        dump_yaml(cfg, tmp_dir / "training_args.yaml")
        write_card(tmp_dir, cfg, {
            **summary, **last_log, "start_step": start_step, "layers": run.layer_map,
            "n_layers": len(run.layer_map), "dim": full.mlm.config.hidden_size,
            "arch": type(full.mlm).__name__,
            "params": run.n_params, "precision": rt.precision, "backend": run.engine.name,
            "world": rt.world, "accum": rt.accum, "export_dir": str(export_dir)})
        replace_dir(tmp_dir, export_dir)
    barrier()
    rt.say(f"export: {export_dir} ({type(run.student_mlm).__name__}.from_pretrained / "
           "pipeline('fill-mask'); model card README.md, training_args.yaml)")
    run.metrics.close()
    return summary
