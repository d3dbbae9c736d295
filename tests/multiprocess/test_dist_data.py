"""What the ranks read: disjoint data, and together what one process reads (in-process, fast).

The stream shards by rank with whole files (shards) per rank whenever there are at least as
many files as ranks (``ds.shard``), else every world-th row of the stream
(``split_dataset_by_node``). Packing and the shuffle buffer then run per rank, so:
- rank sets are always disjoint (a document goes to one rank only);
- "together they read what one process reads" holds step by step when each document is one
  packed sequence and ``data.shuffle_buffer=1`` (no packing across documents, no reordering);
  with a shuffle buffer it holds over an epoch, not per step, and with documents longer than a
  sequence the packing boundaries differ (the same text, cut at other places).
"""
from __future__ import annotations

import json

from distil_scale.config import DataConfig
from distil_scale.data.stream import PretrainStream
from fixtures import write_aligned_corpus

SEQ = 32


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


def _files(d, n_files=5, rows=6):
    d.mkdir()
    for f in range(n_files):
        (d / f"part{f}.jsonl").write_text("".join(
            json.dumps({"text": f"file{f} row{i} the river and the city"}) + "\n"
            for i in range(rows)), encoding="utf-8")
    return d


def test_ranks_get_whole_files_when_the_count_does_not_divide(tmp_path):
    """5 files, 2 ranks: datasets' split_dataset_by_node would have every rank read all 5
    files and keep every other row; whole files per rank instead (3 and 2)."""
    from distil_scale.data.sources import iter_texts, open_from_config

    cfg = DataConfig(source=str(_files(tmp_path / "f")), max_seq_len=SEQ)
    per_rank = []
    for rank in (0, 1):
        ds = open_from_config(cfg, seed=0, rank=rank, world=2)
        rows = [t.split()[:2] for t in iter_texts(ds, cfg)]
        files = {f for f, _ in rows}
        assert ds.num_shards == len(files) < 5
        assert len(rows) == 6 * len(files)  # whole files: every row of each
        per_rank.append({tuple(r) for r in rows})
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == 30


def test_hub_streams_shuffle_shard_order_only_and_resume_exactly(tmp_path):
    """What open_stream does to a hub dataset, on a local multi-file one: the shard order
    follows the seed, rows keep their order within a shard, and the state resumes exactly
    (datasets' own shuffle buffer would lose its content on resume)."""
    from datasets import load_dataset

    from distil_scale.data.sources import shard_for_rank, shuffle_shards

    files = sorted(str(p) for p in _files(tmp_path / "f").iterdir())

    def open_(seed):
        return shuffle_shards(load_dataset("json", data_files=files, split="train",
                                           streaming=True), seed)

    rows = [r["text"].split()[:2] for r in open_(1)]
    order = [f for i, (f, _) in enumerate(rows) if i % 6 == 0]
    assert sorted(order) == [f"file{i}" for i in range(5)]
    assert [int(r[1][3:]) for r in rows] == list(range(6)) * 5  # in order within each file
    assert order != [f for i, (f, _) in enumerate([r["text"].split()[:2] for r in open_(2)])
                     if i % 6 == 0]
    ds = open_(1)
    it = iter(ds)
    head = [next(it)["text"] for _ in range(8)]
    state = ds.state_dict()
    again = open_(1)
    again.load_state_dict(state)
    assert head + [r["text"] for r in again] == [" ".join(r) + " the river and the city"
                                                 for r in rows]
    # and ranks then split whole shards
    r0 = {r["text"] for r in shard_for_rank(open_(1), 0, 2)}
    r1 = {r["text"] for r in shard_for_rank(open_(1), 1, 2)}
    assert not r0 & r1 and len(r0 | r1) == 30 and {len(r0), len(r1)} == {18, 12}
