"""The study's endpoints, computed the same way for every model.

Primary: masked-LM cross-entropy, accuracy and KL(teacher || student) over every held-out
document of the pretraining corpus, with the same fixed mask draws for every model (the
evaluation masker's seed; draw k uses step -k), kept per document so the evaluation error can
be bootstrapped over documents. Floor: always guessing the most frequent training token (its
accuracy), and the unigram distribution of the training tokens (its cross-entropy).

Secondary: an SST-2 linear probe. Each model's mean-pooled last hidden states of a fixed
training subset feed a logistic regression with a fixed regularisation (C = 1 on standardised
features, chosen before any run); it is scored once on the dev set, so nothing is selected on
the reported split. Frozen features are what pretraining changed; fine-tuning every student
would cost more than the whole pretraining budget on two CPU cores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .. import families, runtime
from ..data.masking import make_eval_masker
from ..data.packing import encode, fast_tokenizer
from ..data.sources import is_heldout, iter_texts, open_from_config
from ..evaluate import document_eval_batches, masked_lm_forward, mlm_position_scores
from ..families import load_mlm
from ..losses import gather_rows
from ..glue.data import load_raw, subsample
from ..glue.tasks import get_task
from ..hub import load_tokenizer
from .study_stats import per_unit_sums

EVAL_BATCH = 16
PROBE_C = 1.0
PROBE_MAX_LEN = 64
HELDOUT_READ_SEED = 0  # the file order the held-out documents are read in: fixed, not run.seed


def heldout_documents(data_cfg, tokenizer, max_docs: int) -> list[list[int]]:
    """Token ids of the held-out documents (``is_heldout``), in a fixed order; ``max_docs``
    caps a large corpus (0: all)."""
    fast = fast_tokenizer(tokenizer)
    docs = []
    for text in iter_texts(open_from_config(data_cfg, seed=HELDOUT_READ_SEED), data_cfg):
        if text.strip() and is_heldout(text, data_cfg.heldout_fraction):
            docs.append(encode(fast, [text])[0].tolist())
            if max_docs and len(docs) >= max_docs:
                break
    return [d for d in docs if d]


def _batches(docs, tokenizer, cfg, draws: int):
    return document_eval_batches(docs, make_eval_masker(tokenizer, cfg.masking),
                                 cfg.data.max_seq_len, tokenizer.cls_token_id,
                                 tokenizer.sep_token_id, tokenizer.pad_token_id or 0,
                                 EVAL_BATCH, draws)


def _doc_of_positions(batches, doc_of, seq_len: int) -> np.ndarray:
    return np.concatenate([owner[mb.masked_rows.numpy() // seq_len]
                           for mb, owner in zip(batches, doc_of)]) if batches else np.zeros(0)


def floor_scores(docs, tokenizer, cfg, draws: int, counts: torch.Tensor) -> dict:
    """Per-document sums of the floor: the most frequent training token as every guess, and
    the unigram distribution's cross-entropy (add-one smoothed)."""
    batches, doc_of = _batches(docs, tokenizer, cfg, draws)
    labels = np.concatenate([mb.labels.numpy() for mb in batches])
    c = counts.double().clone()
    c[tokenizer.all_special_ids] = 0
    logp = torch.log((c + 1) / (c + 1).sum()).numpy()
    scores = {"ce": -logp[labels], "correct": (labels == int(c.argmax())).astype(np.float64)}
    return doc_sums(scores, _doc_of_positions(batches, doc_of, cfg.data.max_seq_len), len(docs))


def doc_sums(scores: dict, unit_of: np.ndarray, n_docs: int) -> dict:
    out = {"n": per_unit_sums(np.ones(len(unit_of)), unit_of, n_docs)}
    for k, v in scores.items():
        out[k] = per_unit_sums(v, unit_of, n_docs)
    return out


class _Rows:
    """The masked LM's forward split at its head: ``record`` keeps the hidden rows it computes
    (the teacher, scored once); ``replay`` feeds kept rows to the head in the same batch order,
    so a student's KL costs no second teacher forward."""

    def __init__(self, mlm, kept: list | None = None):
        self.mlm, self.kept, self.i = mlm, kept, 0
        self.recorded: list = []

    def record(self, ids, mask, positions):
        rows = gather_rows(families.encode(self.mlm, ids, mask)[0], positions)
        self.recorded.append(rows.float().cpu())
        return families.head_logits(self.mlm, rows)

    def replay(self, ids, mask, positions):
        rows = self.kept[self.i]
        self.i += 1
        if len(rows) != len(positions):
            raise RuntimeError("kept teacher rows do not match this batch's masked positions; "
                               "delete the study's score/ cells and run it again")
        return families.head_logits(self.mlm, rows.to(ids.device))


def _autocast():
    """bf16 on a CPU that does it natively (1.5-1.8x here), as the runs' own evaluations."""
    cpu = torch.device("cpu")
    return runtime.autocast(cpu, runtime.resolve_precision("auto", cpu))


@torch.no_grad()
def score_teacher(teacher_dir: str, docs, tokenizer, cfg, draws: int) -> tuple[dict, list]:
    """Per-document sums of the teacher's ce / correct, and its hidden rows at every masked
    position (what each student's KL reads)."""
    batches, doc_of = _batches(docs, tokenizer, cfg, draws)
    t = _Rows(load_mlm(teacher_dir)[0].eval())
    s = mlm_position_scores(t.record, batches, torch.device("cpu"), _autocast)
    return doc_sums(s, _doc_of_positions(batches, doc_of, cfg.data.max_seq_len),
                    len(docs)), t.recorded


@torch.no_grad()
def score_model(model_dir: str, teacher_dir: str, teacher_rows: list, docs, tokenizer, cfg,
                draws: int) -> dict:
    """Per-document sums of a model's ce / correct / kl (KL(teacher || model) from the
    teacher's kept rows)."""
    batches, doc_of = _batches(docs, tokenizer, cfg, draws)
    model = load_mlm(model_dir)[0].eval()
    t = _Rows(load_mlm(teacher_dir)[0].eval(), teacher_rows)
    s = mlm_position_scores(masked_lm_forward(model), batches, torch.device("cpu"), _autocast,
                            teacher=t.replay)
    return doc_sums(s, _doc_of_positions(batches, doc_of, cfg.data.max_seq_len), len(docs))


def totals(sums: dict) -> dict:
    """Means over every scored position: acc (from the ``correct`` sums), ce, kl."""
    n = float(sums["n"].sum())
    return {"positions": int(n), **{("acc" if k == "correct" else k): float(v.sum()) / max(n, 1.0)
                                    for k, v in sums.items() if k != "n"}}


def save_sums(path: Path, sums: dict) -> None:
    np.savez(path, **sums)


def load_sums(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# -- SST-2 probe ------------------------------------------------------------------------------
def probe_data(data_dir: str, n_train: int, max_eval: int) -> dict:
    """A fixed SST-2 training subset and the dev set (or its first fixed subset)."""
    raw = load_raw(get_task("sst2"), data_dir)
    train = subsample(raw["train"], n_train, 0)
    dev = subsample(raw["dev"], max_eval, 0)
    return {"train": ([e.text_a for e in train], [int(e.label) for e in train]),
            "dev": ([e.text_a for e in dev], [int(e.label) for e in dev])}


@torch.no_grad()
def mean_pooled(model, tokenizer, texts: list[str], batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], truncation=True, max_length=PROBE_MAX_LEN,
                        padding=True, return_tensors="pt")
        h = families.encode(model, enc["input_ids"], enc["attention_mask"])[0].float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((h * m).sum(1) / m.sum(1)).numpy())
    return np.concatenate(out)


def probe(model_dir: str, data: dict) -> dict:
    """Dev accuracy of a logistic regression on the frozen model's mean-pooled features, and
    which dev examples it got right (the bootstrap's units)."""
    tokenizer = load_tokenizer(model_dir, "--model", fast=True)
    model = load_mlm(model_dir)[0].eval()
    x_tr = mean_pooled(model, tokenizer, data["train"][0])
    x_dev = mean_pooled(model, tokenizer, data["dev"][0])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=2000))
    clf.fit(x_tr, data["train"][1])
    correct = (clf.predict(x_dev) == np.asarray(data["dev"][1])).astype(int)
    return {"acc": float(correct.mean()), "correct": correct.tolist()}


def majority_acc(data: dict) -> float:
    y_tr, y_dev = np.asarray(data["train"][1]), np.asarray(data["dev"][1])
    major = int(np.bincount(y_tr).argmax())
    return float((y_dev == major).mean())
