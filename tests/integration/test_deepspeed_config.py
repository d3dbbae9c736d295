"""The DeepSpeed JSON as a run sees it: "auto" precision resolved like every other engine, and
ZeRO stage 0 (no global grad norm inside DeepSpeed) training instead of "diverging"."""
import json
import os

import pytest
import torch

from fixtures import REPO, free_port, read_metrics, tiny_overrides
from distil_scale.config import load_config
from distil_scale.ds_config import load_ds_config, read_ds_json
from distil_scale.runtime import resolve_precision

DS_CPU = REPO / "ds_configs" / "cpu.json"


def test_auto_precision_is_resolved_not_compared(tmp_path):
    cfg = load_config(None, ["train.precision=auto", "train.micro_batch=4",
                             "train.global_batch=8"])
    ds = load_ds_config(str(DS_CPU), cfg, world=1)
    want = resolve_precision("auto", torch.device("cpu"))
    assert ds["bf16"]["enabled"] is (want == "bf16")


def test_stage_0_bf16_with_fp32_accumulation_is_one_line():
    from distil_scale.config import ConfigError
    from distil_scale.ds_config import refuse_unimplemented

    ds = json.loads(DS_CPU.read_text())
    ds["zero_optimization"] = {"stage": 0}
    ds["bf16"] = {"enabled": True}
    with pytest.raises(ConfigError,
                       match=r"ZeRO stage 0 in bf16 with data_types\.grad_accum_dtype fp32") as e:
        refuse_unimplemented(ds)
    assert "\n" not in str(e.value)
    ds.pop("data_types")  # without the fp32 accumulation it runs
    refuse_unimplemented(ds)
    refuse_unimplemented(json.loads(DS_CPU.read_text()))  # stage 2: fp32 accumulation is fine


def test_shipped_profiles_pass_deepspeeds_schema():
    for f in sorted((REPO / "ds_configs").glob("*.json")):
        read_ds_json(str(f))


def test_zero_stage_0_trains(tmp_path, tiny_teacher, corpus, monkeypatch):
    pytest.importorskip("deepspeed")
    from distil_scale.train import train

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)
    ds = json.loads(DS_CPU.read_text())
    ds["zero_optimization"] = {"stage": 0}
    ds.pop("data_types")  # DeepSpeed's stage 0 has no fp32 gradient accumulation under bf16
    (tmp_path / "z0.json").write_text(json.dumps(ds))
    out = tmp_path / "r"
    cfg = load_config(None, tiny_overrides(tiny_teacher, corpus, out, **{
        "parallel.backend": "deepspeed", "train.max_steps": 4, "train.log_every": 1,
        "checkpoint.every_steps": 4, "train.precision": "fp32"}))
    try:
        summary = train(cfg, ds_config=load_ds_config(str(tmp_path / "z0.json"), cfg, world=1))
    finally:  # the process group DeepSpeed made must not outlive this test
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert summary["steps"] == 4
    rows = [m for m in read_metrics(out) if "optim/grad_norm" in m]
    assert len(rows) == 4
    assert all(0 < r["optim/grad_norm"] < float("inf") for r in rows), rows
    assert rows[-1]["optim/skipped_steps"] == 0
    assert os.path.isfile(out / "student" / "model.safetensors")
