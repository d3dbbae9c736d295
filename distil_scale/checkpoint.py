"""Step-N checkpoint directories that count only once complete.

A checkpoint is written under a temporary name, gets its COMPLETE marker, and is then renamed
to ``step-00000N``: a kill at any moment leaves either the previous checkpoints untouched or a
``.tmp-*`` directory that nothing reads. Keep-last-K counts complete checkpoints only.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError
from .distributed import barrier, every_rank, from_rank0, rank

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            m = _STEP_RE.match(d.name)
            if m and d.is_dir():
                if (d / MARKER).is_file():
                    found.append((int(m.group(1)), d))
                else:
                    log.warning("checkpoint %s has no %s marker: ignored", d, MARKER)
        return [d for _, d in sorted(found, reverse=True)]

    def save(self, step: int, write: Callable[[Path], None], meta: dict | None = None) -> Path:
        """``write(tmp_dir)`` runs on every rank (sharded engines write their own pieces)."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        write(tmp)
        barrier()
        if rank() == 0:
            (tmp / MARKER).write_text(json.dumps({"step": step, "time": time.time(),
                                                  **(meta or {})}))
            if final.exists():  # re-saving a step (a resumed run ending where it resumed)
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = self.complete()
        for d in done[max(self.keep_last, 1):]:
            shutil.rmtree(d, ignore_errors=True)

    def load_latest(self, load: Callable[[Path], object], *, world: int):
        """Load the newest complete checkpoint that every rank loads; (path, result) or None.

        All ranks walk rank 0's list together and move on together, so they never resume from
        different steps. A checkpoint written by another number of processes is refused: each
        rank's data position (stream, shuffle buffer) is its own and cannot be re-dealt.
        """
        for d in map(Path, from_rank0([str(d) for d in self.complete()])):
            saved = json.loads((d / MARKER).read_text()).get("world_size", world)
            if saved != world:
                raise UserError(f"--resume: {d} was written by {saved} processes and this run "
                                f"has {world}; resume with {saved} processes (each rank's data "
                                "position is its own), or start a new run.output_dir")
            try:
                result, ok = load(d), True
            except Exception as e:  # a corrupt file shows up as many error types
                result, ok = None, False
                log.warning("checkpoint %s failed to load (%s: %s); trying the previous one",
                            d, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            if every_rank(ok):
                return d, result
            if ok:
                log.warning("checkpoint %s failed to load on another rank; trying the previous "
                            "one", d)
        return None


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)
