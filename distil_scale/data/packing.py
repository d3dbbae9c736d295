"""Tokenize documents (in order, inline or in worker processes) and pack them into full
[CLS] ... [SEP] sequences of max_seq_len.

Documents are concatenated with [SEP] between them and cut into chunks of max_seq_len - 2, so
no document is truncated to its first chunk and no sequence carries padding.

Tokenization is most of the data cost (~0.7M tokens/s per core with the fast tokenizer), so it
can run in worker processes. Chunks of documents go out to the pool and come back in the order
they went out: the packed sequences are the same whatever the number of workers, which is what
keeps resume exact. Workers are spawned, not forked: the parent has threads (the prefetching
loader, torch's pools) and a fork taken while one of them holds a lock can hang.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import itertools
import multiprocessing
import sys
import weakref
from typing import Any, Iterable, Iterator

import numpy as np


class Packer:
    def __init__(self, max_seq_len: int, cls_id: int, sep_id: int):
        self.seq_len = max_seq_len
        self.body = max_seq_len - 2
        self.cls_id, self.sep_id = cls_id, sep_id
        self._rest = np.empty(0, dtype=np.int32)

    @property
    def buffer(self) -> list[int]:
        """Tokens waiting for the next document (fewer than a sequence's body)."""
        return self._rest.tolist()

    def add(self, doc_ids) -> np.ndarray:
        """Append one document; return the sequences it finished, (k, max_seq_len) int32."""
        doc = np.asarray(doc_ids, dtype=np.int32)
        if doc.size == 0:
            return np.empty((0, self.seq_len), dtype=np.int32)
        flat = (np.concatenate([self._rest, np.array([self.sep_id], np.int32), doc])
                if self._rest.size else doc)
        starts, pos, n = [], 0, flat.size
        while n - pos >= self.body:
            starts.append(pos)
            pos += self.body
            if pos < n and flat[pos] == self.sep_id:
                pos += 1  # a boundary [SEP] would duplicate the sequence's final one
        self._rest = flat[pos:].copy()  # no view that would keep a long document alive
        out = np.empty((len(starts), self.seq_len), dtype=np.int32)
        out[:, 0], out[:, -1] = self.cls_id, self.sep_id
        for j, s in enumerate(starts):
            out[j, 1:-1] = flat[s:s + self.body]
        return out

    def state_dict(self) -> dict:
        return {"buffer": self._rest.tolist()}

    def load_state_dict(self, sd: dict) -> None:
        self._rest = np.asarray(sd["buffer"], dtype=np.int32).reshape(-1)


# -- tokenization -----------------------------------------------------------------------------
_FAST: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def fast_tokenizer(tokenizer):
    """The tokenizer's Rust backend without truncation or padding: what
    ``tokenizer(text, add_special_tokens=False)["input_ids"]`` computes, without transformers'
    per-call overhead. A copy, because a tokenizer.json may carry truncation (MiniLM's cuts at
    128 tokens) that transformers switches off per call."""
    try:
        return _FAST[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError("packing needs a fast tokenizer (tokenizer.json)")
    fast = copy.deepcopy(backend)
    fast.no_truncation()
    fast.no_padding()
    try:
        _FAST[tokenizer] = fast
    except TypeError:
        pass
    return fast


_VOCAB_HASH: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def vocab_hash(tokenizer) -> str:
    """sha256 of the vocabulary (tokens in id order, added tokens included): what must match
    for token ids written by one tokenizer to mean the same to another."""
    try:
        return _VOCAB_HASH[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab()
    text = "\n".join(t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    h = hashlib.sha256(text.encode("utf-8")).hexdigest()
    try:
        _VOCAB_HASH[tokenizer] = h
    except TypeError:
        pass
    return h


def encode(fast, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), int32."""
    if not texts:
        return []
    ids = [e.ids for e in fast.encode_batch_fast(texts, add_special_tokens=False)]
    lens = [len(x) for x in ids]
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=sum(lens))
    return np.split(flat, np.cumsum(lens)[:-1])


_WORKER_TOKENIZER = None


def _worker_init(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # one flat array and the lengths pickle in two buffers instead of one object per document
    parts = encode(_WORKER_TOKENIZER, texts)
    lens = np.array([len(p) for p in parts], dtype=np.int64)
    return (np.concatenate(parts) if parts else np.empty(0, np.int32)), lens


@contextlib.contextmanager
def _main_hidden():
    """Spawned workers need only this module, but multiprocessing re-imports the parent's
    ``__main__`` in each: a script without a main guard would run again, and ``python -`` or
    ``-c`` has no file to import. Hidden while the pool starts its workers."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    try:
        for k in saved:
            setattr(main, k, None) if k == "__spec__" else delattr(main, k)
        yield
    finally:
        main.__dict__.update(saved)


class Encoder:
    """Tokenizes chunks of documents in order: inline (``workers=0``) or in ``workers`` spawned
    processes with a bounded number of chunks in flight (Pool.imap would read an endless
    stream to its end)."""

    def __init__(self, tokenizer, workers: int = 0):
        self.fast = fast_tokenizer(tokenizer)
        self.workers = workers
        self._pool = None
        self._finalizer = None

    def _get_pool(self):
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            with _main_hidden():
                self._pool = ctx.Pool(self.workers, initializer=_worker_init,
                                      initargs=(self.fast.to_str(),))
            self._finalizer = weakref.finalize(self, self._pool.terminate)
        return self._pool

    def map(self, chunks: Iterable[tuple[Any, list[str]]]
            ) -> Iterator[tuple[Any, list[np.ndarray]]]:
        """``(meta, texts)`` -> ``(meta, ids per text)``, in order. An error raised by
        ``chunks`` comes out after the chunks read before it."""
        if self.workers <= 0:
            for meta, texts in chunks:
                yield meta, encode(self.fast, texts)
            return
        pool = self._get_pool()
        it = iter(chunks)
        pending: collections.deque = collections.deque()
        error: BaseException | None = None
        done = False
        while True:
            while not done and error is None and len(pending) < 2 * self.workers + 1:
                try:
                    meta, texts = next(it)
                except StopIteration:
                    done = True
                    break
                except BaseException as e:  # raised after the chunks already in flight
                    error = e
                    break
                pending.append((meta, pool.apply_async(_worker_encode, (texts,))))
            if not pending:
                if error is not None:
                    raise error
                return
            meta, res = pending.popleft()
            flat, lens = res.get()
            yield meta, np.split(flat, np.cumsum(lens)[:-1]) if len(lens) else []

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._pool = None
