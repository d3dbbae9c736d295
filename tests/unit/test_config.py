import tomllib

import pytest
import yaml

from distil_scale.assets import CONFIGS
from distil_scale.config import (Config, ConfigError, config_changes, load_config,
                                   parse_overrides, to_dict)
from distil_scale.engine.fsdp import fsdp_mesh
from distil_scale.glue.config import CONFIG_DIR
from fixtures import REPO


def test_defaults_validate_and_required_keys_exist():
    cfg = load_config(None, ["run.output_dir=/tmp/x", "train.max_steps=7"])
    assert cfg.run.output_dir == "/tmp/x" and cfg.train.max_steps == 7
    assert isinstance(cfg, Config)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1.0e-4\n  max_steps: 3\nstudent:\n  layers: [0, 2]\n")
    cfg = load_config(str(p), ["train.max_steps=9", "loss.temperature=1e0",
                               "student.layers=1,3", "student.n_layers=2"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.max_steps == 9
    assert cfg.loss.temperature == 1.0  # YAML reads 1e0 as a string; coerced to float
    assert cfg.student.layers == [1, 3]


@pytest.mark.parametrize("override, needle", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("train.max_steps=ten", "train.max_steps: expected an integer"),
    ("train.max_steps=2.5", "train.max_steps: expected an integer"),
    ("train.lr=abc", "train.lr: expected a number"),
    ("metrics.tensorboard=maybe", "metrics.tensorboard: expected true or false"),
    ("loss.kl_positions=some", "loss.kl_positions: must be one of masked, all"),
    ("train.lr=-1e-4", "train.lr: must be > 0"),
    ("loss.temperature=0", "loss.temperature: must be > 0"),
    ("masking.mlm_prob=1.5", "masking.mlm_prob: must be in (0, 1)"),
    ("masking.mask_frac=0.9", "masking.mask_frac"),
    ("parallel.fsdp_shard_degree=-1", "parallel.fsdp_shard_degree: must be >= 0"),
    ("parallel.fsdp_shard_degree=2", "parallel.fsdp_shard_degree: shards the fsdp backend "
                                     "only; this run's is 'plain'"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_hybrid_sharding_needs_a_divisor_of_the_world():
    with pytest.raises(ConfigError) as e:
        fsdp_mesh("cpu", 4, 3)  # refused before any process group is needed
    assert str(e.value) == ("parallel.fsdp_shard_degree: 3 does not divide the 4 processes; use "
                            "the processes per node (a divisor of 4) or 0 to shard over every "
                            "rank")
    cfg = load_config(None, ["parallel.backend=fsdp", "parallel.fsdp_shard_degree=2"])
    assert cfg.parallel.fsdp_shard_degree == 2


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["train.max_steps"])


def test_empty_values_can_be_set():
    """`key=` is what a shell leaves of key="": an empty string or list, not null."""
    base = load_config(None, ["data.cache_dir=/somewhere", "student.layers=0,2"])
    assert (base.data.cache_dir, base.student.layers) == ("/somewhere", [0, 2])
    cfg = load_config(None, ["data.cache_dir=", "student.layers=", "data.config_name=''"])
    assert (cfg.data.cache_dir, cfg.student.layers, cfg.data.config_name) == ("", [], "")
    assert load_config(None, ["student.layers=[]"]).student.layers == []


def test_resume_changes_name_the_key():
    old = to_dict(load_config(None, []))
    new = to_dict(load_config(None, ["train.lr=0.001", "train.max_steps=999",
                                     "checkpoint.every_steps=7", "metrics.tensorboard=false"]))
    assert config_changes(old, new) == ["train.lr: 0.001 now, 0.0005 in the checkpoint"]


def test_shipped_configs_load(tmp_path):
    for name in ("demo.yaml", "paper.yaml"):
        cfg = load_config(str(REPO / "configs" / name))
        assert cfg.loss.alpha_ce == 5.0 and cfg.loss.alpha_mlm == 2.0
    paper = load_config(str(REPO / "configs" / "paper.yaml"))
    assert paper.student.layers == [0, 2, 4, 7, 9, 11]
    assert paper.teacher.name_or_path == "bert-base-uncased"
    assert paper.data.source == "wikimedia/wikipedia"
    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["teacher"]


def test_the_package_finds_the_shipped_configs_and_pyproject_lists_every_package():
    """configs/ reaches a wheel as distil_scale/configs only through pyproject's explicit
    package list (a found list cannot map it): a package missing there would not be
    installed."""

    assert CONFIGS == REPO / "configs" and CONFIG_DIR == REPO / "configs" / "glue"
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts)
               for p in (REPO / "distil_scale").rglob("__init__.py")}
    assert set(setup["packages"]) == on_disk | {"distil_scale.configs"}
    assert setup["package-dir"] == {"distil_scale.configs": "configs"}
    assert {"demo.yaml", "paper.yaml", "glue"} <= {p.name for p in CONFIGS.iterdir()}
