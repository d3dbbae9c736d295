"""Fine-tune (or task-distil) one model on one GLUE task: the training loop and the seeds; the
``finetune`` entry point.

One loop serves both launchers; only the loss differs (:class:`FinetuneLoss` / the task
distillation loss in :mod:`distil_scale.glue.distill`). Under ``torchrun`` the student is wrapped
in DDP on gloo (CPU) or NCCL (CUDA) and the training set is split with a DistributedSampler;
scoring is in :mod:`.scoring`, the batches in :mod:`.batches`, the output directory (checked,
locked, written by rank 0 only) in :mod:`.rundir`.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from ..distributed import from_rank0
from ..ds_config import reconcile
from ..engine import OptimSpec, make_engine
from ..engine.deepspeed import zero_stage
from ..errors import UserError
from ..hub import load_tokenizer, resolve_model_path
from ..metrics import MetricsLogger
from ..train.step import Window, mean_over_ranks, nonfinite_run, train_step
from . import metrics as M
from .batches import encode, make_collate, model_inputs
from .config import GlueConfig
from .data import Splits, load_raw, make_splits
from .modeling import check_encoder, load_for_finetune
from .rundir import claimed_runtime, default_out_dir, save_run, start_output_dir, write_results
from .scoring import fmt_metrics, score
from .tasks import Task


class FinetuneLoss:
    """Cross-entropy (MSE for STS-B) against the gold labels: the model's own ``loss``."""

    def __call__(self, model, batch: dict):
        out = model(**model_inputs(model, batch))
        return out.loss, {"task": out.loss.detach()}


@dataclass
class Prepared:
    """What a run needs besides the model: the task, splits, tokenizer, output directory."""

    task: Task
    splits: Splits
    tokenizer: object
    model_name: str
    out_dir: Path
    backend: str = "plain"         # the engine (runtime-resolved parallel.backend)
    ds: Optional[dict] = None      # the DeepSpeed JSON, read (backend deepspeed)


def prepare_data(task: Task, cfg: GlueConfig) -> Splits:
    raw = load_raw(task, cfg.data.data_dir)
    return make_splits(task, raw, cfg.run.protocol, carve_seed=cfg.data.carve_seed,
                       max_train_samples=cfg.data.max_train_samples,
                       max_eval_samples=cfg.data.max_eval_samples,
                       sample_seed=cfg.data.sample_seed)


def glue_engine(prep: Prepared, cfg: GlueConfig, model, total_steps: int, rt):
    """The pretraining engines, for fine-tuning: every backend, precision (with fp16 loss
    scaling) and the non-finite guard reach GLUE runs too."""
    tc = cfg.train
    kw = {}
    if prep.ds is not None:
        path = cfg.parallel.ds_config
        ds = reconcile(copy.deepcopy(prep.ds), path, micro=tc.batch_size // rt.world,
                       glob=tc.batch_size, world=rt.world, max_grad_norm=tc.max_grad_norm,
                       lr=tc.lr, weight_decay=tc.weight_decay, eps=tc.adam_eps,
                       precision=tc.precision)
        if zero_stage(ds) > 2:
            # the best epoch's weights are kept and scored whole; ZeRO-3 leaves each rank a
            # shard, and a GLUE model fits on one device anyway
            raise UserError(f"parallel.ds_config: '{path}' uses ZeRO-3; fine-tuning takes "
                            "stages 0-2 (e.g. ds_configs/cpu.json or rtx4070.json)")
        kw["ds_config"] = ds
    optim = OptimSpec(lr=tc.lr, total_steps=total_steps,
                      warmup_steps=int(tc.warmup_ratio * total_steps),
                      weight_decay=tc.weight_decay, adam_eps=tc.adam_eps,
                      max_grad_norm=tc.max_grad_norm)
    return make_engine(prep.backend, model, optim, precision=rt.precision, accum_steps=1,
                       device=rt.device, **kw)


@dataclass
class Encoded:
    """A run's splits as model inputs, and the majority-class baselines beside them."""

    train: list
    select: list
    report: dict
    baseline: dict         # per reported split and metric
    baseline_select: dict  # on the selection split

    @classmethod
    def of(cls, prep: Prepared, cfg: GlueConfig) -> "Encoded":
        task, splits, n = prep.task, prep.splits, cfg.data.max_length
        train_labels = [e.label for e in splits.train]
        baseline = {}
        for k, v in splits.report.items():
            baseline.update(M.majority_baseline(task, train_labels, k, [e.label for e in v]))
        return cls(encode(prep.tokenizer, splits.train, n),
                   encode(prep.tokenizer, splits.select, n),
                   {k: encode(prep.tokenizer, v, n) for k, v in splits.report.items()}, baseline,
                   M.majority_baseline(task, train_labels, "dev",
                                       [e.label for e in splits.select]))


class Steps:
    """The optimizer steps of one seed: counted, guarded against divergence, logged every 10
    under the pretraining loop's metric names."""

    def __init__(self, engine, loss_fn, cfg: GlueConfig, d, metrics):
        self.engine, self.loss_fn, self.d, self.metrics = engine, loss_fn, d, metrics
        self.limit = cfg.train.max_nonfinite_steps
        self.step, self.nonfinite, self.window = 0, 0, Window()

    def __call__(self, batch: dict):
        t0 = time.perf_counter()
        out = train_step(self.engine, lambda: batch, 1, self.loss_fn)
        self.step += 1
        self.nonfinite = nonfinite_run(out, self.nonfinite)
        if self.nonfinite >= self.limit:
            raise UserError(f"train.lr: {self.nonfinite} non-finite steps in a row at step "
                            f"{self.step}; lower train.lr (or use train.precision=fp32)")
        w = self.window
        w.add(out, time.perf_counter() - t0)
        if self.step % 10 == 0:
            vals = {f"loss/{k}": v / w.steps for k, v in mean_over_ranks(w.terms).items()}
            vals.update({"optim/lr": self.engine.lr(),
                         "optim/grad_norm": float(out.result.grad_norm),
                         "perf/step_s": w.seconds / w.steps})
            self.metrics.log(self.step, vals)
            w.reset()
        return out.loss


def train_epoch(steps: Steps, loader, epoch: int, cfg: GlueConfig) -> float:
    """One pass over the training split; the mean training loss over every rank."""

    d = steps.d
    # summed on the device; .item() only at the log interval (it syncs a GPU)
    loss_sum, n = torch.zeros((), dtype=torch.float64, device=d.device), 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False, mininterval=2.0,
               dynamic_ncols=True, disable=not (d.is_main and cfg.train.progress_bar),
               file=sys.stderr)
    for batch in bar:
        loss_sum += steps({k: v.to(d.device) for k, v in batch.items()}).double()
        n += 1
        if steps.step % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / n:.4f}")
    bar.close()
    if d.world > 1:
        torch.distributed.all_reduce(loss_sum)
        n *= d.world
    return loss_sum.item() / max(n, 1)


def train_one(prep: Prepared, cfg: GlueConfig, seed: int, out_dir: Path,
              build_model: Callable[[int], tuple], loss_fn, d,
              extra: Optional[dict] = None) -> dict:
    """Train with ``seed`` on the engine; select the best epoch on the selection split; report;
    write ``results.json``, metrics.jsonl and TensorBoard events (rank 0).
    ``build_model(seed)`` returns (model, description dict)."""
    task, splits, tc = prep.task, prep.splits, cfg.train
    t0 = time.time()
    torch.manual_seed(seed)
    model, model_info = build_model(seed)
    pristine = copy.deepcopy(model)  # receives the best epoch's weights for the final scores
    collate = make_collate(prep.tokenizer.pad_token_id or 0, task.is_regression)
    rows = Encoded.of(prep, cfg)
    if tc.batch_size % d.world:
        raise UserError(f"train.batch_size: {tc.batch_size} does not split over {d.world} ranks")
    sampler = DistributedSampler(rows.train, num_replicas=d.world, rank=d.rank, shuffle=True,
                                 seed=seed)
    loader = DataLoader(rows.train, batch_size=tc.batch_size // d.world, sampler=sampler,
                        collate_fn=collate)
    engine = glue_engine(prep, cfg, model, len(loader) * tc.epochs, d)
    metrics = MetricsLogger(out_dir, enabled=d.is_main, tensorboard=tc.tensorboard)
    steps = Steps(engine, loss_fn, cfg, d, metrics)
    sizes = [f"train {len(rows.train)} (of {splits.train_total})",
             f"{splits.select_name} {len(rows.select)}"]
    sizes += [f"{k} {len(v)}" for k, v in rows.report.items() if k != splits.select_name]
    d.say(f"{task.name}: " + "  ".join(sizes) + f"  | {len(loader)} steps/epoch x "
          f"{tc.epochs}  batch {tc.batch_size}" + (f" ({d.world} ranks)" if d.world > 1 else "")
          + f"  seed {seed}  {engine.name} {d.precision}")
    history, best, best_state = [], None, None
    engine.module.train()
    for epoch in range(1, tc.epochs + 1):
        sampler.set_epoch(epoch)
        train_loss = train_epoch(steps, loader, epoch, cfg)
        sel = score(task, "dev", engine.module, rows.select, collate, d, cfg)
        metrics.log(steps.step, {"train/epoch_loss": train_loss,
                                 **{f"eval/{splits.select_name}_{k}": v for k, v in sel.items()}})
        history.append({"epoch": epoch, "train_loss": train_loss, splits.select_name: sel})
        d.say(f"epoch {epoch}/{tc.epochs}  train_loss {train_loss:.3f}  {splits.select_name} "
              f"{fmt_metrics({task.main_metric: sel[task.main_metric]}, rows.baseline_select)}"
              + (f"  {fmt_metrics({k: v for k, v in sel.items() if k != task.main_metric})}"
                 if len(sel) > 1 else "") + f"  [{time.time() - t0:.0f} s]")
        # every rank sees the same gathered score, so every rank takes this branch
        if best is None or sel[task.main_metric] > best[task.main_metric]:
            best, best_epoch = sel, epoch
            best_state = engine.full_state_dict()  # a collective on sharded engines
    metrics.close()

    model = pristine
    model.load_state_dict(from_rank0(best_state))
    model.to(d.device)
    results_metrics = {}
    for name, split_rows in rows.report.items():
        results_metrics.update(best if name == splits.select_name
                               else score(task, name, model, split_rows, collate, d, cfg))
    wall = time.time() - t0
    result = {
        "task": task.name, "protocol": cfg.run.protocol, "metrics": results_metrics,
        "main_metric": task.main_metric, "majority_baseline": rows.baseline, "seed": seed,
        "model": prep.model_name, "steps": steps.step, "wall_s": round(wall, 2),
        "best_epoch": best_epoch, "epochs": history, "select_split": splits.select_name,
        "report_splits": {k: len(v) for k, v in rows.report.items()},
        "train_examples": len(rows.train), "train_total": splits.train_total,
        "world_size": d.world, "backend": engine.name, "precision": d.precision,
        "data": cfg.data.data_dir or "hub:nyu-mll/glue", "model_info": model_info,
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "device": str(d.device), "cpu_count": os.cpu_count()},
        **(extra or {}),
    }
    d.say(f"{task.name} {cfg.run.protocol} seed {seed}: "
          f"{fmt_metrics(results_metrics, rows.baseline)}  best epoch {best_epoch}  "
          f"{steps.step} steps  {wall:.1f} s")
    if d.is_main:
        save_run(out_dir, result, model, prep, cfg)
    if d.world > 1:
        torch.distributed.barrier()
    return result


def run_seeds(prep: Prepared, cfg: GlueConfig, build_model, loss_fn, d,
              extra: Optional[dict] = None) -> dict:
    """One run, or ``run.seeds`` runs (seed, seed+1, ...) summarised by the median."""
    start_output_dir(prep, cfg, (extra or {}).get("mode", "finetune"), d)
    if cfg.run.seeds == 1:
        return train_one(prep, cfg, cfg.run.seed, prep.out_dir, build_model, loss_fn, d, extra)
    runs = []
    t0 = time.time()
    for i in range(cfg.run.seeds):
        s = cfg.run.seed + i
        runs.append(train_one(prep, cfg, s, prep.out_dir / f"seed_{s}", build_model, loss_fn, d,
                              extra))
    median = {k: statistics.median(r["metrics"][k] for r in runs) for k in runs[0]["metrics"]}
    summary = {
        "task": prep.task.name,
        "protocol": cfg.run.protocol,
        "metrics": median,
        "main_metric": prep.task.main_metric,
        "majority_baseline": runs[0]["majority_baseline"],
        "seed": [r["seed"] for r in runs],
        "model": prep.model_name,
        "steps": runs[0]["steps"],
        "wall_s": round(time.time() - t0, 2),
        "seeds": [{"seed": r["seed"], "metrics": r["metrics"], "best_epoch": r["best_epoch"],
                   "steps": r["steps"], "wall_s": r["wall_s"]} for r in runs],
        "median": median,
        "world_size": d.world,
        "data": runs[0]["data"],
        **(extra or {}),
    }
    d.say(f"{prep.task.name} median of {len(runs)} seeds: "
          f"{fmt_metrics(median, summary['majority_baseline'])}")
    if d.is_main:
        write_results(prep.out_dir, summary)
    return summary


# ----------------------------------------------------------------------------------------------
# the fine-tune entry point


def finetune(task: Task, model_spec: str, cfg: GlueConfig) -> dict:
    out_dir = Path(cfg.run.output_dir) if cfg.run.output_dir else \
        default_out_dir(task, model_spec)
    with claimed_runtime(cfg, out_dir, task, "finetune") as (d, backend, ds):
        splits = prepare_data(task, cfg)          # bad data is refused before any model loads
        path = resolve_model_path(model_spec, "--model")
        check_encoder(path, "--model")  # before its tokenizer: a GPT-2 directory may have none
        tokenizer = load_tokenizer(path, "--model", fast=False)
        prep = Prepared(task, splits, tokenizer, model_spec, out_dir, backend, ds)

        def build(seed: int):
            model, new = load_for_finetune(path, task)
            if new:
                d.say(f"{model_spec}: newly initialised head weights: {', '.join(new)}")
            return model, {"class": type(model).__name__, "new_weights": new,
                           "params": sum(p.numel() for p in model.parameters())}

        return run_seeds(prep, cfg, build, FinetuneLoss(), d, {"mode": "finetune"})
