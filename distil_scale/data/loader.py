"""The pretraining stream: source -> tokenize -> pack -> shuffle buffer -> micro-batches, with a
state_dict that resumes it exactly.

datasets' own state_dict covers the source position only; the packing remainder and the
shuffle buffer live here and are saved here, which is why this is written by hand. Batches
are prepared in a background thread rather than DataLoader worker processes: each worker
would hold its own state that the trainer cannot see, and tokenizing a 16x128 batch costs
about 1 ms against a ~1 s distillation step.
"""
from __future__ import annotations

import copy
import logging
import queue
import random
import threading
import time

import torch

from ..cli import UserError
from .packing import Packer
from .sources import is_heldout, iter_texts, open_from_config

log = logging.getLogger(__name__)


class StreamError(RuntimeError):
    """The source kept failing after its retries; the run stops with a resumable checkpoint."""


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


class PretrainStream:
    def __init__(self, data_cfg, tokenizer, micro_batch: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, open_fn=open_from_config):
        self.cfg = data_cfg
        self.tok = tokenizer
        self.micro_batch = micro_batch
        self.ds = open_fn(data_cfg, seed=seed, rank=rank, world=world)
        self._fresh_ds_state = copy.deepcopy(self.ds.state_dict())
        self._ds_state = copy.deepcopy(self._fresh_ds_state)
        self.packer = Packer(data_cfg.max_seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
        self.buffer: list[list[int]] = []
        self.rng = random.Random(seed * 7919 + rank)
        self.epoch = 0
        self.sequences_out = 0
        self._rows = None
        self._epoch_docs = 0

    # -- source with retries ------------------------------------------------------------------
    def _next_text(self) -> str:
        """The next training document (held-out and blank ones skipped), across epochs."""
        retries = 0
        while True:
            if self._rows is None:
                self.ds.set_epoch(self.epoch)
                self.ds.load_state_dict(copy.deepcopy(self._ds_state))
                self._rows = iter_texts(self.ds, self.cfg)
            try:
                text = next(self._rows)
            except StopIteration:
                if self._epoch_docs == 0:
                    raise UserError(
                        f"data.source: no training text in '{self.cfg.source}' (empty corpus, "
                        "only empty lines, or every document held out by "
                        "data.heldout_fraction); give it real text") from None
                self.epoch += 1
                self._epoch_docs = 0
                self._ds_state = copy.deepcopy(self._fresh_ds_state)
                self._rows = None
                continue
            except (OSError, ConnectionError, TimeoutError) as e:
                retries += 1
                if retries > self.cfg.max_retries:
                    raise StreamError(f"data source failed {retries} times in a row: {e}") from e
                wait = min(2.0 ** retries * 0.5, 30.0)
                log.warning("data source raised %s; retry %d/%d in %.1fs", type(e).__name__,
                            retries, self.cfg.max_retries, wait)
                time.sleep(wait)
                self._rows = None  # reopen from the last good position
                continue
            self._ds_state = copy.deepcopy(self.ds.state_dict())
            if not text.strip() or is_heldout(text, self.cfg.heldout_fraction):
                continue
            self._epoch_docs += 1
            return text

    def _next_sequence(self) -> list[int]:
        while True:
            if len(self.buffer) >= self.cfg.shuffle_buffer:
                i = self.rng.randrange(len(self.buffer))
                self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
                return self.buffer.pop()
            ids = _tokenize(self.tok, self._next_text())
            self.buffer.extend(self.packer.add(ids))

    def next_batch(self) -> torch.Tensor:
        seqs = [self._next_sequence() for _ in range(self.micro_batch)]
        self.sequences_out += len(seqs)
        return torch.tensor(seqs, dtype=torch.long)

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ds": copy.deepcopy(self._ds_state), "packer": self.packer.state_dict(),
                "buffer": [list(s) for s in self.buffer], "rng": self.rng.getstate(),
                "epoch": self.epoch, "sequences_out": self.sequences_out,
                "epoch_docs": self._epoch_docs}

    def load_state_dict(self, sd: dict) -> None:
        self._ds_state = copy.deepcopy(sd["ds"])
        self.packer.load_state_dict(sd["packer"])
        self.buffer = [list(s) for s in sd["buffer"]]
        self.rng.setstate(_as_tuple(sd["rng"]))
        self.epoch = sd["epoch"]
        self.sequences_out = sd["sequences_out"]
        self._epoch_docs = sd["epoch_docs"]
        self._rows = None


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class BatchLoader:
    """Prefetches ``prefetch`` batches in a thread; state_dict is that of the last batch handed
    out, so prefetched-but-unused batches are produced again after a resume."""

    def __init__(self, stream: PretrainStream, prefetch: int = 2):
        self.stream = stream
        self.prefetch = prefetch
        self._state = stream.state_dict()
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _worker(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.stream.next_batch()
                item = (batch, self.stream.state_dict())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, raised there
            self._q.put(e)

    def __next__(self) -> torch.Tensor:
        if self.prefetch <= 0:
            batch = self.stream.next_batch()
            self._state = self.stream.state_dict()
            return batch
        if self._thread is None:
            self._q = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._worker, daemon=True)
            self._thread.start()
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def snapshot(self) -> dict:
        """The current state without a copy: each batch brings a fresh state dict, so a
        reference taken now stays valid (cheap enough to take every step)."""
        return self._state

    def load_state_dict(self, sd: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("load_state_dict before the first batch")
        self.stream.load_state_dict(sd)
        self._state = copy.deepcopy(sd)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def build_eval_set(data_cfg, tokenizer, n: int, *, seed: int = 0,
                   open_fn=open_from_config) -> torch.Tensor:
    """The first ``n`` packed sequences of held-out documents (the same on every rank)."""
    packer = Packer(data_cfg.max_seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
    seqs: list[list[int]] = []
    for text in iter_texts(open_fn(data_cfg, seed=seed), data_cfg):
        if text.strip() and is_heldout(text, data_cfg.heldout_fraction):
            seqs.extend(packer.add(_tokenize(tokenizer, text)))
            if len(seqs) >= n:
                break
    if not seqs:
        raise UserError(f"data.heldout_fraction: no held-out sequence of {data_cfg.max_seq_len} "
                        f"tokens in '{data_cfg.source}'; raise data.heldout_fraction or give "
                        "more text")
    return torch.tensor(seqs[:n], dtype=torch.long)


def scan_token_counts(data_cfg, tokenizer, n_docs: int, *, seed: int = 0,
                      open_fn=open_from_config) -> torch.Tensor:
    """Token frequencies over the first ``n_docs`` training documents."""
    counts = torch.zeros(len(tokenizer), dtype=torch.long)
    seen = 0
    for text in iter_texts(open_fn(data_cfg, seed=seed), data_cfg):
        if not text.strip() or is_heldout(text, data_cfg.heldout_fraction):
            continue
        ids = torch.tensor(_tokenize(tokenizer, text), dtype=torch.long)
        counts += torch.bincount(ids, minlength=len(counts))[:len(counts)]
        seen += 1
        if seen >= n_docs:
            break
    return counts
