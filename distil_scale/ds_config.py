"""The DeepSpeed JSON, reconciled with the YAML: batch sizes, clipping and learning rate are
stated once. ``"auto"`` fields are filled from the config; an explicit value that contradicts
it is a one-line error rather than a silently different run. Keys are checked against
DeepSpeed's own config parser before the run starts: a misspelt key, at the top or inside a
section, is one line naming it."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from .config import ConfigError
from .runtime import accumulation, resolve_precision


def load_ds_config(path: str, cfg, world: int) -> dict:
    """The pretraining config's --ds JSON."""
    t = cfg.train
    return reconcile(read_ds_json(path), path, micro=t.micro_batch, glob=t.global_batch,
                     world=world, max_grad_norm=t.max_grad_norm, lr=t.lr,
                     weight_decay=t.weight_decay, eps=t.adam_eps, precision=t.precision)


def read_ds_json(path: str, flag: str = "--ds") -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag}: no such file '{path}'")
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag}: '{path}' is not valid JSON ({e}); fix the file") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{flag}: '{path}' must hold a JSON object")
    check_schema(ds, path, flag)
    return ds


class _Seen(dict):
    """The JSON's top level, remembering which keys DeepSpeed's parser asked for."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.seen: list[str] = []

    def get(self, key, *default):
        self.seen.append(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.seen.append(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.append(key)
        return super().__contains__(key)


def check_schema(ds: dict, path: str, flag: str = "--ds") -> None:
    """Run DeepSpeed's own parser (``DeepSpeedConfig._initialize_params``: every section's
    pydantic model, no process group needed) over the JSON. A top-level key it never reads is
    unknown to it, and would otherwise be ignored (``zero_optimisation``: silently stage 0)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    seen = _Seen(ds)
    parser = object.__new__(DeepSpeedConfig)  # __init__ wants the world size; parsing does not
    try:
        parser._initialize_params(seen)
    except ValidationError as e:
        err = e.errors()[0]
        section = next((k for k in reversed(seen.seen) if isinstance(ds.get(k), dict)), "")
        key = ".".join([section, *map(str, err["loc"])] if section else map(str, err["loc"]))
        what = ("is not a DeepSpeed key" if err["type"] == "extra_forbidden"
                else f"is invalid: {err['msg'][:120]} (got {err.get('input')!r:.40})")
        raise ConfigError(f"{flag}: '{key}' in '{path}' {what}; fix or remove it (see "
                          "DeepSpeed's config documentation)") from None
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{flag}: '{path}' is refused by DeepSpeed ({first}); fix the "
                          "file") from None
    unknown = sorted(set(ds) - set(seen.seen))
    if unknown:
        raise ConfigError(f"{flag}: unknown top-level key '{unknown[0]}' in '{path}' (DeepSpeed "
                          "would ignore it); fix its spelling or remove it")
    check_optimizer_params(ds, path, flag)


# optimizer.params keys DeepSpeed takes out itself before it builds an Adam/AdamW
# (DeepSpeedEngine._configure_basic_optimizer, get_optimizer_configuration)
_DS_ADAM_KEYS = {"adam_w_mode", "torch_adam", "fp32_optimizer_states"}


def _optimizer(ds: dict):
    """(the class DeepSpeed would build for the JSON's optimizer, the optimizer.params keys
    it accepts), mirroring DeepSpeed's choice; None where that cannot be told before start (no
    optimizer section, the mu* and Muon optimizers from other packages)."""
    import torch.optim

    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        return None
    name, params = opt["type"], opt.get("params") or {}
    zero = ds.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme") \
        or zero.get("cpu_offload") is True
    # keywords DeepSpeed passes the optimizer itself: a user's copy would collide with them
    injected, extra = {"self", "params", "model_params"}, set()
    if name.lower() in ("adam", "adamw"):
        extra = _DS_ADAM_KEYS
        if params.get("torch_adam"):
            cls = torch.optim.AdamW if name.lower() == "adamw" else torch.optim.Adam
            extra = extra | {"foreach"}
        elif offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam as cls
            injected = injected | {"adamw_mode"}
        else:
            from deepspeed.ops.adam import FusedAdam as cls
    elif name.lower() == "adagrad":
        if offload:
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad as cls
        else:
            cls = torch.optim.Adagrad
    elif name.lower() == "lamb":
        from deepspeed.ops.lamb import FusedLamb as cls
    elif name.lower() == "lion":
        if offload:
            from deepspeed.ops.lion import DeepSpeedCPULion as cls
        else:
            from deepspeed.ops.lion import FusedLion as cls
    elif name.lower().startswith("mu"):
        return None
    else:  # DeepSpeed builds any other name from torch.optim
        cls = getattr(torch.optim, name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ConfigError(f"optimizer.type: '{name}' is neither a DeepSpeed optimizer nor "
                              "one of torch.optim's; use e.g. AdamW")
    sig = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in sig):
        return None  # takes any keyword
    return cls, {p.name for p in sig} - injected | extra


def check_optimizer_params(ds: dict, path: str, flag: str = "--ds") -> None:
    """DeepSpeed hands optimizer.params to the optimizer's constructor unchecked: a misspelt
    key ("weight_decya") would be a TypeError deep inside ``deepspeed.initialize``. Checked
    against that constructor's own signature, before the run starts."""
    try:
        found = _optimizer(ds)
    except ConfigError as e:
        raise ConfigError(f"{flag}: {e} (in '{path}')") from None
    params = ds["optimizer"].get("params") if found else None
    if not isinstance(params, dict):
        return
    cls, known = found
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{flag}: unknown key 'optimizer.params.{unknown[0]}' in '{path}' "
                          f"({cls.__name__} takes {', '.join(sorted(known))}); fix its "
                          "spelling or remove it")


def reconcile(ds: dict, path: str, *, micro: int, glob: int, world: int, max_grad_norm: float,
              lr: float, weight_decay: float, eps: float, precision: str) -> dict:
    """Fill the JSON's "auto" fields from the run's settings; refuse contradictions."""
    wanted = {"train_micro_batch_size_per_gpu": (micro, "train.micro_batch"),
              "gradient_accumulation_steps": (accumulation(glob, micro, world),
                                              "train.global_batch / (micro_batch x world)"),
              "train_batch_size": (glob, "train.global_batch"),
              "gradient_clipping": (max_grad_norm, "train.max_grad_norm")}
    for key, (value, source) in wanted.items():
        _reconcile(ds, key, value, source, path, key)
    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        params = opt.setdefault("params", {})
        for key, value, source in (("lr", lr, "train.lr"),
                                   ("weight_decay", weight_decay, "train.weight_decay"),
                                   ("eps", eps, "train.adam_eps")):
            _reconcile(params, key, value, source, path, f"optimizer.params.{key}")
    if precision == "auto":  # resolved as every engine resolves it, not compared unresolved
        precision = resolve_precision("auto", torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"))
    for half in ("bf16", "fp16"):
        sect = ds.get(half)
        if isinstance(sect, dict) and sect.get("enabled") == "auto":
            sect["enabled"] = precision == half
    return ds


def refuse_unimplemented(ds: dict) -> None:
    """What DeepSpeed accepts in a JSON but cannot run, as one line before it starts: its
    stage-0 bf16 path has no fp32 gradient accumulation (a NotImplementedError deep inside
    ``deepspeed.initialize``). Checked where DeepSpeed runs, not in every reader of a JSON (the
    planner plans the torch engines with a stage-0 one)."""
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0) or 0)
    bf16_on = (ds.get("bf16") or {}).get("enabled") is True
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if stage == 0 and bf16_on and accum == "fp32":
        raise ConfigError("--ds: ZeRO stage 0 in bf16 with data_types.grad_accum_dtype fp32, "
                          "which DeepSpeed does not implement; use zero_optimization.stage 1 "
                          "or 2, or remove data_types.grad_accum_dtype")


def _reconcile(section: dict, key: str, value, source: str, path: str, label: str) -> None:
    have = section.get(key, "auto")
    if have == "auto":
        section[key] = value
    elif have != value:
        raise ConfigError(f"--ds: {label}={have} in '{path}' contradicts {source}={value}; "
                          f"set it to \"auto\" or make them agree")
