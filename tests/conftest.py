"""pytest set-up: offline environment, shared fixtures (built by tests/fixtures.py) and the
three groups: ``unit`` (in-process, seconds), ``integration`` (a launcher or a real run in
process), ``multiprocess`` (torchrun, deepspeed: real ranks on gloo). Run one group with
``python -m pytest -m unit``; the README's test command runs all three."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fixtures import make_tiny_teacher, minilm_path, write_corpus  # noqa: E402

GROUPS = ("unit", "integration", "multiprocess")


def pytest_configure(config):
    for g in GROUPS:
        config.addinivalue_line("markers", f"{g}: tests under tests/{g}/")


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = Path(str(item.fspath)).parent.name
        if group in GROUPS:
            item.add_marker(getattr(pytest.mark, group))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


@pytest.fixture(scope="session")
def tok():
    """The demo teacher's tokenizer (all-MiniLM-L6-v2's uncased WordPiece, 30,522 tokens)."""
    return AutoTokenizer.from_pretrained(minilm_path())
