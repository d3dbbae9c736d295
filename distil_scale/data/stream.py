"""The pretraining stream: source -> tokenize -> pack -> shuffle buffer -> micro-batches, with a
state_dict that resumes it exactly; and the choice between it and prepared shards.

datasets' own state_dict covers the source position only; the packing remainder and the
shuffle buffer live here and are saved here, which is why this is written by hand. Only
tokenization, the expensive part, may go out to worker processes, and it comes back in document
order. The batches are handed out by :class:`distil_scale.data.loader.BatchLoader`.

Pre-tokenized shards (launch/prepare_data.py, shards.py) skip all of this:
``open_pretrain_stream`` picks them when ``data.source`` is a prepared directory.
"""
from __future__ import annotations

import copy
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .packing import Encoder, Packer
from .shards import HELDOUT, MANIFEST, PROGRESS, ShardStream
from .sources import is_heldout, iter_texts, open_from_config

log = logging.getLogger(__name__)


class StreamError(RuntimeError):
    """The source kept failing after its retries; the run stops with a resumable checkpoint."""


class _Reader:
    """Training documents of the source in order from a position, across epochs, retrying a
    failing source from its last good row.

    A position is ``(ds_state, skip, epoch, epoch_docs)``: datasets' state at the start of a
    chunk plus the rows read since, so that nested dict is copied once per chunk of documents
    rather than once per document."""

    def __init__(self, ds, cfg, fresh_state, pos):
        self.ds, self.cfg, self.fresh = ds, cfg, fresh_state
        self.anchor, self.skip, self.epoch, self.epoch_docs = pos
        self._rows = None

    def _open(self) -> None:
        self.ds.set_epoch(self.epoch)
        self.ds.load_state_dict(copy.deepcopy(self.anchor))
        rows = iter_texts(self.ds, self.cfg)
        for _ in range(self.skip):
            next(rows)
        self._rows = rows

    def chunk(self, max_docs: int, max_chars: int) -> tuple[list, list[str]]:
        """Up to ``max_docs`` documents or ``max_chars`` characters: (positions after each
        document, texts)."""
        if self._rows is not None and self.skip:
            self.anchor, self.skip = copy.deepcopy(self.ds.state_dict()), 0
        poss, texts, chars, retries = [], [], 0, 0
        while len(texts) < max_docs and chars < max_chars:
            try:
                if self._rows is None:
                    self._open()
                text = next(self._rows)
            except StopIteration:
                if self.epoch_docs == 0:
                    raise UserError(
                        f"data.source: no training text in '{self.cfg.source}' (empty corpus, "
                        "only empty lines, or every document held out by "
                        "data.heldout_fraction); give it real text") from None
                self.epoch, self.epoch_docs = self.epoch + 1, 0
                self.anchor, self.skip, self._rows = self.fresh, 0, None
                continue
            except (OSError, ConnectionError, TimeoutError) as e:
                retries += 1
                if retries > self.cfg.max_retries:
                    raise StreamError(f"data source failed {retries} times in a row: {e}") from e
                wait = min(2.0 ** retries * 0.5, 30.0)
                log.warning("data source raised %s; retry %d/%d in %.1fs", type(e).__name__,
                            retries, self.cfg.max_retries, wait)
                time.sleep(wait)
                self._rows = None  # reopen at the last good row
                continue
            retries = 0
            self.skip += 1
            if not text.strip() or is_heldout(text, self.cfg.heldout_fraction):
                continue
            self.epoch_docs += 1
            poss.append((self.anchor, self.skip, self.epoch, self.epoch_docs))
            texts.append(text)
            chars += len(text)
        return poss, texts


class PretrainStream:
    """Packed sequences of the training documents, shuffled through a buffer of
    ``data.shuffle_buffer`` sequences (1 or less: in order), endlessly (epochs).

    Each sequence is drawn from a buffer holding at least ``shuffle_buffer`` sequences, reading
    documents only when it holds fewer: the order of draws is the same whatever the micro-batch
    size, so accumulation reproduces one big batch. The buffer is a numpy array, so a
    checkpoint copies one block of memory. A source that fails in the middle of a batch leaves
    the rows already drawn in the state, and the next call completes that batch.
    ``workers`` > 0 tokenizes in that many processes (same batches, in the same order)."""

    def __init__(self, data_cfg, tokenizer, micro_batch: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, open_fn=open_from_config, workers: int = 0):
        self.cfg = data_cfg
        self.tok = tokenizer
        self.micro_batch = micro_batch
        self.seq_len = data_cfg.max_seq_len
        self.workers = workers
        self.ds = open_fn(data_cfg, seed=seed, rank=rank, world=world)
        self._fresh_ds_state = copy.deepcopy(self.ds.state_dict())
        self._pos = (self._fresh_ds_state, 0, 0, 0)
        self.packer = Packer(data_cfg.max_seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
        self.rng = random.Random(seed * 7919 + rank)
        self.sequences_out = 0
        self._buf = np.empty((0, self.seq_len), dtype=np.int32)
        self._head = 0  # in order (shuffle_buffer <= 1): rows _head.._n are waiting
        self._n = 0
        self._partial: list[np.ndarray] = []  # rows of a batch whose source failed
        self._docs = None
        self._encoder: Encoder | None = None

    @property
    def epoch(self) -> int:
        """The epoch of the last document read."""
        return self._pos[2]

    def _capacity(self) -> int:
        return max(self.cfg.shuffle_buffer, 1) + 64

    def _documents(self):
        if self._encoder is None or self._encoder.workers != self.workers:
            if self._encoder is not None:
                self._encoder.close()
            self._encoder = Encoder(self.tok, self.workers)
        reader = _Reader(self.ds, self.cfg, self._fresh_ds_state, self._pos)
        # in flight: enough text per chunk to pay for the round trip to a worker
        max_docs, max_chars = (256, 1 << 18) if self.workers > 0 else (32, 1 << 16)
        chunks = iter(lambda: reader.chunk(max_docs, max_chars), None)
        for poss, ids in self._encoder.map(chunks):
            yield from zip(ids, poss)

    def _push(self, seqs: np.ndarray) -> None:
        k = len(seqs)
        if k == 0:
            return
        if self._n + k > len(self._buf):
            grown = np.empty((max(2 * len(self._buf), self._n + k, self._capacity()),
                              self.seq_len), dtype=np.int32)
            grown[:self._n] = self._buf[:self._n]
            self._buf = grown
        self._buf[self._n:self._n + k] = seqs
        self._n += k

    def _read_document(self) -> None:
        if self._docs is None:
            self._docs = self._documents()
        try:
            ids, pos = next(self._docs)
        except BaseException:
            self._docs = None  # a later call starts again from the last document read
            raise
        self._pos = pos
        self._push(self.packer.add(ids))

    def _draw(self) -> np.ndarray:
        """One sequence (a view: copy it before the buffer changes)."""
        if self.cfg.shuffle_buffer > 1:
            while self._n < self.cfg.shuffle_buffer:
                self._read_document()
            buf = self._buf
            i = self.rng.randrange(self._n)
            row = buf[i].copy()
            self._n -= 1
            buf[i] = buf[self._n]
            return row
        if self._head == self._n:
            self._head = self._n = 0
            while self._n == 0:
                self._read_document()
        self._head += 1
        return self._buf[self._head - 1]

    def next_batch(self) -> torch.Tensor:
        out = np.empty((self.micro_batch, self.seq_len), dtype=np.int32)
        for j, row in enumerate(self._partial):
            out[j] = row
        for j in range(len(self._partial), self.micro_batch):
            try:
                out[j] = self._draw()
            except BaseException:
                self._partial = [r.copy() for r in out[:j]]
                raise
        self._partial = []
        self.sequences_out += self.micro_batch
        return torch.from_numpy(out).long()

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        anchor, skip, epoch, epoch_docs = self._pos
        partial = (np.stack(self._partial) if self._partial
                   else np.empty((0, self.seq_len), dtype=np.int32))
        return {"format": 2, "ds": copy.deepcopy(anchor), "skip": skip, "epoch": epoch,
                "epoch_docs": epoch_docs, "packer": self.packer.state_dict(),
                "buffer": torch.from_numpy(self._buf[self._head:self._n].copy()),
                "partial": torch.from_numpy(partial), "rng": self.rng.getstate(),
                "sequences_out": self.sequences_out}

    def _rows(self, x: torch.Tensor) -> np.ndarray:
        a = x.numpy()
        if len(a) and a.shape[1] != self.seq_len:
            raise UserError(f"data.max_seq_len: the checkpoint's data holds sequences of "
                            f"{a.shape[1]} tokens and this run asks for {self.seq_len}; "
                            f"resume with data.max_seq_len={a.shape[1]}")
        return a.astype(np.int32, copy=False)

    def load_state_dict(self, sd: dict) -> None:
        arr = self._rows(sd["buffer"])
        self._pos = (copy.deepcopy(sd["ds"]), sd["skip"], sd["epoch"], sd["epoch_docs"])
        self.packer.load_state_dict(sd["packer"])
        self._buf = np.empty((max(len(arr), self._capacity()), self.seq_len), dtype=np.int32)
        self._buf[:len(arr)] = arr
        self._head, self._n = 0, len(arr)
        self._partial = list(self._rows(sd["partial"]))
        self.rng.setstate(_as_tuple(sd["rng"]))
        self.sequences_out = sd["sequences_out"]
        self._docs = None

    def close(self) -> None:
        self._docs = None
        if self._encoder is not None:
            self._encoder.close()


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- choosing the stream ----------------------------------------------------------------------
def is_shard_dir(source: str) -> bool:
    """Whether ``source`` is a directory written by launch/prepare_data.py (and finished)."""
    if not source or source.startswith("pypi:"):
        return False
    return (Path(source).expanduser() / MANIFEST).is_file()


def refuse_unfinished(source: str) -> None:
    if not source or source.startswith("pypi:"):
        return
    d = Path(source).expanduser()
    if (d / PROGRESS).is_file():
        raise UserError(f"data.source: '{source}' is an unfinished launch/prepare_data.py "
                        "output; re-run the same prepare_data command to finish it")
    if d.is_dir() and ((d / HELDOUT).is_file() or any(d.glob("train-*.npy"))):
        raise UserError(f"data.source: '{source}' holds shards but no {MANIFEST} (damaged or "
                        "not written by this version); prepare them again with "
                        "launch/prepare_data.py into an empty --out")


def open_pretrain_stream(data_cfg, tokenizer, micro_batch: int, *, seed: int = 0,
                         rank: int = 0, world: int = 1, workers: int = 0,
                         open_fn=open_from_config):
    """A ShardStream when ``data.source`` is a prepared shard directory, else a
    PretrainStream (tokenizing in ``workers`` processes)."""
    if is_shard_dir(data_cfg.source):
        return ShardStream(data_cfg, tokenizer, micro_batch, seed=seed, rank=rank, world=world)
    refuse_unfinished(data_cfg.source)
    return PretrainStream(data_cfg, tokenizer, micro_batch, seed=seed, rank=rank, world=world,
                          open_fn=open_fn, workers=workers)
