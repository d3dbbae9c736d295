"""What the ranks read: disjoint data, and together what one process reads (in-process, fast).

The stream shards by rank with datasets' ``split_dataset_by_node``: whole files per rank when
the number of files divides by the world size, else every world-th row of the stream. Packing
and the shuffle buffer then run per rank, so:
- rank sets are always disjoint (a document goes to one rank only);
- "together they read what one process reads" holds step by step when each document is one
  packed sequence and ``data.shuffle_buffer=1`` (no packing across documents, no reordering);
  with a shuffle buffer it holds over an epoch, not per step, and with documents longer than a
  sequence the packing boundaries differ (the same text, cut at other places).
"""
from __future__ import annotations

import json
import pytest
from transformers import AutoTokenizer

from distil_scale.config import DataConfig
from distil_scale.data.loader import PretrainStream
from fixtures import tokenizer_path, write_aligned_corpus

SEQ = 32


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tokenizer_path())


def read(cfg, tok, micro, steps, rank=0, world=1) -> list[list[tuple]]:
    """``steps`` batches of ``micro`` sequences, as tuples of token ids."""
    s = PretrainStream(cfg, tok, micro, seed=0, rank=rank, world=world)
    return [[tuple(r) for r in s.next_batch().tolist()] for _ in range(steps)]


def test_two_ranks_read_per_step_what_one_process_reads(tmp_path, tok):
    path = write_aligned_corpus(tmp_path / "a.jsonl", tok, SEQ, n_train=48, n_heldout=4,
                                heldout_fraction=0.05)
    cfg = DataConfig(source=path, max_seq_len=SEQ, shuffle_buffer=1, heldout_fraction=0.05)
    micro, steps = 2, 10  # 1 process: accumulation 2 -> 4 sequences a step
    one = read(cfg, tok, 2 * micro, steps)
    r0 = read(cfg, tok, micro, steps, rank=0, world=2)
    r1 = read(cfg, tok, micro, steps, rank=1, world=2)
    for s in range(steps):
        assert not set(r0[s]) & set(r1[s])
        assert sorted(r0[s] + r1[s]) == sorted(one[s]), f"step {s}"
    assert len({q for b in one for q in b}) == 2 * micro * steps  # no document read twice


def test_ranks_read_disjoint_whole_files_through_a_shuffle_buffer(tmp_path, tok):
    src = write_aligned_corpus(tmp_path / "all.jsonl", tok, SEQ, n_train=64, n_heldout=0,
                               heldout_fraction=1e-9)
    texts = [json.loads(ln)["text"] for ln in open(src, encoding="utf-8")]
    d = tmp_path / "files"
    d.mkdir()
    for i in range(4):  # 4 files of 16 documents: 2 whole files per rank
        (d / f"part{i}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts[i::4]), encoding="utf-8")
    file_of = {(tok.cls_token_id, *tok(t, add_special_tokens=False)["input_ids"],
                tok.sep_token_id): i % 4 for i, t in enumerate(texts)}
    cfg = DataConfig(source=str(d), max_seq_len=SEQ, shuffle_buffer=8, heldout_fraction=1e-9)
    # 24 of each rank's 32 documents: the shuffle buffer (8) has not yet reached the next
    # epoch (datasets may deal the files out differently then; each epoch stays disjoint)
    r0 = {q for b in read(cfg, tok, 4, 6, rank=0, world=2) for q in b}
    r1 = {q for b in read(cfg, tok, 4, 6, rank=1, world=2) for q in b}
    assert len(r0) == len(r1) == 24
    assert not r0 & r1, "a sequence was read by both ranks"
    f0, f1 = {file_of[q] for q in r0}, {file_of[q] for q in r1}
    assert len(f0) == len(f1) == 2 and not f0 & f1, (f0, f1)  # whole files, one rank each
    # and one epoch through the whole corpus, unshuffled: the union is exactly the corpus
    cfg1 = DataConfig(source=str(d), max_seq_len=SEQ, shuffle_buffer=1, heldout_fraction=1e-9)
    one = {q for b in read(cfg1, tok, 8, 8) for q in b}
    both = [q for r in (0, 1) for b in read(cfg1, tok, 4, 8, rank=r, world=2) for q in b]
    assert len(one) == 64 and len(both) == 64 and set(both) == one
