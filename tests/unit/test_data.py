import io
import json
import math

import pytest
import torch

from fixtures import write_corpus
from distil_scale.errors import UserError
from distil_scale.config import DataConfig
from distil_scale.data.eval_cache import build_eval_set
from distil_scale.data.loader import BatchLoader
from distil_scale.data.masking import DynamicMasker
from distil_scale.data.packing import Packer
from distil_scale.data.sources import is_heldout, iter_texts
from distil_scale.data.stream import PretrainStream


def _cfg(source, **kw):
    base = dict(source=str(source), max_seq_len=32, shuffle_buffer=16, heldout_fraction=0.1,
                eval_sequences=8, prefetch=0)
    base.update(kw)
    return DataConfig(**base)


def test_packing_keeps_every_token_in_order():
    p = Packer(8, cls_id=101, sep_id=102)
    docs = [list(range(1000, 1013)), list(range(2000, 2004)), list(range(3000, 3020))]
    seqs = [s for d in docs for s in p.add(d)]
    assert all(len(s) == 8 and s[0] == 101 and s[-1] == 102 for s in seqs)
    body = [t for s in seqs for t in s[1:-1]] + p.buffer
    flat = docs[0] + [102] + docs[1] + [102] + docs[2]
    # boundary [SEP]s that fall exactly on a cut are dropped (the sequence's own closes it)
    assert [t for t in body if t != 102] == [t for t in flat if t != 102]
    assert body[:13] == docs[0]  # a long document continues into the next sequence


def test_stream_resume_is_exact(tmp_path, tok):
    src = write_corpus(tmp_path / "c.jsonl", n_docs=40)
    cfg = _cfg(src)
    a = PretrainStream(cfg, tok, 4, seed=3)
    for _ in range(5):
        a.next_batch()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # survives serialisation, as the trainer writes it
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    want = [a.next_batch() for _ in range(30)]  # crosses an epoch boundary
    b = PretrainStream(cfg, tok, 4, seed=3)
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(30)]
    assert all(torch.equal(x, y) for x, y in zip(want, got))
    assert a.epoch >= 1


def test_prefetching_loader_state_is_that_of_the_batch_handed_out(tmp_path, tok):
    src = write_corpus(tmp_path / "c.jsonl", n_docs=30)
    cfg = _cfg(src)
    ref = PretrainStream(cfg, tok, 4, seed=1)
    ref_batches = [ref.next_batch() for _ in range(12)]
    loader = BatchLoader(PretrainStream(cfg, tok, 4, seed=1), prefetch=3)
    first = [next(loader) for _ in range(4)]
    state = loader.state_dict()
    loader.close()
    resumed = BatchLoader(PretrainStream(cfg, tok, 4, seed=1), prefetch=3)
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(8)]
    resumed.close()
    assert all(torch.equal(x, y) for x, y in zip(first + rest, ref_batches))


def test_a_loader_state_of_an_older_version_is_one_line(tmp_path, tok):
    cfg = _cfg(write_corpus(tmp_path / "c.jsonl", n_docs=10))
    # format 1: the loader's state was its stream's
    old = {k: v for k, v in PretrainStream(cfg, tok, 4, seed=1).state_dict().items()
           if k != "format"}
    with pytest.raises(UserError, match=r"^--resume: the checkpoint is from an older "
                                        r"version .*; resume it with that version or start a "
                                        r"new run\.output_dir$"):
        BatchLoader(PretrainStream(cfg, tok, 4, seed=1), prefetch=0).load_state_dict(old)


def test_ranks_read_disjoint_documents(tmp_path, tok):
    # each document carries one marker word found nowhere else
    markers = [w for w in tok.convert_ids_to_tokens(list(range(5000, 5200)))
               if w.isalpha() and w not in ("document",)][:20]
    d = tmp_path / "docs"
    d.mkdir()
    for i, m in enumerate(markers):
        (d / f"{i:03d}.txt").write_text(" ".join([m] + ["the river"] * 30))
    cfg = _cfg(d, shuffle_buffer=1, heldout_fraction=1e-6, max_seq_len=64)

    def docs_read(rank, world):
        """Markers of the documents a rank's stream reads in one epoch (of its own source)."""
        s = PretrainStream(cfg, tok, 2, seed=0, rank=rank, world=world)
        return [markers.index(text.split()[0]) for text in iter_texts(s.ds, cfg)]

    r0, r1 = docs_read(0, 2), docs_read(1, 2)
    assert len(r0) == len(r1) == 10
    assert not set(r0) & set(r1), (r0, r1)
    assert set(r0) | set(r1) == set(docs_read(0, 1)) == set(range(20))


def test_heldout_documents_never_train(tmp_path, tok):
    src = write_corpus(tmp_path / "c.jsonl", n_docs=50)
    cfg = _cfg(src, heldout_fraction=0.3)
    rows = [json.loads(ln)["text"] for ln in src.read_text().splitlines()]
    held = [t for t in rows if is_heldout(t, 0.3)]
    assert 3 < len(held) < 30
    s = PretrainStream(cfg, tok, 1, seed=0)
    # "document N": token 1 is the number; held-out numbers never start a training document
    ev = build_eval_set(cfg, tok, 4)
    assert ev.shape == (4, 32)
    train_tokens = {t for _ in range(60) for t in s.next_batch()[0].tolist()}
    held_nums = {tok(t, add_special_tokens=False)["input_ids"][1] for t in held}
    train_nums = {tok(t, add_special_tokens=False)["input_ids"][1] for t in rows
                  if not is_heldout(t, 0.3)}
    only_held = held_nums - train_nums
    assert only_held and not (only_held & train_tokens)
    # and the eval set is made of held-out documents only
    assert set(ev.flatten().tolist()) & (held_nums | train_nums) <= held_nums


def test_empty_and_blank_corpora_and_bad_utf8(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"fine text here " * 20)
    (bad / "b.txt").write_bytes(b"a transfer fee of \xa315.8m " * 20)
    for name in ("empty.txt", "blank.txt"):
        with pytest.raises(UserError, match="data.source: no training text"):
            PretrainStream(_cfg(tmp_path / name), tok, 2).next_batch()
    with pytest.raises(UserError, match="not valid UTF-8.*encoding_errors=replace"):
        for _ in range(20):
            PretrainStream(_cfg(bad, heldout_fraction=0.001), tok, 2).next_batch()
    ok = PretrainStream(_cfg(bad, heldout_fraction=0.001, encoding_errors="replace"), tok, 2)
    assert ok.next_batch().shape == (2, 32)
    with pytest.raises(UserError, match="no such file"):
        PretrainStream(_cfg(tmp_path / "missing.jsonl"), tok, 2)


def test_missing_text_field(tmp_path, tok):
    p = tmp_path / "c.jsonl"
    p.write_text('{"body": "hello world"}\n')
    with pytest.raises(UserError, match="data.text_field"):
        PretrainStream(_cfg(p), tok, 1).next_batch()


def test_dynamic_masking_proportions(tok):
    V = len(tok)
    special = tok.all_special_ids
    m = DynamicMasker(V, special, tok.mask_token_id, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, V, (32, 64), generator=g)
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    att = torch.ones_like(ids)
    n_tok = n_sel = n_mask = n_keep = n_rand = 0
    masks = []
    for step in range(50):
        mb = m(ids, att, step)
        sel = mb.positions
        assert not sel[:, 0].any() and not sel[:, -1].any()  # specials never targets
        assert torch.equal(ids[sel], mb.labels)
        n_tok += ids.numel()
        n_sel += int(sel.sum())
        out = mb.input_ids[sel]
        n_mask += int((out == tok.mask_token_id).sum())
        n_keep += int((out == mb.labels).sum())
        n_rand += int(((out != tok.mask_token_id) & (out != mb.labels)).sum())
        masks.append(sel)
        assert torch.equal(mb.input_ids[~sel], ids[~sel])
    assert n_sel == 50 * 32 * math.ceil(0.15 * 64)  # ceil(p * tokens) per sequence
    assert n_mask / n_sel == pytest.approx(0.8, abs=0.02)
    assert n_keep / n_sel == pytest.approx(0.1, abs=0.02)
    assert n_rand / n_sel == pytest.approx(0.1, abs=0.02)
    assert not torch.equal(masks[0], masks[1])  # dynamic: a new mask every batch


def test_masks_are_a_function_of_seed_step_and_tokens(tok):
    """Independent of micro-batching, rank and resume: what makes accumulation exact."""
    ids = torch.randint(1000, len(tok), (4, 32))
    att = torch.ones_like(ids)
    a = DynamicMasker(len(tok), tok.all_special_ids, tok.mask_token_id, seed=5)
    b = DynamicMasker(len(tok), tok.all_special_ids, tok.mask_token_id, seed=5)
    whole = a(ids, att, step=7)
    halves = [b(ids[:2], att[:2], step=7), b(ids[2:], att[2:], step=7)]
    assert torch.equal(whole.positions, torch.cat([h.positions for h in halves]))
    assert torch.equal(whole.input_ids, torch.cat([h.input_ids for h in halves]))
    assert not torch.equal(a(ids, att, step=8).positions, whole.positions)  # dynamic
    c = DynamicMasker(len(tok), tok.all_special_ids, tok.mask_token_id, seed=6)
    assert not torch.equal(c(ids, att, step=7).positions, whole.positions)


def test_frequency_smoothing_favours_rare_tokens(tok):
    V = len(tok)
    common, rare = 2000, 2001
    counts = torch.ones(V, dtype=torch.long)
    counts[common], counts[rare] = 1_000_000, 10
    ids = torch.full((8, 64), common)
    ids[:, ::8] = rare  # 1 in 8 tokens is rare
    m_u = DynamicMasker(V, tok.all_special_ids, tok.mask_token_id, seed=0)
    m_s = DynamicMasker(V, tok.all_special_ids, tok.mask_token_id, seed=0, token_counts=counts,
                        smoothing=0.7)
    att = torch.ones_like(ids)
    share_u = sum(float((m_u(ids, att, i).labels == rare).float().mean()) for i in range(20)) / 20
    share_s = sum(float((m_s(ids, att, i).labels == rare).float().mean()) for i in range(20)) / 20
    assert share_u == pytest.approx(1 / 8, abs=0.05)
    # (1e6/10)^0.7 ~ 3000x likelier per token: a row's 8 rare tokens are among its 10 targets
    assert share_s == pytest.approx(8 / 10, abs=0.01)
