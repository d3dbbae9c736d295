"""DeepSpeed runs the student under the same autocast as the torch engines.

On CUDA, DeepSpeed's forward switches an outer ``torch.autocast`` off, so its bf16 mode would
run LayerNorm, softmax and the loss in bf16 while plain/DDP/FSDP2 keep them in fp32.
``autocast_inside`` turns it back on inside the student. On a CPU DeepSpeed leaves a CPU
autocast alone, so the mechanism is tested under the same switch-off DeepSpeed makes on CUDA,
and one step's loss is compared across the four engines in bf16.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from fixtures import PYTHON, REPO, free_port, run_env
from distil_scale.engine.deepspeed import autocast_inside

# one forward of a 2-layer DistilBERT in bf16 under each engine; DeepSpeed holds bf16 weights
# where the others hold fp32 ones under autocast (measured: 1.4e-5 relative on CPU)
LOSS_RTOL = 2e-3

ENGINES = r"""
import json, sys
import torch
from transformers import DistilBertConfig, DistilBertForMaskedLM
from distil_scale.engine import OptimSpec, make_engine

def build():
    torch.manual_seed(0)
    return DistilBertForMaskedLM(DistilBertConfig(
        vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=256, dropout=0,
        attention_dropout=0, attn_implementation="eager"))

ids = torch.randint(5, 1000, (4, 32), generator=torch.Generator().manual_seed(1))
optim = OptimSpec(lr=1e-3, total_steps=10, max_grad_norm=1.0)
kw = dict(precision="bf16", accum_steps=1, device=torch.device("cpu"))
ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
out = {}
# DeepSpeed first: it creates the world-of-one group the others then join
for name, extra in (("deepspeed", {"ds_config": ds}), ("plain", {}), ("ddp", {}), ("fsdp", {})):
    engine = make_engine(name, build(), optim, **kw, **extra)
    with engine.autocast():
        loss = engine.module(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    out[name] = float(loss)
print("losses " + json.dumps(out))
"""


def test_autocast_comes_back_on_inside_the_student():
    """What DeepSpeed does on CUDA, with a CPU autocast: switch it off around the module."""
    seen = []
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    model[1].register_forward_hook(lambda m, a, o: seen.append(torch.is_autocast_enabled("cpu")))
    autocast_inside(model, torch.device("cpu"), "bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
        y = model(torch.randn(2, 8))
        assert not torch.is_autocast_enabled("cpu")  # left as DeepSpeed set it
    assert seen == [True] and y.dtype == torch.bfloat16  # the Linear ran under autocast

    fp32 = torch.nn.Linear(8, 8)
    autocast_inside(fp32, torch.device("cpu"), "fp32")  # nothing to re-enter
    assert not fp32._forward_pre_hooks


@pytest.mark.slow
def test_one_bf16_step_has_the_same_loss_on_every_engine():
    env = run_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([PYTHON, "-c", ENGINES], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("losses "))
    losses = json.loads(line[len("losses "):])
    ref = losses["plain"]
    for name, loss in losses.items():
        assert abs(loss - ref) <= LOSS_RTOL * abs(ref), losses
