"""Per-GPU memory plan for a DeepSpeed profile and a YAML config, without a GPU.

``python launch/plan.py --ds ds_configs/rtx4070.json [--config configs/paper.yaml]
--gpu-mem-gib 12`` prints one row per consumer with its arithmetic, DeepSpeed's own estimator
beside the model-state rows, and a last line ``fits`` or ``does not fit`` with the headroom.

Shapes come from configs only (models are built on the meta device: no weights, no download;
well-known hub teachers have their config built in for offline use). Batch sizes go through
the same reconciliation as a run (ds_config.load_ds_config), so a plan can never describe a
batch the run would refuse. Activation sizes follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models"), adapted to DistilBERT's layer.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import torch

from ..assets import CONFIGS
from ..config import ConfigError, load_config
from ..ds_config import load_ds_config
from ..engine.deepspeed import DeepSpeedEngine, zero_stage
from ..errors import UserError, first_line
from ..families import family_of
from ..hub import resolve_model_path
from ..models import count_params, student_config
from ..runtime import fused_chunk_rows, resolve_attention

GiB = 2 ** 30
PAPER = str(CONFIGS / "paper.yaml")
# CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation: not computable, assumed
RESERVE_GIB = 1.0

# configs of common teachers, so that planning needs no network (transformers' BertConfig
# defaults are bert-base-uncased)
KNOWN_TEACHERS = {
    "bert-base-uncased": {},
    "google-bert/bert-base-uncased": {},
    "bert-base-cased": {"vocab_size": 28996},
    "google-bert/bert-base-cased": {"vocab_size": 28996},
    "bert-large-uncased": {"hidden_size": 1024, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "intermediate_size": 4096},
    "google-bert/bert-large-uncased": {"hidden_size": 1024, "num_hidden_layers": 24,
                                       "num_attention_heads": 16, "intermediate_size": 4096},
}


@dataclass
class Row:
    label: str
    nbytes: float
    how: str


@dataclass
class Plan:
    header: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    gpu_bytes: float = 0.0
    total: float = 0.0
    model_state_bytes: float = 0.0
    ds_estimate_gpu: float | None = None
    ds_estimate_cpu: float | None = None

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    def lines(self) -> list[str]:
        out = list(self.header)
        out.append(f"{'per GPU':<42}{'GiB':>8}   arithmetic")
        for r in self.rows:
            out.append(f"  {r.label:<40}{r.nbytes / GiB:>8.3f}   {r.how}")
        out.append(f"  {'total':<40}{self.total / GiB:>8.3f}")
        out.extend(self.notes)
        head = (self.gpu_bytes - self.total) / GiB
        verdict = "fits" if self.fits else "does not fit"
        out.append(f"{verdict}: {self.total / GiB:.2f} GiB of {self.gpu_bytes / GiB:.2f} GiB per "
                   f"GPU, headroom {head:+.2f} GiB")
        return out


def teacher_config(name_or_path: str):
    from transformers import AutoConfig, BertConfig

    if name_or_path in KNOWN_TEACHERS and not os.path.isdir(name_or_path):
        return BertConfig(**KNOWN_TEACHERS[name_or_path])
    path = resolve_model_path(name_or_path, weights=False)  # shapes only
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"teacher.name_or_path: cannot read the config of '{name_or_path}' "
                        f"({first_line(e, 120)}); point it at a local model "
                        "directory") from None


def largest_module_params(model: torch.nn.Module) -> int:
    """The parameters of the largest single parameter-holding module (ZeRO-3 gathers it
    whole)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def _fmt(n: float) -> str:
    return f"{n / 1e6:.2f}M"


@dataclass
class _Shapes:
    """What the rows of a plan read, resolved once from the YAML and the DeepSpeed JSON."""
    gpus: int
    nodes: int
    world: int
    student_name: str
    attn: str
    P: int  # student parameters
    largest: int  # of the largest single module (ZeRO-3 gathers it whole)
    P_t: int  # teacher parameters
    precision: str
    half: bool
    e: int  # bytes of a compute-precision element
    stage: int
    off_opt: bool
    off_par: bool
    pinned: bool
    micro: int
    accum: int
    s: int  # sequence length
    h: int
    f: int  # feed-forward width
    a: int  # attention heads
    L: int
    V: int
    reduce_bucket: float
    gather_bucket: float
    prefetch: float


def _shapes(cfg, ds: dict, gpus: int, nodes: int, tconf) -> _Shapes:
    from transformers import AutoModelForMaskedLM

    attn = resolve_attention(cfg.train.attn_implementation, torch.device("cuda"))
    sconf = student_config(tconf, cfg.student.family, cfg.student.n_layers, cfg.student.dim,
                           cfg.student.dropout, cfg.student.attention_dropout, attn)
    with torch.device("meta"):
        student = family_of(sconf).cls()(sconf)
        P, largest = count_params(student), largest_module_params(student)
        P_t = count_params(AutoModelForMaskedLM.from_config(tconf))
    precision = DeepSpeedEngine.resolve_precision(cfg.train.precision, torch.device("cuda"), ds)
    half = precision in ("bf16", "fp16")
    stage = zero_stage(ds)
    zo = ds.get("zero_optimization") or {}
    return _Shapes(
        gpus=gpus, nodes=nodes, world=gpus * nodes, student_name=type(student).__name__,
        attn=attn, P=P, largest=largest, P_t=P_t, precision=precision, half=half,
        e=2 if half else 4, stage=stage,
        off_opt=(zo.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"),
        off_par=stage == 3 and (zo.get("offload_param") or {}).get("device", "none") in (
            "cpu", "nvme"),
        pinned=bool((zo.get("offload_optimizer") or {}).get("pin_memory")),
        micro=int(ds["train_micro_batch_size_per_gpu"]),
        accum=int(ds["gradient_accumulation_steps"]), s=cfg.data.max_seq_len,
        h=sconf.hidden_size, f=family_of(sconf).ffn_size(sconf), a=sconf.num_attention_heads,
        L=sconf.num_hidden_layers, V=sconf.vocab_size,
        reduce_bucket=float(zo.get("reduce_bucket_size", 5e8)),
        gather_bucket=float(zo.get("allgather_bucket_size", 5e8)),
        prefetch=float(zo.get("stage3_prefetch_bucket_size", 5e7)))


def _header(x: _Shapes, cfg, tconf, gpu_mem_gib: float, config_name: str,
            ds_name: str) -> list[str]:
    return [
        f"memory plan: {ds_name} + {config_name}, {x.gpus} GPU(s) x {x.nodes} node(s) = "
        f"{x.world}, {gpu_mem_gib:g} GiB each",
        f"student {x.student_name}: {x.L} layers, dim {x.h}, ffn {x.f}, {x.a} heads, vocab "
        f"{x.V}: P = {_fmt(x.P)} parameters",
        f"teacher {family_of(tconf).mlm_class}: {tconf.num_hidden_layers} layers, dim "
        f"{tconf.hidden_size}: {_fmt(x.P_t)} parameters, frozen, a replicated "
        f"{'fp32' if cfg.teacher.dtype == 'fp32' else 'half-precision'} copy on every GPU "
        "(never sharded, never in an optimizer)",
        f"run: ZeRO-{x.stage}, {x.precision}, optimizer "
        + (f"offloaded to CPU{' (pinned)' if x.pinned else ''}" if x.off_opt else "on GPU")
        + (", parameters offloaded to CPU" if x.off_par else "")
        + f"; micro batch {x.micro} x seq {x.s}, accumulation {x.accum} x {x.world} GPU(s) = "
        f"global {x.micro * x.accum * x.world}",
    ]


def _model_state_rows(x: _Shapes, ds: dict) -> list[Row]:
    """The student's parameters, gradients, optimizer states and ZeRO buckets."""
    rows: list[Row] = []
    P, e, world, prec = x.P, x.e, x.world, x.precision
    shard = world if x.stage >= 1 else 1
    if x.stage == 3:
        live = x.largest + x.prefetch
        if x.off_par:
            rows.append(Row(f"student parameters ({prec})", live * e,
                            f"on CPU; gathered: largest layer {_fmt(x.largest)} + prefetch "
                            f"bucket {x.prefetch:.1e}, x {e} B"))
        else:
            rows.append(Row(f"student parameters ({prec})", e * P / world + live * e,
                            f"{e} B x P / {world} + gathered (largest layer "
                            f"{_fmt(x.largest)} + prefetch bucket {x.prefetch:.1e}) x {e} B"))
    else:
        rows.append(Row(f"student parameters ({prec})", e * P, f"{e} B x P"))
    # gradients are accumulated over the micro-batches in data_types.grad_accum_dtype (DeepSpeed
    # defaults it to the model's dtype: bf16 sums of 256 micro-batches lose ~1.5 %)
    acc_name = (ds.get("data_types") or {}).get("grad_accum_dtype") or prec
    acc_b = 4 if acc_name == "fp32" else e
    bucket = x.reduce_bucket
    if x.off_opt:
        rows.append(Row(f"student gradients ({prec})", bucket * e,
                        f"reduce bucket {bucket:.1e} x {e} B (moved to CPU as reduced, "
                        f"accumulated there in {acc_name})"))
    elif x.stage >= 2:
        rows.append(Row(f"student gradients (accumulated in {acc_name})",
                        acc_b * P / world + bucket * e,
                        f"{acc_b} B x P / {world} + reduce bucket {bucket:.1e} x {e} B"))
    else:
        rows.append(Row(f"student gradients (accumulated in {acc_name})", acc_b * P,
                        f"{acc_b} B x P"))
    # AdamW m and v in fp32; mixed precision adds the fp32 master copy and fp32 gradients
    opt_b = 16 if x.half else 8
    opt_how = ("fp32 master 4 + m 4 + v 4 + fp32 grads 4 = 16 B" if x.half else
               "m 4 + v 4 = 8 B")
    if x.half and acc_b == 4 and x.stage >= 2 and not x.off_opt:
        # the fp32 accumulation partition above is the gradient the optimizer steps with
        opt_b, opt_how = 12, "fp32 master 4 + m 4 + v 4 = 12 B (fp32 grads: the row above)"
    per = f" / {shard}" if shard > 1 else ""
    if x.off_opt:
        rows.append(Row("optimizer states", 0.0, f"on CPU: {opt_how} x P{per}"
                        f" = {opt_b * P / shard / GiB:.2f} GiB per GPU process"
                        + (" (pinned)" if x.pinned else "")))
    else:
        rows.append(Row("optimizer states", opt_b * P / shard, f"{opt_how} x P{per}"))
    if x.stage in (1, 2):
        rows.append(Row("ZeRO all-gather bucket", x.gather_bucket * e,
                        f"allgather bucket {x.gather_bucket:.1e} x {e} B"))
    return rows


def _activation_rows(x: _Shapes, cfg) -> list[Row]:
    """The student's activations kept for backward and the loss inputs."""
    s, b, h, f, a, L, V, e = x.s, x.micro, x.h, x.f, x.a, x.L, x.V, x.e
    sbh, sbf, as2b = s * b * h, s * b * f, a * s * s * b
    drop, adrop = cfg.student.dropout > 0, cfg.student.attention_dropout > 0
    if x.attn == "eager":
        attn_el, attn_how = (2 if adrop else 1) * as2b, f"{2 if adrop else 1}as^2b"
        masks = (as2b if adrop else 0) + (2 * sbh if drop else 0)
    else:  # SDPA kernels keep the output and a log-sum-exp, not the s x s scores
        attn_el, attn_how = sbh + a * s * b * 2, "sbh + 2asb (SDPA)"
        masks = 2 * sbh if drop else 0
    per_layer = (8 * sbh + 2 * sbf + attn_el) * e + masks
    emb = sbh * e + (sbh if drop else 0)
    rows = [Row(f"activations ({L} layers, {x.attn})", L * per_layer + emb,
                f"L x [(8sbh + 2sbf + {attn_how}) x {e} B + dropout masks 1 B] + "
                f"embeddings; s={s} b={b} h={h} f={f} a={a}")]
    # -- vocabulary logits at the selected positions
    frac = 1.0 if cfg.loss.kl_positions == "all" else cfg.masking.mlm_prob
    n_sel = int(round(b * s * frac))
    if cfg.loss.fused and cfg.loss.alpha_mse == 0:
        # measured with tools.memory.LiveStorage (launch/bench.py prints it at 8192 rows):
        # 13.2 B per element of one chunk (fp32 student and teacher logits, two fp32
        # log-softmaxes, p_t, the chunk's gradient) + the fp32 gradient accumulators of the
        # weight and the rows + the projection weights cast to the compute dtype
        chunk = min(fused_chunk_rows(cfg.loss.fused_chunk_rows, torch.device("cuda")), n_sel)
        cast = 2 * 2 * V * h if x.half else 0
        rows.append(Row("vocabulary loss (fused, chunked)",
                        14 * chunk * V + 4 * V * h + 4 * n_sel * h + cast,
                        "14 B x chunk x V + 4 B x V x h + 4 B x n_sel x h"
                        + (" + 2 x 2 B x V x h" if x.half else "")
                        + f"; chunk = {chunk} of n_sel = {b} x {s} x {frac:g} = {n_sel} rows "
                        "(never a full n_sel x V tensor: loss.fused)"))
    else:
        lb = 28 if x.half else 36
        rows.append(Row("vocabulary logits", n_sel * V * lb,
                        f"n_sel x V x {lb} B; n_sel = {b} x {s} x {frac:g} = {n_sel} positions "
                        "(student logits + two fp32 log-softmaxes + a transient, teacher "
                        "logits + its log-softmax, logit gradients; loss.fused=false)"))
    rows.append(Row("hidden-state loss inputs (cos)", 12 * sbh,
                    "3 fp32 copies of s x b x h (student, teacher, gradient)"))
    return rows


def _teacher_rows(x: _Shapes, cfg, tconf) -> list[Row]:
    te = 4 if cfg.teacher.dtype == "fp32" else 2  # auto: bf16 on CUDA (fp16 in fp16 runs)
    s, b = x.s, x.micro
    tsbh, tsbf = s * b * tconf.hidden_size, s * b * family_of(tconf).ffn_size(tconf)
    t_attn = x.a * s * s * b * te if x.attn == "eager" else 0
    return [Row(f"teacher weights ({'fp16/bf16' if te == 2 else 'fp32'})", te * x.P_t,
                f"{te} B x {_fmt(x.P_t)}"),
            Row("teacher forward (inference)", (6 * tsbh + tsbf) * te + t_attn + tsbh * te,
                f"(6sbh + sbf{' + as^2b' if x.attn == 'eager' else ''}) x {te} B: the one "
                "layer being computed + the kept last hidden state"),
            Row("CUDA context + allocator reserve", RESERVE_GIB * GiB, "assumed")]


def _add_deepspeed_estimate(plan: Plan, x: _Shapes) -> None:
    """DeepSpeed's own model-state estimators, beside ours."""
    try:
        if x.stage in (1, 2):
            from deepspeed.runtime.zero.stage_1_and_2 import \
                estimate_zero2_model_states_mem_needs as est2

            cpu, gpu = est2(x.P, x.gpus, x.nodes, cpu_offload=x.off_opt)
            plan.ds_estimate_gpu, plan.ds_estimate_cpu = gpu, cpu
            name = "estimate_zero2_model_states_mem_needs"
        elif x.stage == 3:
            from deepspeed.runtime.zero.stage3 import \
                estimate_zero3_model_states_mem_needs as est3

            cpu, gpu, _ = est3(x.P, x.largest, x.gpus, x.nodes, cpu_offload=x.off_opt,
                               cpu_offload_params=x.off_par, zero_init=False)
            plan.ds_estimate_gpu, plan.ds_estimate_cpu = gpu, cpu
            name = "estimate_zero3_model_states_mem_needs"
        if plan.ds_estimate_gpu is not None:
            plan.notes.append(
                f"  DeepSpeed {name}(P={_fmt(x.P)}): model states GPU "
                f"{plan.ds_estimate_gpu / GiB:.3f} GiB, CPU {plan.ds_estimate_cpu / GiB:.2f} GiB "
                f"(ours above, with buckets: {plan.model_state_bytes / GiB:.3f} GiB)")
    except ImportError:
        plan.notes.append("  (deepspeed not installed: its estimators were skipped)")


def make_plan(cfg, ds: dict, *, gpus: int, nodes: int, gpu_mem_gib: float,
              config_name: str = "", ds_name: str = "") -> Plan:
    tconf = teacher_config(cfg.teacher.name_or_path)
    x = _shapes(cfg, ds, gpus, nodes, tconf)
    states = _model_state_rows(x, ds)
    rows = states + _activation_rows(x, cfg) + _teacher_rows(x, cfg, tconf)
    plan = Plan(_header(x, cfg, tconf, gpu_mem_gib, config_name, ds_name), rows,
                gpu_bytes=gpu_mem_gib * GiB, model_state_bytes=sum(r.nbytes for r in states))
    plan.total = sum(r.nbytes for r in rows)
    _add_deepspeed_estimate(plan, x)
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="launch/plan.py",
        description="Per-GPU memory plan of a DeepSpeed profile with a YAML config; the last "
                    "line says 'fits' or 'does not fit' (exit code 0 or 1).")
    p.add_argument("--ds", required=True, help="DeepSpeed JSON (ds_configs/*.json)")
    p.add_argument("--config", help="YAML config (default: configs/paper.yaml, the paper's "
                                    "6-layer student and bert-base-uncased teacher)")
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory of one GPU")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.micro_batch=32")
    args = p.parse_intermixed_args(argv)  # flags may sit between the overrides
    if args.gpus < 1 or args.nodes < 1:
        raise ConfigError("--gpus and --nodes must be >= 1")
    if not args.gpu_mem_gib > 0:
        raise ConfigError(f"--gpu-mem-gib: {args.gpu_mem_gib:g}; give one GPU's memory in GiB, "
                          "e.g. --gpu-mem-gib 12")
    config = args.config or PAPER
    cfg = load_config(config, args.overrides)
    ds = load_ds_config(args.ds, cfg, args.gpus * args.nodes)
    plan = make_plan(cfg, ds, gpus=args.gpus, nodes=args.nodes, gpu_mem_gib=args.gpu_mem_gib,
                     config_name=os.path.relpath(config) if os.path.isabs(config) else config,
                     ds_name=args.ds)
    print("\n".join(plan.lines()), flush=True)
    return 0 if plan.fits else 1
