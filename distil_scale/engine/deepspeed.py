"""DeepSpeed ZeRO 0-3 behind the engine interface, configured by the ``--ds`` JSON.

``deepspeed [--num_gpus N] launch/pretrain.py --ds ds_configs/rtx4070.json``. What the JSON
decides: the ZeRO stage, optimizer/parameter offload, bf16 or fp16 (with dynamic loss scaling),
bucket sizes. What the YAML decides (ds_config.py fills the JSON's ``"auto"`` fields from it and
refuses contradictions): batch sizes, clipping, learning rate, AdamW eps and weight decay. The
schedule is the plain engine's (linear warmup and decay) handed to DeepSpeed as a client
scheduler, so every backend follows the same learning-rate curve.

DeepSpeed counts micro-steps itself: ``backward`` here is DeepSpeed's backward (which scales by
1/accumulation) followed by ``step()``, which only updates at the accumulation boundary; the
trainer's ``step()`` then reports what that boundary did. Only the student is given to
DeepSpeed: the frozen teacher is never partitioned or optimized, it stays replicated.

Checkpoints are DeepSpeed's own (``ds/`` in each step-N directory), one ZeRO optimizer
partition per rank. Resumed by another number of processes, ``ds/`` is converted by DeepSpeed's
``ds_to_universal`` into ``ds_universal/`` beside it (rank 0, once; ``ds/`` stays as written)
and loaded with DeepSpeed's universal loading, which re-partitions it for this world.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import math
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CorruptCheckpoint, verify_archives
from ..config import ConfigError
from ..distributed import ensure_process_group, from_rank0
from ..ds_config import refuse_unimplemented
from ..errors import UserError, first_line, plural
from ..fsio import fsync_dir, fsync_tree
from ..models import rebuild_student
from ..runtime import amp_dtype
from .base import Engine, OptimSpec, StepResult

log = logging.getLogger(__name__)
TAG = "ds"  # DeepSpeed's checkpoint tag inside each step-N directory
# DeepSpeed's world-independent copy of ds/, made beside it when another number of processes
# resumes it (ds/ itself is never changed)
UNIVERSAL = "ds_universal"


def json_precision(ds_config: dict | None) -> str:
    ds = ds_config or {}
    on = [h for h in ("bf16", "fp16") if isinstance(ds.get(h), dict)
          and ds[h].get("enabled") is True]
    if len(on) > 1:
        raise ConfigError("--ds: both bf16 and fp16 are enabled; enable one of them")
    return on[0] if on else "fp32"


def zero_stage(ds_config: dict | None) -> int:
    return int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0))


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    @classmethod
    def resolve_precision(cls, precision: str, device: torch.device,
                          ds_config: dict | None = None) -> str:
        """The JSON's bf16/fp16 sections decide; train.precision may only agree with them."""
        in_json = json_precision(ds_config)
        if precision not in ("auto", in_json):
            raise ConfigError(f"train.precision: {precision} contradicts the DeepSpeed JSON "
                              f"({in_json}); set train.precision=auto to take the JSON's, or "
                              "edit its bf16/fp16 sections")
        if in_json == "fp16" and device.type != "cuda":
            # the V100 profile on a CPU: fp16 matmuls run ~500x slower than bf16 there
            log.warning("fp16 from the DeepSpeed JSON is for CUDA; running bf16 on %s",
                        device.type)
            return "bf16"
        return in_json

    def __init__(self, model: nn.Module, optim: OptimSpec, *, precision: str, accum_steps: int,
                 device: torch.device, compile: bool = False, ds_config: dict | None = None):
        import deepspeed
        from transformers import get_linear_schedule_with_warmup

        if ds_config is None:
            raise ConfigError("parallel.backend: 'deepspeed' needs --ds DS_JSON "
                              "(e.g. --ds ds_configs/rtx4070.json)")
        ds = copy.deepcopy(ds_config)
        if "scheduler" in ds:
            raise ConfigError("--ds: remove the \"scheduler\" section; the schedule comes from "
                              "train.warmup_steps and train.max_steps (linear warmup and decay)")
        self.device = device
        self.precision = precision
        self.accum_steps = accum_steps
        self.max_grad_norm = optim.max_grad_norm
        # the resolved precision is the one DeepSpeed runs (fp16 sections keep their loss
        # scaling settings; on a CPU an fp16 profile runs bf16)
        for half in ("bf16", "fp16"):
            if half in ds or precision == half:
                ds[half] = {**(ds.get(half) or {}), "enabled": precision == half}
        ds.setdefault("optimizer", {"type": "AdamW", "params": {
            "lr": optim.lr, "eps": optim.adam_eps, "weight_decay": optim.weight_decay}})
        ds.setdefault("steps_per_print", 1 << 30)  # the trainer logs; DeepSpeed stays quiet
        refuse_unimplemented(ds)
        self.ds_config = ds

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed's own ZeRO code calls this torch API at every step
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                                category=FutureWarning)
        ensure_process_group(device, deepspeed=True)
        self.raw_module = model.to(device)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.raw_module,
            model_parameters=optim.param_groups(self.raw_module),
            config=ds,
            lr_scheduler=lambda opt: get_linear_schedule_with_warmup(opt, optim.warmup_steps,
                                                                     optim.total_steps))
        if self.ds.gradient_accumulation_steps() != accum_steps:
            raise ConfigError(f"--ds: gradient_accumulation_steps="
                              f"{self.ds.gradient_accumulation_steps()} but the trainer "
                              f"accumulates {accum_steps} micro-batches; set it to \"auto\"")
        autocast_inside(self.raw_module, device, precision)
        if compile:
            self.ds.compile()
        self.module = self.ds
        self.stage = self.ds.zero_optimization_stage()
        if self.stage == 3 and hasattr(self.raw_module, "projection_parameters"):
            # the fused loss reads the output projection inside the student's forward without
            # calling the Linear that owns it, so ZeRO-3's per-module gathering would leave it
            # partitioned there (an empty tensor); registered, it is gathered for the forward
            for p in self.raw_module.projection_parameters():
                deepspeed.zero.register_external_parameter(self.raw_module, p)
        self._skipped = self.ds.skipped_steps
        self._steps = self.ds.global_steps
        self._norm0 = None

    # -- the interface ------------------------------------------------------------------------
    def backward(self, micro_loss: torch.Tensor) -> None:
        self.ds.backward(micro_loss)  # scales by 1/accumulation (and by the fp16 loss scale)
        if self.stage == 0 and self.ds.is_gradient_accumulation_boundary():
            # ZeRO stage 0 keeps no global grad norm (get_global_grad_norm() is None): measure
            # it before the update, or every step would read as non-finite
            self._norm0 = torch.nn.utils.get_total_norm(
                [p.grad for p in self.raw_module.parameters() if p.grad is not None])
        self.ds.step()  # a no-op until the accumulation boundary, the update there

    def step(self) -> StepResult:
        if self.ds.global_steps != self._steps + 1:
            raise RuntimeError(f"deepspeed: {self.ds.global_steps - self._steps} optimizer "
                               f"steps in one trainer step (accumulation {self.accum_steps}); "
                               "the micro-step counts disagree")
        self._steps = self.ds.global_steps
        skipped = self.ds.skipped_steps > self._skipped  # fp16 overflow: DeepSpeed dropped it
        self._skipped = self.ds.skipped_steps
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            norm = self._norm0
        norm = float("nan") if norm is None else float(norm)
        # bf16/fp32 updates are not dropped on a non-finite norm; report it as skipped anyway so
        # that the trainer's max_nonfinite_steps guard stops the run
        return StepResult(norm, skipped or not math.isfinite(norm),
                          scale_backoff=skipped and self._scale_above_floor())

    def _scale_above_floor(self) -> bool:
        """An fp16 overflow skip while the dynamic loss scale can still go down: calibration
        (DeepSpeed starts at 2^initial_scale_power), not divergence."""
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        scale = getattr(scaler, "cur_scale", None)
        if self.precision != "fp16" or scale is None:
            return False
        floor = float((self.ds_config.get("fp16") or {}).get("min_loss_scale", 1))
        return scale > floor

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def loss_scale(self) -> float:
        scale = getattr(getattr(self.ds.optimizer, "loss_scaler", None), "cur_scale", None)
        return 1.0 if scale is None else float(scale)

    def save(self, ckpt_dir: Path) -> None:
        """DeepSpeed's own checkpoint: every rank writes its optimizer partition."""
        self.ds.save_checkpoint(str(ckpt_dir), tag=TAG)

    def check_other_world(self, ckpt_dir: Path, saved_world: int) -> None:
        # ZeRO 1-3 write one optimizer partition per rank: load() converts them to DeepSpeed's
        # universal checkpoint, which any number of ranks re-partitions. Stage 0 has no ZeRO
        # optimizer for that conversion to read
        if self.stage == 0:
            raise UserError(f"--resume: {ckpt_dir} is a DeepSpeed checkpoint of "
                            f"{plural(saved_world, 'process', 'processes')} and this run has "
                            f"{self.world_size}; without ZeRO (zero_optimization.stage 0) this "
                            f"trainer loads it on the same number only: resume with "
                            f"{saved_world}, or write it with ZeRO stage 1-3")

    def load(self, ckpt_dir: Path) -> None:
        # DeepSpeed applies the model states before it reads the optimizer partitions: a
        # damaged partition found there would leave new weights under old moments. Every file
        # is checked first (a collective), so a damaged one changes nothing on any rank
        ckpt_dir = Path(ckpt_dir)
        files = sorted((ckpt_dir / TAG).glob("*.pt"))
        if not any(f.name.endswith("model_states.pt") for f in files):
            raise CorruptCheckpoint(f"{TAG}/: cannot be read (no *model_states.pt in it)")
        verify_archives(ckpt_dir, files)
        saved = sum(f.name.endswith("optim_states.pt") for f in files)  # one per ZeRO rank
        universal = self.stage > 0 and saved != self.world_size
        made = universal and self._universal(ckpt_dir, saved)
        tag = UNIVERSAL if universal else TAG
        # the flag DeepSpeed reads as the config's "checkpoint": {"load_universal": true}; it
        # only steers loading, and goes back so that a later load of ds/ reads it as written.
        # Universal loading warns "MPU is not provided, setting tp size to 1", true of every
        # run here (no tensor parallelism): DeepSpeed's warnings are held back for the load
        ds_log = logging.getLogger("DeepSpeed")
        level = ds_log.level
        self.ds._config.load_universal_checkpoint = universal
        if universal:
            ds_log.setLevel(logging.ERROR)
        try:
            path, _ = self.ds.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        finally:
            self.ds._config.load_universal_checkpoint = False
            ds_log.setLevel(level)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' in {ckpt_dir}")
        if universal:
            unshare_steps(self.ds.optimizer.optimizer)
        if universal and self.rank == 0:
            print(f"resume: {ckpt_dir / TAG} (ZeRO-{self.stage}, written by "
                  f"{plural(saved, 'process', 'processes')}) "
                  f"{'converted' if made else 'already converted'} to DeepSpeed's universal "
                  f"checkpoint {ckpt_dir / UNIVERSAL} and loaded on "
                  f"{plural(self.world_size, 'process', 'processes')}", flush=True)
        self._skipped = self.ds.skipped_steps
        self._steps = self.ds.global_steps

    def _universal(self, ckpt_dir: Path, saved: int) -> bool:
        """Make ``ckpt_dir/ds_universal``, DeepSpeed's universal checkpoint of ``ds/`` (written
        by ``saved`` ranks), on rank 0 while the others wait, unless an earlier resume left it
        (then False). Universal loading restores what the ZeRO optimizer holds (the fp32
        master weights, Adam's moments and step, re-partitioned for this world), the scheduler
        and the counters; a frozen parameter, in no optimizer, keeps the value the student is
        built with (the teacher's copy, or run.seed's draw), the one it was trained with."""
        src, dst = ckpt_dir / TAG, ckpt_dir / UNIVERSAL
        problem, made = None, False
        if self.rank == 0 and not dst.is_dir():
            try:
                convert_to_universal(src, dst)
                made = True
            except Exception as e:  # whatever the converter met: the line says how to retry
                problem = first_line(e, 160, typed=True)
        problem, made = from_rank0((problem, made))
        if problem:
            raise UserError(f"--resume: {ckpt_dir} is a DeepSpeed checkpoint of "
                            f"{plural(saved, 'process', 'processes')} and this run has "
                            f"{self.world_size}; converting it to DeepSpeed's universal "
                            f"checkpoint failed ({problem}); {src} is unchanged: run python -m "
                            f"deepspeed.checkpoint.ds_to_universal --inject_missing_state "
                            f"--input_folder {src} --output_folder {dst} by hand and resume "
                            f"again, or resume with {saved}")
        return made

    def full_state_dict(self) -> dict | None:
        """The fp32 master weights, gathered from their ZeRO partitions (a collective: every
        rank calls it), on rank 0."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.ds.module
        keys = set(module.state_dict().keys())
        full = {}
        for name, p in module.named_parameters():  # a tied weight comes once
            # a frozen parameter (student.freeze_position_embeddings) has no fp32 master in
            # any optimizer: the module's own copy is the weight (gathered under ZeRO-3)
            t = safe_get_full_fp32_param(p) if p.requires_grad else _gathered(p)
            if t is None:  # no ZeRO optimizer owns it (stage 0): the module holds it whole
                t = p.detach()
            if self.rank == 0:
                full[name] = t.detach().float().cpu().clone()
        if self.rank != 0:
            return None
        for name, b in module.named_buffers():
            if name in keys:
                full[name] = b.detach().cpu().clone()
        return full

    def export_module(self) -> nn.Module | None:
        """Rank 0 gets a fresh unwrapped student holding the fp32 master weights."""
        full = self.full_state_dict()
        return None if full is None else rebuild_student(self.ds.module, full)


def convert_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` from ``src`` to ``dst``, all or nothing: written under
    a temporary directory (which also takes the ``latest_universal`` file the converter writes
    beside its output), synced, then renamed to ``dst``."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed conversion left
    out = tmp / dst.name
    # the converter's command-line defaults but: one worker each (its workers would be forked
    # from a rank that holds a process group), and --inject_missing_state: the version record
    # it requires is written by Megatron-style clients, not by DeepSpeed for a plain module
    args = argparse.Namespace(input_folder=str(src), output_folder=str(out),
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    said = io.StringIO()  # its progress lines and bars; a failure is reported by the caller
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal.main(args)
        fsync_tree(out)
        out.rename(dst)
        fsync_dir(dst.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unshare_steps(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's state its own ``step`` tensor. DeepSpeed 0.19.8's ZeRO-3
    universal load puts one step tensor in the state of every sub-group, and AdamW advances
    it in place once per sub-group: with two groups (decay, no decay), resumed at step 3,
    their bias corrections ran at steps 4 and 5, 6 and 7, 8 and 9 instead of 4, 5, 6, and
    every weight was ~1e-4 off the run it continued by step 6 (2 ranks -> 1, measured)."""
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


def autocast_inside(module: nn.Module, device: torch.device, precision: str) -> None:
    """Re-enter the trainer's autocast inside ``module``'s forward.

    DeepSpeed's forward switches an outer ``torch.autocast`` off (its bf16/fp16 modes would run
    the student in pure half precision, LayerNorm, softmax and the loss included), while the
    torch engines keep those in fp32 under autocast. With autocast back on inside, DeepSpeed's
    half weights feed the same fp32 ops, so the backends agree up to the weights' rounding.
    Hooks rather than a wrapper module: parameter names, checkpoints and exports stay as they are.
    """
    dtype = amp_dtype(precision)
    if dtype is None:
        return
    open_ctx: list = []

    def enter(_mod, _args):
        ctx = torch.autocast(device.type, dtype=dtype)
        ctx.__enter__()
        open_ctx.append(ctx)

    def leave(_mod, _args, _out):
        # always_call: an exception in forward must not leave autocast switched on
        if open_ctx:
            open_ctx.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def _gathered(p: torch.Tensor) -> torch.Tensor:
    if not hasattr(p, "ds_id"):
        return p.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([p]):  # a collective: every rank calls it
        return p.detach().clone()
