"""launch/bundle.py end to end: the bundle for this interpreter installs with no package index
into a fresh venv that has only what a typical GPU image has (torch, transformers, pyarrow,
pandas, tensorboard), and launch/gpu_check.py --cpu-smoke runs from there to a complete report.
"""
from __future__ import annotations

import os
import subprocess
from importlib import metadata

import pytest

from fixtures import PYTHON, REPO, md_table, run_env

IMAGE = ("torch", "transformers", "pyarrow", "pandas", "tensorboard")


def pinned(name: str) -> str:
    # the versions installed here (the local part of torch's "+cpu" dropped): the CPU wheel,
    # never an unpinned torch that would pull several GB of CUDA packages
    return f"{name}=={metadata.version(name).split('+')[0]}"


def check(cmd, env, timeout, cwd=REPO) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{cmd}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_the_bundle_installs_offline_and_the_smoke_check_completes(tmp_path):
    bundle = tmp_path / "bundle"
    out = check([PYTHON, REPO / "launch" / "bundle.py", "--out", bundle], run_env(), 600)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2**20
    assert size <= 40.0, out.stdout
    names = {p.name.split("-")[0].lower() for p in bundle.glob("*.whl")}
    assert {"deepspeed", "datasets", "hjson", "pydantic", "dill", "multiprocess",
            "distil_scale"} <= names, names
    assert not names & {"torch", "transformers", "scipy", "scikit_learn"}, names
    assert (bundle / "tokenizer" / "bert-base-uncased" / "vocab.txt").is_file()

    venv = tmp_path / "venv"
    check([PYTHON, "-m", "venv", venv], run_env(), 300)
    py, pip_env = venv / "bin" / "python", run_env(PYTHONPATH="")
    # --no-compile: byte-compiling torch and transformers is most of an install's time
    check([py, "-m", "pip", "install", "-q", "--no-compile", *(pinned(n) for n in IMAGE)],
          pip_env, 900)

    # no index, no find-links, no config: only the bundle
    offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    offline.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", VIRTUAL_ENV=str(venv),
                   PATH=f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    offline.pop("PYTHONPATH", None)
    check(["sh", bundle / "install.sh"], offline, 300)
    where = check([py, "-c", "import distil_scale, deepspeed, datasets, os; "
                   "from distil_scale.assets import BERT_UNCASED; "
                   "print(distil_scale.__file__, os.path.isfile(BERT_UNCASED + '/vocab.txt'))"],
                  offline, 300, cwd=tmp_path)
    assert str(venv) in where.stdout and where.stdout.split()[-1] == "True", where.stdout

    report = tmp_path / "r.md"
    smoke = {**offline, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
             "OMP_NUM_THREADS": "1"}
    # the two launchers, the bench and the ZeRO check: what the bundle brings; the other smoke
    # cases (plain, save-reload-continue) run in test_gpu_check.py
    r = check([py, REPO / "launch" / "gpu_check.py", "--cpu-smoke", "--cases", "ddp,rtx4070",
               "--out", report], smoke, 900)
    text = report.read_text()
    assert "verdict: everything ran" in text, r.stdout[-3000:]
    cases = md_table(text, "Backends")
    assert [c["case"] for c in cases] == ["DDP x1", "DeepSpeed rtx4070.json"], cases
    assert all(c["status"] == "ok" for c in cases), cases
    assert "fp32-exact" in text  # the ZeRO check's bf16 rows
    bench = text.split("## Bench\n", 1)[1]
    assert "`: ok, " in bench and "== seq" in bench, bench
