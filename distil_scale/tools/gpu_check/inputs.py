"""What the check's runs read: a random teacher at the shapes' size (nothing downloaded), the
tokenizer the package ships, and the text (the shared Wikipedia sample, else BBC news)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
from transformers.utils import logging as hf_logging

from ...assets import BERT_UNCASED
from .spec import BBC, REPO, WIKI, Shapes


def tokenizer_dir() -> str:
    """bert-base-uncased's 30,522-token WordPiece vocabulary, shipped in the package: the
    random-weight shapes need nothing else."""
    return BERT_UNCASED


def build_teacher(out: Path, shapes: Shapes) -> str:
    """A randomly initialised BertForMaskedLM at the given shapes: throughput and memory do not
    depend on the weights, and nothing is downloaded."""
    hf_logging.disable_progress_bar()  # "Writing model shards" would land in the check's output
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), **shapes.teacher)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def pick_source() -> str:
    for rel in WIKI:
        p = (REPO / rel).resolve()
        if p.is_file():
            return str(p)
    return BBC
