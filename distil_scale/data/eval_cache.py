"""The held-out evaluation set and the training token counts: read from a prepared shard
directory, or from the text source once and kept in a cache directory keyed by everything that
changes them (source, split, field, held-out fraction, sequence length, vocabulary).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fsio import atomic_write
from .packing import Packer, encode, fast_tokenizer, vocab_hash
from .shards import read_heldout, read_token_counts
from .sources import is_heldout, iter_texts, open_from_config, source_fingerprint
from .stream import is_shard_dir, refuse_unfinished


def _cache_file(cache_dir, kind: str, data_cfg, tokenizer, **extra) -> Path:
    key = {"kind": kind, "source": source_fingerprint(data_cfg.source),
           "config_name": data_cfg.config_name, "split": data_cfg.split,
           "text_field": data_cfg.text_field, "encoding_errors": data_cfg.encoding_errors,
           "heldout_fraction": data_cfg.heldout_fraction, "max_seq_len": data_cfg.max_seq_len,
           "vocab": vocab_hash(tokenizer), **extra}
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir).expanduser() / f"{kind}-{h}.npy"


def _cached(path: Path | None) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        return np.load(path)
    except (OSError, ValueError):
        return None  # a damaged entry is built again


def _cache_save(path: Path | None, arr: np.ndarray) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, arr))  # several ranks may build the same entry


def _prepared_or_cached(data_cfg, tokenizer, read_prepared, kind: str, cache_dir, open_fn,
                        **key) -> tuple[np.ndarray | None, Path | None]:
    """(what a shard directory holds, or a cached entry, or None; the entry's path)."""
    if is_shard_dir(data_cfg.source):
        return read_prepared().numpy(), None
    refuse_unfinished(data_cfg.source)
    path = (_cache_file(cache_dir, kind, data_cfg, tokenizer, **key)
            if cache_dir is not None and open_fn is open_from_config else None)
    return _cached(path), path


def build_eval_set(data_cfg, tokenizer, n: int, *, seed: int = 0, open_fn=open_from_config,
                   cache_dir=None) -> torch.Tensor:
    """The first ``n`` packed sequences of held-out documents (the same on every rank): a shard
    directory's heldout.npy, or read from the stream once and kept under ``cache_dir``."""
    arr, path = _prepared_or_cached(data_cfg, tokenizer, lambda: read_heldout(
        data_cfg, tokenizer, n), "eval", cache_dir, open_fn, n=n, seed=seed)
    if arr is None:
        fast = fast_tokenizer(tokenizer)
        packer = Packer(data_cfg.max_seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
        seqs, have, any_text = [], 0, False
        for text in iter_texts(open_fn(data_cfg, seed=seed), data_cfg):
            any_text = any_text or bool(text.strip())
            if text.strip() and is_heldout(text, data_cfg.heldout_fraction):
                s = packer.add(encode(fast, [text])[0])
                seqs.append(s)
                have += len(s)
                if have >= n:
                    break
        if not any_text:  # not a held-out problem: there is no text at all
            raise UserError(f"data.source: no text in '{data_cfg.source}' (empty, or only "
                            "blank lines); give it real text")
        if not have:
            raise UserError(f"data.heldout_fraction: no held-out sequence of "
                            f"{data_cfg.max_seq_len} tokens in '{data_cfg.source}'; raise "
                            "data.heldout_fraction or give more text")
        arr = np.concatenate(seqs)[:n]
        _cache_save(path, arr)
    return torch.from_numpy(arr.astype(np.int64))


def scan_token_counts(data_cfg, tokenizer, n_docs: int, *, seed: int = 0,
                      open_fn=open_from_config, cache_dir=None) -> torch.Tensor:
    """Token frequencies over the first ``n_docs`` training documents (a shard directory's
    token_counts.npy counts all of them), kept under ``cache_dir`` when given."""
    counts, path = _prepared_or_cached(data_cfg, tokenizer, lambda: read_token_counts(
        data_cfg, tokenizer), "counts", cache_dir, open_fn, n_docs=n_docs, seed=seed)
    if counts is None:
        V = len(tokenizer)
        fast = fast_tokenizer(tokenizer)
        counts = np.zeros(V, dtype=np.int64)
        batch, seen = [], 0
        for text in iter_texts(open_fn(data_cfg, seed=seed), data_cfg):
            if not text.strip() or is_heldout(text, data_cfg.heldout_fraction):
                continue
            batch.append(text)
            seen += 1
            if len(batch) == 64 or seen >= n_docs:
                ids = np.concatenate(encode(fast, batch))
                counts += np.bincount(ids, minlength=V)[:V]
                batch = []
            if seen >= n_docs:
                break
        if batch:
            counts += np.bincount(np.concatenate(encode(fast, batch)), minlength=V)[:V]
        _cache_save(path, counts)
    return torch.from_numpy(counts.astype(np.int64))
