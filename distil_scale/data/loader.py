"""The pretraining stream: source -> tokenize -> pack -> shuffle buffer -> micro-batches, with a
state_dict that resumes it exactly; and the loader that prefetches its batches in a thread.

datasets' own state_dict covers the source position only; the packing remainder and the
shuffle buffer live here and are saved here, which is why this is written by hand. Batches are
assembled in one background thread (whose state the trainer can read); only tokenization, the
expensive part, may go out to worker processes, and it comes back in document order.

Pre-tokenized shards (launch/prepare_data.py, shards.py) skip all of this:
``open_pretrain_stream`` picks them when ``data.source`` is a prepared directory.
"""
from __future__ import annotations

import collections
import copy
import hashlib
import json
import logging
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fsio import atomic_write
from .packing import Encoder, Packer, encode, fast_tokenizer, vocab_hash
from .shards import HELDOUT, MANIFEST, PROGRESS, ShardStream, read_heldout, read_token_counts
from .sources import is_heldout, iter_texts, open_from_config, source_fingerprint

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


class BatchLoader:
    """Hands out a stream's batches, prepared ``prefetch`` ahead in a thread.

    ``transform(batch, k)`` (the trainer's masking and pinning; ``k`` counts the batches this
    loader hands out, from 0) runs in that thread too, so the training thread only waits when
    the data really is late. Nothing is copied per batch. ``state_dict()`` (checkpoint time)
    waits for the producer to finish the batch it is making and returns the stream's state plus
    the raw batches made but not yet handed out; a loader loaded from it hands those out first,
    so a resumed run sees exactly the batches the uninterrupted one would. ``mark()`` names the
    position now (the trainer marks each step start) and ``state_dict(at=mark)`` also keeps the
    batches handed out since, so a step that failed half-way is read again in full."""

    def __init__(self, stream, prefetch: int = 2, *, transform=None):
        self.stream = stream
        self.prefetch = prefetch
        self.transform = transform
        # (batch, epoch, transformed or None) or an exception
        self._ready: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stream_lock = threading.Lock()  # held by whoever is inside the stream
        self._made = 0  # batches made or loaded: the next one's k
        self._handed = 0
        self._mark: int | None = None
        self._mark_epoch = 0
        self._since_mark: list = []
        self._epoch = stream.epoch
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def epoch(self) -> int:
        """The stream epoch of the last batch handed out."""
        return self._epoch

    def _make(self):
        batch = self.stream.next_batch()
        k, self._made = self._made, self._made + 1
        out = self.transform(batch, k) if self.transform is not None else None
        return batch, self.stream.epoch, out

    def _produce(self) -> None:
        while True:
            with self._cv:
                while len(self._ready) >= self.prefetch and not self._stop.is_set():
                    self._cv.wait()
            if self._stop.is_set():
                return
            with self._stream_lock:
                try:
                    item = self._make()
                except BaseException as e:  # handed to the consumer, raised there
                    item = e
                with self._cv:
                    self._ready.append(item)
                    self._cv.notify_all()
            if isinstance(item, BaseException):
                return

    def __next__(self):
        if self.prefetch <= 0 and not self._ready:
            with self._stream_lock:
                item = self._make()
        else:
            if self._thread is None and self.prefetch > 0:
                self._thread = threading.Thread(target=self._produce, daemon=True,
                                                name="batch-loader")
                self._thread.start()
            with self._cv:
                while not self._ready:
                    self._cv.wait()
                item = self._ready[0]
                if isinstance(item, BaseException):
                    raise item  # left in place: the stream is dead, every later call says so
                self._ready.popleft()
                self._cv.notify_all()
        batch, self._epoch, out = item
        if self.transform is not None and out is None:  # a batch loaded from a checkpoint
            out = self.transform(batch, self._handed)
        self._handed += 1
        if self._mark is not None:
            self._since_mark.append(item)
        return out if self.transform is not None else batch

    def __iter__(self):
        return self

    def mark(self) -> int:
        """A token for the position now, for ``state_dict(at=token)``; costs nothing. Only
        the latest mark can be asked for (the batches before it are let go)."""
        self._mark, self._mark_epoch, self._since_mark = self._handed, self._epoch, []
        return self._handed

    def state_dict(self, at: int | None = None) -> dict:
        """The state as of the last batch handed out, or as of ``at`` (a ``mark()``)."""
        if at is None:
            replay = []
        elif self._mark is None or not self._mark <= at <= self._handed:
            raise ValueError(f"state_dict(at={at}): only the latest mark ({self._mark}) or a "
                             f"later position up to {self._handed} can be asked for")
        else:
            replay = self._since_mark[at - self._mark:]
        with self._stream_lock:  # the producer is between batches
            stream = self.stream.state_dict()
            with self._cv:
                ready = [it for it in self._ready if not isinstance(it, BaseException)]
        pending = replay + ready
        if at is None or at == self._handed:
            epoch = self._epoch
        elif at == self._mark:
            epoch = self._mark_epoch
        else:
            epoch = self._since_mark[at - self._mark - 1][1]
        return {"format": 2, "stream": stream, "pending": [it[0] for it in pending],
                "pending_epochs": [it[1] for it in pending], "epoch": epoch}

    def load_state_dict(self, sd: dict, redeal: bool = False) -> int | None:
        """``redeal``: ``sd`` is one rank's state of a run on another number of processes (a
        shard stream only); its prefetched batches are dropped, the stream is dealt onto this
        world from the global position every rank had reached, and that position (a global
        micro-batch index) is returned."""
        if self._thread is not None or self._handed:
            raise RuntimeError("load_state_dict before the first batch")
        if sd.get("format") != 2 or "stream" not in sd:
            raise UserError("--resume: the checkpoint is from an older version of "
                            "distil-scale (its data position is of format 1); resume it with "
                            "that version or start a new run.output_dir")
        if redeal:
            start = self.stream.redeal(sd["stream"], unread=len(sd["pending"]))
            self._ready, self._made = collections.deque(), 0
            self._epoch = self.stream.epoch
            return start
        self.stream.load_state_dict(sd["stream"])
        self._ready = collections.deque(
            (b, e, None) for b, e in zip(sd["pending"], sd["pending_epochs"]))
        self._made = len(self._ready)
        self._epoch = sd["epoch"]
        return None

    def close(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if hasattr(self.stream, "close"):
            self.stream.close()


# -- choosing the stream ----------------------------------------------------------------------
def is_shard_dir(source: str) -> bool:
    """Whether ``source`` is a directory written by launch/prepare_data.py (and finished)."""
    if not source or source.startswith("pypi:"):
        return False
    return (Path(source).expanduser() / MANIFEST).is_file()


def _refuse_unfinished(source: str) -> None:
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
    _refuse_unfinished(data_cfg.source)
    return PretrainStream(data_cfg, tokenizer, micro_batch, seed=seed, rank=rank, world=world,
                          open_fn=open_fn, workers=workers)


# -- held-out set and token counts ------------------------------------------------------------
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
    _refuse_unfinished(data_cfg.source)
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
