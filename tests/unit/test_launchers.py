"""distil_scale.launchers: SLURM's and accelerate's environment mapped onto the trainer's, on
environments written here (the real launchers run in tests/multiprocess/test_cluster_launch.py)."""
from __future__ import annotations

import os

import pytest

from distil_scale.config import load_config
from distil_scale.errors import UserError
from distil_scale.launchers import (SHARE_STORE_OPT_OUT, SLURM_PORT_BASE, accelerate_settings,
                                    apply_launcher_env, expand_nodelist, slurm_env,
                                    torchrun_restart_warning)


@pytest.fixture(autouse=True)
def restore_environ():
    """apply_launcher_env writes os.environ (the process group reads it): every test here
    leaves it as it found it, or WORLD_SIZE=2 would reach the next test's run."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("spec, hosts", [
    ("gpu07", ["gpu07"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("login1,gpu[8-11]", ["login1", "gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a[1,3]-ib,b2", ["a1-ib", "a3-ib", "b2"]),
    ("127.0.0.1", ["127.0.0.1"]),
])
def test_nodelist_expands_as_scontrol_show_hostnames(spec, hosts):
    assert expand_nodelist(spec) == hosts


@pytest.mark.parametrize("spec", ["gpu[01-04", "gpu]1", "gpu[a-b]", "gpu[4-2]", "", "gpu[]"])
def test_unreadable_nodelist_is_one_line_naming_the_variable(spec):
    with pytest.raises(UserError) as e:
        expand_nodelist(spec, "SLURM_STEP_NODELIST")
    msg = str(e.value)
    assert msg.startswith("SLURM_STEP_NODELIST: ") and "MASTER_ADDR" in msg and "\n" not in msg


def srun_env(procid: int, **extra) -> dict:
    env = {"SLURM_JOB_ID": "4812345", "SLURM_NTASKS": "16", "SLURM_STEP_ID": "0",
           "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % 8),
           "SLURM_JOB_NODELIST": "gpu[03-04]"}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def test_srun_tasks_become_one_world():
    worlds = [slurm_env(srun_env(p)) for p in range(16)]
    assert [w["RANK"] for w in worlds] == [str(p) for p in range(16)]
    assert {w["WORLD_SIZE"] for w in worlds} == {"16"}
    assert [w["LOCAL_RANK"] for w in worlds] == [str(p % 8) for p in range(16)]
    assert {w["MASTER_ADDR"] for w in worlds} == {"gpu03"}
    assert {w["MASTER_PORT"] for w in worlds} == {str(SLURM_PORT_BASE + 2345)}


def test_srun_step_values_win_and_user_rendezvous_is_kept():
    env = srun_env(1, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="gpu[04,09]",
                   MASTER_PORT="29123")
    assert slurm_env(env) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                              "MASTER_ADDR": "gpu04"}
    assert "MASTER_ADDR" not in slurm_env(srun_env(0, MASTER_ADDR="10.0.0.5"))
    ip = srun_env(0, SLURM_JOB_NODELIST=None, SLURM_LAUNCH_NODE_IPADDR="10.1.2.3")
    assert slurm_env(ip)["MASTER_ADDR"] == "10.1.2.3"


@pytest.mark.parametrize("env", [
    {},                                                           # not SLURM
    srun_env(0, SLURM_NTASKS="1"),                                # one task
    srun_env(3, WORLD_SIZE="8", RANK="3"),                        # srun torchrun: torchrun's
])
def test_left_alone(env):
    assert slurm_env(env) == {}


@pytest.mark.parametrize("env, names", [
    (srun_env(0, SLURM_STEP_ID=None), ("SLURM_NTASKS=16", "not an srun task", "srun")),
    (srun_env(0, SLURM_STEP_ID="batch"), ("not an srun task",)),
    (srun_env(0, SLURM_JOB_NODELIST=None), ("MASTER_ADDR:", "SLURM_JOB_NODELIST")),
    (srun_env(0, SLURM_JOB_ID=None), ("SLURM_JOB_ID:", "MASTER_PORT")),
    (srun_env(0, SLURM_LOCALID=None), ("SLURM_LOCALID:",)),
    (srun_env(0, SLURM_NTASKS="two"), ("SLURM_NTASKS: 'two' is not an integer",)),
    (srun_env(0, MASTER_PORT="http"), ("MASTER_PORT: 'http'",)),
    (srun_env(0, SLURM_JOB_NODELIST="gpu[1-"), ("SLURM_JOB_NODELIST: cannot read",)),
])
def test_srun_that_cannot_form_a_world_is_one_line(env, names):
    with pytest.raises(UserError) as e:
        slurm_env(env)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg


def test_srun_mapping_lands_in_the_environment_and_says_so(monkeypatch, capsys):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "ACCELERATE_", "FSDP_")) or k in (
                "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    for k, v in srun_env(0, SLURM_NTASKS="2").items():
        monkeypatch.setenv(k, v)
    assert apply_launcher_env(["train.max_steps=3"]) == (["train.max_steps=3"], None)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"],
            os.environ["MASTER_ADDR"]) == ("0", "2", "0", "gpu03")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("SLURM: srun task 0 of 2"), out


# -- accelerate ---------------------------------------------------------------------------------
# what accelerate 1.15's launchers export (read from `accelerate launch` of a script that dumps
# its environment, with the configs in launch/accelerate/)
DDP = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DYNAMO_BACKEND": "NO",
       "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
FSDP = {**DDP, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
        "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_RESHARD_AFTER_FORWARD": "true",
        "FSDP_OFFLOAD_PARAMS": "false", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}
DS = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true",
      "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_configs/v100x8.json",
      "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false", "WORLD_SIZE": "2", "RANK": "0"}


@pytest.mark.parametrize("env, overrides, ds", [
    (DDP, ["parallel.backend=ddp", "train.precision=bf16"], None),
    ({**DDP, "ACCELERATE_MIXED_PRECISION": "no"},
     ["parallel.backend=ddp", "train.precision=fp32"], None),
    (FSDP, ["parallel.backend=fsdp", "train.precision=bf16"], None),
    ({**FSDP, "FSDP_VERSION": "1", "FSDP_RESHARD_AFTER_FORWARD": "FULL_SHARD"},
     ["parallel.backend=fsdp", "train.precision=bf16"], None),
    # the JSON's fp16/bf16 sections decide unless accelerate names a precision
    (DS, ["parallel.backend=deepspeed"], "ds_configs/v100x8.json"),
    ({**DS, "ACCELERATE_MIXED_PRECISION": "bf16"},
     ["parallel.backend=deepspeed", "train.precision=bf16"], "ds_configs/v100x8.json"),
    # one process (accelerate's simple launcher): the backend stays the config's
    ({"ACCELERATE_MIXED_PRECISION": "fp16", "ACCELERATE_USE_CPU": "False"},
     ["train.precision=fp16"], None),
])
def test_each_accelerate_config_maps_onto_an_engine(env, overrides, ds, capsys):
    got, got_ds = apply_launcher_env(["train.max_steps=3"], environ=dict(env))
    assert got == ["train.max_steps=3", *overrides] and got_ds == ds
    cfg = load_config(None, got)  # the mapped keys are valid config
    assert cfg.parallel.backend == (overrides[0].split("=")[1] if "parallel" in overrides[0]
                                    else "plain")
    line = capsys.readouterr().out.strip()
    assert line.startswith("accelerate launch: ") and "\n" not in line, line


def test_agreeing_command_line_is_kept_and_only_rank0_speaks(capsys):
    got, ds = apply_launcher_env(["parallel.backend=deepspeed", "--x"], "./ds_configs/v100x8.json",
                                 environ={**DS, "RANK": "1"})
    assert got == ["parallel.backend=deepspeed", "--x"] and ds == "./ds_configs/v100x8.json"
    assert capsys.readouterr().out == ""


def test_glue_takes_the_json_as_its_config_key():
    got, ds = apply_launcher_env([], ds_flag="parallel.ds_config", environ=dict(DS))
    assert got == ["parallel.ds_config=ds_configs/v100x8.json", "parallel.backend=deepspeed"]
    with pytest.raises(UserError, match="parallel.ds_config ds_configs/cpu.json contradicts"):
        apply_launcher_env(["parallel.ds_config=ds_configs/cpu.json"],
                           ds_flag="parallel.ds_config", environ=dict(DS))


@pytest.mark.parametrize("env, overrides, ds, names", [
    (DDP, ["parallel.backend=fsdp"], None,
     ("parallel.backend=fsdp contradicts accelerate's distributed_type", "parallel.backend=ddp")),
    (DDP, ["train.precision=fp32"], None,
     ("train.precision=fp32 contradicts accelerate's mixed_precision",)),
    (DDP, [], "ds_configs/cpu.json", ("--ds ds_configs/cpu.json contradicts", "ddp")),
    (DS, [], "ds_configs/cpu.json",
     ("--ds ds_configs/cpu.json contradicts accelerate's deepspeed_config_file",
      "ds_configs/v100x8.json")),
])
def test_command_line_contradicting_accelerate_is_one_line_naming_both(env, overrides, ds,
                                                                       names):
    with pytest.raises(UserError) as e:
        apply_launcher_env(overrides, ds, environ=dict(env))
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg


@pytest.mark.parametrize("env, names", [
    ({**FSDP, "FSDP_RESHARD_AFTER_FORWARD": "false"}, ("FSDP_RESHARD_AFTER_FORWARD=false",)),
    ({**FSDP, "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"},
     ("FSDP_SHARDING_STRATEGY=SHARD_GRAD_OP", "FULL_SHARD")),
    ({**FSDP, "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"},
     ("HYBRID_SHARD",)),
    ({**FSDP, "FSDP_OFFLOAD_PARAMS": "true"}, ("FSDP_OFFLOAD_PARAMS=true",)),
    ({**FSDP, "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, ("SIZE_BASED_WRAP",)),
    ({**FSDP, "FSDP_ACTIVATION_CHECKPOINTING": "true"}, ("FSDP_ACTIVATION_CHECKPOINTING",)),
    ({**DS, "ACCELERATE_DEEPSPEED_CONFIG_FILE": "none", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
     ("zero_stage (ACCELERATE_DEEPSPEED_ZERO_STAGE=2)", "deepspeed_config_file")),
    ({**DS, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"},
     ("offload_optimizer_device",)),
    ({k: v for k, v in DS.items() if k != "ACCELERATE_DEEPSPEED_CONFIG_FILE"},
     ("without deepspeed_config_file", "--ds")),
    ({**DDP, "ACCELERATE_MIXED_PRECISION": "fp8"}, ("mixed_precision 'fp8'",)),
    ({**DDP, "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, ("dynamo_backend", "train.compile=true")),
    ({**DDP, "ACCELERATE_USE_MEGATRON_LM": "true"}, ("Megatron-LM",)),
])
def test_unsupported_accelerate_settings_are_one_line(env, names):
    with pytest.raises(UserError) as e:
        apply_launcher_env([], environ=dict(env))
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg


def test_not_accelerate_is_none():
    assert accelerate_settings({"WORLD_SIZE": "2", "RANK": "0"}) is None


# -- the shipped launch files -------------------------------------------------------------------
def test_shipped_hostfile_and_accelerate_configs_read_by_their_own_tools():
    from accelerate.commands.config.config_args import load_config_from_file
    from deepspeed.launcher.runner import fetch_hostfile

    from fixtures import REPO

    assert dict(fetch_hostfile(str(REPO / "launch" / "hostfile.example"))) == {"node1": 8,
                                                                              "node2": 8}
    kinds = {}
    for name in ("ddp", "fsdp", "deepspeed"):
        cfg = load_config_from_file(str(REPO / "launch" / "accelerate" / f"{name}.yaml"))
        kinds[name] = cfg.distributed_type.value
        if name == "deepspeed":
            assert (REPO / cfg.deepspeed_config["deepspeed_config_file"]).is_file()
        if name == "fsdp":
            assert cfg.fsdp_config["fsdp_version"] == 2
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}


def test_torchrun_restarts_over_a_shared_store_are_warned_about_on_rank_0(capsys):
    """The variables torchrun's agent gives its workers (local_elastic_agent): restarts
    allowed and the agent's store shared, the default; the opt-out turns the sharing off."""
    worker = {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3",
              "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    apply_launcher_env([], environ=dict(worker))
    assert capsys.readouterr().err == (
        "warning: torchrun --max-restarts 3 with a rendezvous store shared across attempts: a "
        "restarted attempt's ranks may fail to connect to each other; export "
        f"{SHARE_STORE_OPT_OUT}=1 before torchrun\n")
    apply_launcher_env([], environ={**worker, "RANK": "1"})  # one line per job, not per rank
    assert capsys.readouterr().err == ""
    assert torchrun_restart_warning({**worker, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert torchrun_restart_warning({**worker, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
