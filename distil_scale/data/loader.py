"""The loader that hands out a stream's batches, prepared ahead in one background thread (whose
state the trainer can read).

The streams themselves (text or prepared shards) are in :mod:`distil_scale.data.stream`.
"""
from __future__ import annotations

import collections
import threading
import time

import torch

from ..errors import UserError


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
