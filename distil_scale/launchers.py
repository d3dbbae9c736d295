"""What a cluster launcher says, mapped onto what the trainer reads: called once by each CLI
that starts a process group, before its config is resolved.

The trainer reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (set by
torchrun and the deepspeed launcher) and its own config keys. Two launchers say the same
things in their own words:

* ``srun python launch/pretrain.py`` (SLURM without a launcher): every task has
  ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` and the step's node list; without this
  mapping each task would run as a world of one, N copies writing one output directory.
  ``srun torchrun ...`` is left alone (torchrun sets ``WORLD_SIZE`` for its workers).
* ``accelerate launch``: its config file (DDP, FSDP, DeepSpeed plugin, mixed precision) reaches
  the script as ``ACCELERATE_*``/``FSDP_*`` variables, read here into ``parallel.backend``,
  ``--ds`` and ``train.precision``. Only accelerate's launcher is used (it runs torchrun, or the
  deepspeed launcher across machines); its ``Accelerator`` is not: with an FSDP config and no
  GPU it trains unsharded copies with no gradient sync and no error (measured), and the
  engines here already do DDP, FSDP2 and ZeRO. Settings no engine here implements are one line.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Mapping, MutableMapping

from .errors import UserError


# -- SLURM ---------------------------------------------------------------------------------------
# a SLURM hostlist: "gpu[01-04,07],login1,rack[1-2]-n[1-2]"; commas inside [] do not split hosts
_HOST_TOKENS = re.compile(r"\[([^\[\]]*)\]|([^\[\],]+)|(,)")


def expand_nodelist(spec: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """A SLURM node list in its compact form, expanded in order (what ``scontrol show
    hostnames`` prints); zero padding follows the range's first number, as SLURM writes it."""
    hosts: list[str] = []
    parts: list[list[str]] = []  # the current host's pieces, each a list of alternatives
    pos = 0
    for m in _HOST_TOKENS.finditer(spec):
        if m.start() != pos:
            break
        pos = m.end()
        group, text, comma = m.groups()
        if comma:
            hosts += _product(parts)
            parts = []
        elif text is not None:
            parts.append([text.strip()])
        else:
            parts.append(_ranges(group, spec, name))
    if pos != len(spec) or not spec.strip():
        raise UserError(f"{name}: cannot read the node list '{spec}' (expected e.g. "
                        "'gpu[01-04,07],login1'); set MASTER_ADDR to rank 0's host")
    hosts += _product(parts)
    return [h for h in hosts if h]


def _ranges(group: str, spec: str, name: str) -> list[str]:
    out = []
    for item in group.split(","):
        lo, _, hi = item.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise UserError(f"{name}: '[{group}]' in '{spec}' is not a list of numbers and "
                            "ranges like [01-04,07]; set MASTER_ADDR to rank 0's host")
        width = len(lo)
        out += [str(i).zfill(width) for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _product(parts: list[list[str]]) -> list[str]:
    hosts = [""]
    for alternatives in parts:
        hosts = [h + a for h in hosts for a in alternatives]
    return hosts if parts else []


# every task of a job derives the same port with no exchange; two jobs that share a node get
# different ones unless their ids agree in the last 4 digits
SLURM_PORT_BASE = 15000
# the batch script itself and the "extern" step are not srun tasks (no SLURM_STEP_ID, or these)
_NOT_A_TASK = {"", "batch", "extern", "interactive", "4294967294", "4294967295", "4294967292"}


def _env_int(env: Mapping[str, str], key: str, fix: str) -> int:
    try:
        return int(env[key])
    except KeyError:
        raise UserError(f"{key}: not set by SLURM here; {fix}") from None
    except ValueError:
        raise UserError(f"{key}: '{env[key]}' is not an integer; {fix}") from None


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for a task of ``srun python ...`` (no launcher), or {}
    where SLURM is absent, runs one task, or a launcher inside srun set them already."""
    ntasks_key = next((k for k in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
                       if k in env), None)
    if ntasks_key is None or "WORLD_SIZE" in env or "RANK" in env:
        return {}
    fix = ("launch with `srun python launch/pretrain.py ...` (one task per GPU) or "
           "`srun torchrun ...` (launch/slurm/pretrain.sbatch)")
    ntasks = _env_int(env, ntasks_key, fix)
    if ntasks <= 1:
        return {}
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    if step in _NOT_A_TASK:
        seen = f"SLURM_STEP_ID {step}" if step else "no SLURM_STEP_ID"
        raise UserError(f"{ntasks_key}={ntasks} but this process is not an srun task ({seen}),"
                        f" so the other {ntasks - 1} would never join; {fix}")
    out = {"RANK": str(_env_int(env, "SLURM_PROCID", fix)), "WORLD_SIZE": str(ntasks),
           "LOCAL_RANK": str(_env_int(env, "SLURM_LOCALID", fix))}
    if "MASTER_ADDR" not in env:
        key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                "SLURM_NODELIST") if env.get(k)), None)
        if key:  # srun places task 0 on the step's first node
            out["MASTER_ADDR"] = expand_nodelist(env[key], key)[0]
        elif env.get("SLURM_LAUNCH_NODE_IPADDR"):
            out["MASTER_ADDR"] = env["SLURM_LAUNCH_NODE_IPADDR"]
        else:
            raise UserError(f"MASTER_ADDR: srun started {ntasks} tasks but neither "
                            "SLURM_JOB_NODELIST nor SLURM_LAUNCH_NODE_IPADDR is set; set "
                            "MASTER_ADDR to the host of task 0")
    if "MASTER_PORT" in env:
        _env_int(env, "MASTER_PORT", "set it to a free TCP port, e.g. 29500")
    else:
        job = _env_int(env, "SLURM_JOB_ID", "set MASTER_PORT to a free TCP port, e.g. 29500")
        out["MASTER_PORT"] = str(SLURM_PORT_BASE + job % 10000)
    return out


# -- accelerate launch ----------------------------------------------------------------------------
_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
# what our FSDP2 engine does (fully_shard per transformer block, parameters resharded after
# the forward, nothing offloaded); FSDP_* values accelerate writes that agree with it
_FSDP_ALLOWED = {
    "FSDP_SHARDING_STRATEGY": ("FULL_SHARD", "1"),          # read by accelerate for FSDP1 only
    "FSDP_AUTO_WRAP_POLICY": ("TRANSFORMER_BASED_WRAP",),
    "FSDP_OFFLOAD_PARAMS": ("false",),
    "FSDP_ACTIVATION_CHECKPOINTING": ("false",),
    "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": ("false",),
}
# DeepSpeed plugin fields accelerate passes inline; here the DeepSpeed JSON holds them
_DS_INLINE = {
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "zero_stage",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps",
    "ACCELERATE_GRADIENT_CLIPPING": "gradient_clipping",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "offload_optimizer_device",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "offload_param_device",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "zero3_init_flag",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "zero3_save_16bit_model",
    "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES": "deepspeed_moe_layer_cls_names",
}
_NEUTRAL = ("", "none", "false")
_UNSUPPORTED = {
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
    "ACCELERATE_USE_PARALLELISM_CONFIG": "parallelism_config (tensor/context parallel)",
    "ACCELERATE_USE_SAGEMAKER": "SageMaker",
}


@dataclass(frozen=True)
class AccelerateSettings:
    """accelerate's config in this project's words; None: accelerate said nothing about it."""

    backend: str | None
    precision: str | None
    ds: str | None
    said: str  # the accelerate settings it came from, for the start-up line


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "y", "on")


def accelerate_settings(env: Mapping[str, str]) -> AccelerateSettings | None:
    """None unless this process was started by ``accelerate launch`` (every accelerate
    launcher sets ACCELERATE_MIXED_PRECISION)."""
    if "ACCELERATE_MIXED_PRECISION" not in env:
        return None
    for key, what in _UNSUPPORTED.items():
        if _truthy(env.get(key, "")):
            raise UserError(f"accelerate launch: {what} ({key}) is not an engine here; use "
                            "a DDP, FSDP or DeepSpeed accelerate config (launch/accelerate/)")
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "NO")
    if dynamo.upper() != "NO":
        raise UserError(f"accelerate launch: dynamo_backend {dynamo} (ACCELERATE_DYNAMO_"
                        "BACKEND) is not read here; set dynamo_backend: 'NO' in the accelerate "
                        "config and pass train.compile=true")
    mp = env["ACCELERATE_MIXED_PRECISION"].strip().lower()
    if mp not in _PRECISION:
        raise UserError(f"accelerate launch: mixed_precision '{mp}' (ACCELERATE_MIXED_"
                        "PRECISION) is not supported here; use no, bf16 or fp16")
    precision, ds, said = _PRECISION[mp], None, [f"mixed_precision {mp}"]
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED", "")):
        backend, ds = "deepspeed", _deepspeed_file(env)
        said += [f"deepspeed_config_file {ds}"] if ds else []
        # the JSON's bf16/fp16 sections decide (as accelerate's plugin does with a config
        # file); accelerate's default 'no' is no statement about them
        precision = None if mp == "no" else precision
    elif _truthy(env.get("ACCELERATE_USE_FSDP", "")):
        backend = "fsdp"
        _check_fsdp(env)
        said.append(f"fsdp_version {env.get('FSDP_VERSION', '1')}, run by the FSDP2 engine")
    else:
        backend = "ddp" if int(env.get("WORLD_SIZE", "1") or 1) > 1 else None
    return AccelerateSettings(backend, precision, ds, ", ".join(said))


def _deepspeed_file(env: Mapping[str, str]) -> str | None:
    inline = [f"{field} ({key}={env[key]})" for key, field in _DS_INLINE.items()
              if env.get(key, "").strip().lower() not in _NEUTRAL]
    if inline:
        raise UserError(f"accelerate launch: DeepSpeed plugin field {inline[0]} is not read "
                        "here: the DeepSpeed JSON holds the ZeRO settings; remove it from the "
                        "accelerate config and set deepspeed_config_file (e.g. "
                        "ds_configs/v100x8.json)")
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    return None if path.lower() in _NEUTRAL else path


def _check_fsdp(env: Mapping[str, str]) -> None:
    version = env.get("FSDP_VERSION", "1").strip()
    if version not in ("1", "2"):
        raise UserError(f"accelerate launch: fsdp_version {version} (FSDP_VERSION) is not "
                        "supported; use fsdp_version: 2")
    checks = dict(_FSDP_ALLOWED)
    if version == "2":
        # FSDP2 reads reshard_after_forward, not the sharding strategy (accelerate's docs)
        checks.pop("FSDP_SHARDING_STRATEGY")
        checks["FSDP_RESHARD_AFTER_FORWARD"] = ("true",)
    for key, allowed in checks.items():
        value = env.get(key)
        if value is not None and value.strip().upper() not in {a.upper() for a in allowed}:
            raise UserError(f"accelerate launch: {key}={value} is not what the FSDP2 engine "
                            f"here does (fully_shard per transformer block, resharded after "
                            f"the forward, nothing offloaded); set it to {allowed[0]} or "
                            "remove it from the accelerate config")


# -- torchrun ------------------------------------------------------------------------------------
SHARE_STORE_OPT_OUT = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def torchrun_restart_warning(env: Mapping[str, str]) -> str | None:
    """torchrun --max-restarts with its rendezvous store shared with the workers (torch's
    default): the store outlives an attempt, so a restarted attempt's ranks can read the
    previous attempt's addresses and fail to connect (gloo's connectFullMesh, NCCL's socket
    connect: measured here on every restart; pytorch/pytorch#167288). The opt-out gives each
    attempt a store of its own; it must be in torchrun's environment, so only a warning can
    help by the time a worker runs."""
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return (f"torchrun --max-restarts {restarts} with a rendezvous store shared across "
                "attempts: a restarted attempt's ranks may fail to connect to each other; "
                f"export {SHARE_STORE_OPT_OUT}=1 before torchrun")
    return None


# -- both -----------------------------------------------------------------------------------------
def _given(overrides: list[str], key: str) -> str | None:
    """The last value the command line gave ``key``, or None."""
    found = None
    for o in overrides:
        k, sep, v = o.partition("=")
        if sep and k.strip() == key:
            found = v.strip()
    return found


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def apply_launcher_env(overrides: list[str], ds: str | None = None, *, ds_flag: str = "--ds",
                       environ: MutableMapping[str, str] | None = None,
                       ) -> tuple[list[str], str | None]:
    """Map SLURM's and accelerate's environment onto this process's (``environ``, default
    ``os.environ``) and the command line: returns (overrides, DeepSpeed JSON). Where the
    command line states a setting the launcher also states, they must agree. ``ds_flag`` names
    where the JSON comes from in this CLI (``--ds``, or GLUE's ``parallel.ds_config``)."""
    env = os.environ if environ is None else environ
    lines = []
    mapped = slurm_env(env)
    if mapped:
        env.update(mapped)
        lines.append(f"SLURM: srun task {mapped['RANK']} of {mapped['WORLD_SIZE']} without a "
                     "launcher: RANK, WORLD_SIZE, LOCAL_RANK from SLURM_PROCID, SLURM_NTASKS, "
                     f"SLURM_LOCALID; rendezvous at {env['MASTER_ADDR']}:{env['MASTER_PORT']}")
    acc = accelerate_settings(env)
    if acc is not None:
        overrides = list(overrides)
        if ds_flag != "--ds":  # the JSON is a config key of this CLI
            ds = _given(overrides, ds_flag)
        picked = []
        if acc.ds is not None:
            if ds is not None and not _same_file(ds, acc.ds):
                raise UserError(f"{ds_flag} {ds} contradicts accelerate's deepspeed_config_file "
                                f"{acc.ds}; give one of them")
            if ds is None:
                ds = acc.ds
                if ds_flag != "--ds":
                    overrides.append(f"{ds_flag}={ds}")
                picked.append(f"{ds_flag} {ds}")
        elif acc.backend == "deepspeed" and ds is None:
            raise UserError(f"accelerate launch: a DeepSpeed config without deepspeed_config_"
                            f"file; set it in the accelerate config or pass {ds_flag} "
                            "ds_configs/v100x8.json")
        elif ds is not None and acc.backend not in (None, "deepspeed"):
            raise UserError(f"{ds_flag} {ds} contradicts accelerate's distributed_type "
                            f"({acc.backend}); use an accelerate DeepSpeed config "
                            "(launch/accelerate/deepspeed.yaml) or drop the DeepSpeed JSON")
        for key, value, source in (("parallel.backend", acc.backend, "distributed_type"),
                                   ("train.precision", acc.precision, "mixed_precision")):
            if value is None:
                continue
            given = _given(overrides, key)
            if given is None:
                overrides.append(f"{key}={value}")
                picked.append(f"{key}={value}")
            elif given != value:
                raise UserError(f"{key}={given} contradicts accelerate's {source} ({key}={value}"
                                f" from its config or flags); make them agree or drop {key}=")
        lines.append(f"accelerate launch: {', '.join(picked) or 'nothing to map'} "
                     f"(from {acc.said})")
    warning = torchrun_restart_warning(env)
    if env.get("RANK", "0") == "0":
        for line in lines:
            print(line, flush=True)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    return overrides, ds
