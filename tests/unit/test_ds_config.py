"""optimizer.params of a DeepSpeed JSON, checked against the constructor DeepSpeed would call
with them (it passes them on unchecked: a misspelt key is a TypeError inside
deepspeed.initialize)."""
import json

import pytest

from fixtures import REPO
from distil_scale.config import ConfigError
from distil_scale.ds_config import read_ds_json

pytest.importorskip("deepspeed")


def _write(tmp_path, ds):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    return str(p)


@pytest.mark.parametrize("profile, cls", [("cpu.json", "AdamW"),             # torch_adam
                                          ("rtx4070.json", "DeepSpeedCPUAdam"),  # offload
                                          ("v100x8.json", "AdamW")])
def test_a_misspelt_optimizer_param_is_one_line_naming_it(tmp_path, profile, cls):
    ds = json.loads((REPO / "ds_configs" / profile).read_text())
    ds["optimizer"]["params"]["weight_decya"] = 0.01
    path = _write(tmp_path, ds)
    with pytest.raises(ConfigError) as e:
        read_ds_json(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"--ds: unknown key 'optimizer.params.weight_decya' in '{path}' "
                          f"({cls} takes "), msg
    assert "weight_decay" in msg and "betas" in msg and "lr" in msg


def test_the_optimizer_deepspeed_builds_decides_what_is_known(tmp_path):
    base = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    # FusedAdam (no torch_adam, no offload) has bias_correction; torch's AdamW has not
    read_ds_json(_write(tmp_path, {**base, "optimizer": {
        "type": "AdamW", "params": {"lr": 1e-3, "bias_correction": True}}}))
    with pytest.raises(ConfigError, match=r"'optimizer.params.bias_correction'.*\(AdamW takes"):
        read_ds_json(_write(tmp_path, {**base, "optimizer": {
            "type": "AdamW", "params": {"torch_adam": True, "bias_correction": True}}}))
    # any other type is built from torch.optim, with that class's own keywords
    read_ds_json(_write(tmp_path, {**base, "optimizer": {"type": "SGD",
                                                         "params": {"momentum": 0.9}}}))
    with pytest.raises(ConfigError, match=r"'optimizer.params.betas'.*\(SGD takes"):
        read_ds_json(_write(tmp_path, {**base, "optimizer": {"type": "SGD",
                                                             "params": {"betas": [0.9, 0.99]}}}))
    with pytest.raises(ConfigError, match=r"--ds: optimizer.type: 'AdamX' is neither"):
        read_ds_json(_write(tmp_path, {**base, "optimizer": {"type": "AdamX", "params": {}}}))
