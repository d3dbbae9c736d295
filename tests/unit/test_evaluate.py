"""Held-out scoring: documents cut into rows with fixed masks, and per-position scores that
reduce to mlm_eval's numbers."""
import contextlib

import numpy as np
import pytest
import torch

from distil_scale.data.masking import DynamicMasker
from distil_scale.evaluate import (document_eval_batches, masked_lm_forward, mlm_eval,
                                   mlm_position_scores)
from distil_scale.families import load_mlm

CLS, SEP, PAD, MASK = 1, 2, 0, 3


def _masker(seed=12345):
    return DynamicMasker(50, [PAD, CLS, SEP, MASK], MASK, seed=seed)


def test_documents_become_rows_with_their_owner_and_fixed_draws():
    docs = [list(range(10, 22)), list(range(30, 35))]  # 12 tokens -> 2 rows of 8; 5 -> 1 row
    batches, owner = document_eval_batches(docs, _masker(), 8, CLS, SEP, PAD, batch=2, draws=2)
    assert len(batches) == 4  # 3 rows in batches of 2, twice
    first = batches[0]
    assert first.input_ids.shape == (2, 8) and owner[0].tolist() == [0, 0]
    assert owner[1].tolist() == [1] and owner[3].tolist() == [1]
    row = batches[1].attention_mask[0].tolist()
    assert row == [1] * 7 + [0]  # [CLS] 5 tokens [SEP], then padding
    labels = torch.cat([b.labels for b in batches[:2]])
    assert set(labels.tolist()) <= set(range(10, 22)) | set(range(30, 35))  # never special
    again, _ = document_eval_batches(docs, _masker(), 8, CLS, SEP, PAD, batch=2, draws=2)
    assert all(torch.equal(a.masked_rows, b.masked_rows) for a, b in zip(batches, again))
    assert not all(torch.equal(a.masked_rows, b.masked_rows)
                   for a, b in zip(batches[:2], batches[2:]))  # the second draw differs


def test_position_scores_reduce_to_mlm_eval_and_kl_to_itself_is_zero(tiny_teacher, tok):
    mlm = load_mlm(str(tiny_teacher))[0].eval()
    texts = ["the river flows through the old town " * 4, "people bring fruit and bread"]
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    masker = DynamicMasker(len(tok), tok.all_special_ids, tok.mask_token_id, seed=12345)
    batches, _ = document_eval_batches(docs, masker, 16, tok.cls_token_id, tok.sep_token_id,
                                       tok.pad_token_id, batch=4)
    fwd = masked_lm_forward(mlm)
    s = mlm_position_scores(fwd, batches, torch.device("cpu"), contextlib.nullcontext,
                            teacher=fwd)
    n = sum(len(b.labels) for b in batches)
    assert len(s["ce"]) == len(s["correct"]) == len(s["kl"]) == n
    assert np.abs(s["kl"]).max() < 1e-5
    loss, acc = mlm_eval(fwd, batches, torch.device("cpu"), contextlib.nullcontext)
    assert loss == pytest.approx(s["ce"].mean()) and acc == pytest.approx(s["correct"].mean())
    # a tiny random model is near uniform over the 30,522-token vocabulary
    assert loss == pytest.approx(np.log(len(tok)), rel=0.05)
