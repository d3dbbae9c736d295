"""Everything resumable besides the engine, in one dict: saved and loaded by the same code."""
from __future__ import annotations

import random

import numpy as np
import torch

from .step import nonfinite_run


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class TrainState:
    """Step, counters, the data position, the masker's seed (a mask is a pure function of
    (seed, step, tokens): nothing else of it to carry) and the global generators.

    The loader is attached once built (its transform reads ``first_step``, so the state exists
    first). ``first_step`` is the step of the loader's first batch: 0, or where a resume starts,
    so that batch k of the loader is masked as step first_step + k // accumulation.
    """

    def __init__(self, masker):
        self.masker = masker
        self.loader = None
        self.step = 0
        self.first_step = 0
        self.counters = {"skipped_total": 0, "nonfinite_run": 0, "sequences": 0,
                         "acc_start": None}
        self._rng_at_start: dict | None = None
        self._rng_at_step: dict | None = None

    def mark_step_start(self) -> None:
        """Keep the generators' state at the start of a step (a few KB, host only): a step
        abandoned half-way is checkpointed as not begun, dropout draws included."""
        self._rng_at_step = rng_state()

    def state_dict(self, data_at: int | None = None) -> dict:
        """``data_at``: a loader mark, to save the position of the start of an unfinished
        step (its micro-batches, and their dropout draws, are repeated on resume)."""
        rng = self._rng_at_step if data_at is not None and self._rng_at_step else rng_state()
        return {"step": self.step, "data": self.loader.state_dict(at=data_at),
                "masker": self.masker.state_dict(), "rng": rng,
                "counters": dict(self.counters)}

    def load_state_dict(self, st: dict, data: str = "exact") -> int | None:
        """``data``: "exact" (this rank's own state), "redeal" (rank 0's state of another
        world size: prepared shards are dealt onto this one; returns the global micro-batch it
        starts from) or "restart" (the data starts again from its beginning). Off "exact" the
        global generators are seeded afresh per rank (the old ranks' dropout draws cannot be
        dealt), so dropout then differs from an uninterrupted run."""
        self.step = self.first_step = st["step"]
        start = None
        if data == "redeal":
            start = self.loader.load_state_dict(st["data"], redeal=True)
        elif data == "exact":
            self.loader.load_state_dict(st["data"])
        self.masker.load_state_dict(st["masker"])
        # restored by start_generators, just before step one
        self._rng_at_start = st["rng"] if data == "exact" else None
        self.counters.update(st["counters"])
        return start

    def start_generators(self, seed: int, rank: int) -> None:
        """Nothing may draw from the global generators between this call and the first step: a
        resumed run must see the dropout masks the uninterrupted run saw."""
        if self._rng_at_start is not None:
            set_rng_state(self._rng_at_start)
        else:
            # dropout differs per rank, as in data parallelism; a resume onto another world
            # (no saved state for these ranks) does not replay step 0's draws
            seed_all(seed + 1000 * rank + 1_000_003 * self.step)

    def count_step(self, outcome, global_batch: int) -> int:
        """Book one optimizer step; returns how many non-finite steps have come in a row."""
        self.step += 1
        c = self.counters
        c["sequences"] += global_batch
        c["skipped_total"] += outcome.result.skipped
        c["nonfinite_run"] = nonfinite_run(outcome, c["nonfinite_run"])
        return c["nonfinite_run"]
