"""Step-N checkpoint directories that count only once complete.

A checkpoint is written under a temporary name, gets its COMPLETE marker, and is then renamed
to ``step-00000N``: a kill at any moment leaves either the previous checkpoints untouched or a
``.tmp-*`` directory that nothing reads. Keep-last-K counts complete checkpoints only.

Every file is fsynced before the marker is written and the directory renamed, so a power loss
cannot leave a "complete" checkpoint of empty files. Loading refuses rather than restarts: only
a file that cannot be read (corruption) makes it fall back to an older checkpoint; a checkpoint
that reads but does not fit this run (another config, other shapes) stops the run with exit 2.
"""
from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError, first_line, plural
from .distributed import all_gather, any_rank, barrier, every_rank, from_rank0, rank, world_size
from .fsio import atomic_write, fsync_tree, recover_dir, replace_dir

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read back (truncated, overwritten, missing)."""


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.root.is_dir():
            return []
        if rank() == 0:  # a kill between replace_dir's two renames left the old copy aside
            for d in self.root.glob(".old-step-*"):
                recover_dir(d.with_name(d.name[len(".old-"):]))
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
            # what a killed save left: never read, and the run's lock says no save is running
            for left in self.root.glob(".tmp-step-*"):
                shutil.rmtree(left)
            tmp.mkdir()
        barrier()
        failure = None
        try:
            write(tmp)
        except OSError as e:  # disk full, quota, a dead mount: the partial copy must not stay
            failure = e
        if any_rank(failure is not None):
            barrier()
            self._failed(step, tmp, failure)
        barrier()
        if rank() == 0:
            try:
                fsync_tree(tmp)  # the bytes are on disk before anything says they are complete
                atomic_write(tmp / MARKER, json.dumps({"step": step, "time": time.time(),
                                                       **(meta or {})}))
            except OSError as e:
                self._failed(step, tmp, e)
            # re-saving a step: the old copy goes only once the new one is in
            replace_dir(tmp, final)
            self._prune()
        barrier()
        return final

    def _failed(self, step: int, tmp: Path, failure: OSError | None) -> None:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        why = ("the disk is full" if failure is not None and failure.errno == errno.ENOSPC
               else first_line(failure) if failure is not None else "it failed on another rank")
        raise UserError(f"checkpoint: writing step {step} to {self.root} failed ({why}); the "
                        "partial copy was removed and the older checkpoints are untouched: "
                        "free space (or fix the path) and resume with --resume")

    def _prune(self) -> None:
        done = self.complete()
        for d in done[max(self.keep_last, 1):]:
            shutil.rmtree(d, ignore_errors=True)

    def refuse_changes(self, check: Callable[[dict], list[str]]) -> None:
        """Before any data is read: refuse a resume whose config differs from the newest
        complete checkpoint's (``check`` as for :meth:`load_latest`)."""
        for d in map(Path, from_rank0([str(d) for d in self.complete()])):
            try:
                meta = json.loads((d / MARKER).read_text())
            except (OSError, ValueError):
                continue  # load_latest reports it
            _refuse_changes(d, meta, check)
            return

    def load_latest(self, load: Callable[[Path, int], object], *, world: int,
                    check: Callable[[dict], list[str]] | None = None,
                    other_world: Callable[[Path, int], None] | None = None):
        """Load the newest complete checkpoint that every rank loads; (path, result), or None
        when there is no complete checkpoint at all.

        ``load(dir, saved_world)`` gets the number of processes that wrote ``dir``.
        ``check(marker)`` returns why this run may not continue that checkpoint (a config
        changed), one reason a line: those refuse before any file is read. Only a
        :class:`CorruptCheckpoint` moves on to the previous checkpoint (``load`` reads every
        file before it changes anything, so nothing is half restored); any other failure, or
        none loading, is a :class:`UserError` listing each checkpoint's reason; a
        :class:`UserError` that ``load`` raises itself goes on as it is (it names its own fix).

        All ranks walk rank 0's list together and move on together, so they never resume from
        different steps. A checkpoint written by another number of processes goes to
        ``other_world(dir, saved_world)`` first, which raises a :class:`UserError` where this
        run cannot continue it; without one it is refused.
        """
        found = [Path(d) for d in from_rank0([str(d) for d in self.complete()])]
        reasons: list[str] = []
        for d in found:
            try:
                meta = json.loads((d / MARKER).read_text())
            except (OSError, ValueError) as e:
                reasons.append(f"{d / MARKER}: unreadable ({first_line(e)})")
                continue
            saved = meta.get("world_size", world)
            if saved != world:
                if other_world is None:
                    raise UserError(f"--resume: {d} was written by "
                                    f"{plural(saved, 'process', 'processes')} and this run has "
                                    f"{world}; resume with "
                                    f"{plural(saved, 'process', 'processes')}, or start a new "
                                    "run.output_dir")
                other_world(d, saved)
            _refuse_changes(d, meta, check)
            corrupt = misfit = ""
            refusal = None
            try:
                result = load(d, saved)
            except CorruptCheckpoint as e:
                corrupt = f"{d.name}/{e}"
            except UserError as e:  # the load's own one line, naming its fix
                refusal, misfit = e, first_line(e)
            except Exception as e:  # read fine but does not fit: an older one will not either
                misfit = f"{d.name}: {_misfit(e)}"
            if any_rank(bool(misfit)):
                if refusal is not None:
                    raise refusal
                raise UserError(
                    f"--resume: {d} does not fit this run; nothing was changed on disk: start "
                    "a new run.output_dir, or repeat the settings it was written with",
                    [misfit or "it failed to load on another rank"])
            if every_rank(not corrupt):
                return d, result
            reasons.append(corrupt or f"{d.name}: failed to load on another rank")
            log.warning("checkpoint %s failed to load (%s); trying the previous one", d,
                        reasons[-1])
        if reasons:
            raise UserError(f"--resume: no checkpoint in {self.root} loads; nothing was changed "
                            "on disk: restore the files named below, or start a new "
                            "run.output_dir (or --overwrite)", reasons)
        return None


def _misfit(e: Exception) -> str:
    """torch's state-dict errors put the key and the shapes on the line after the first."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1][:240]}"
    return f"{type(e).__name__}: {first_line(e)}"


def _refuse_changes(d: Path, meta: dict, check) -> None:
    changed = check(meta) if check else []
    if changed:
        raise UserError(
            f"--resume: this run's config differs from the one {d.name} was written with; "
            "repeat the original settings (only train.max_steps, logging, eval and checkpoint "
            "cadence may change on a resume) or start a new run.output_dir", changed)


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path, map_location="cpu"):
    """``torch.load``, with any failure to read the file as :class:`CorruptCheckpoint`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, garbage, missing: all the same to a resume
        raise CorruptCheckpoint(f"{Path(path).name}: {_unreadable(e)}") from e


def load_torch_agreed(path: Path, map_location="cpu"):
    """:func:`load_torch` on every rank, a file one rank cannot read being a
    :class:`CorruptCheckpoint` on all of them: what follows (a sharded engine's load) is a
    collective, which a rank that stopped alone would leave the others waiting in."""
    obj, problem = None, None
    try:
        obj = load_torch(path, map_location)
    except CorruptCheckpoint as e:
        problem = str(e)
    agree_readable(problem)
    return obj


def agree_readable(problem: str | None) -> None:
    """Raise :class:`CorruptCheckpoint` on every rank when any rank found a file it cannot
    read (``problem``: "file: why", None when it found none)."""
    found = list(dict.fromkeys(p for p in all_gather(problem) if p))  # a shared file: once
    if found:
        more = f" (and {plural(len(found) - 1, 'more file')})" if len(found) > 1 else ""
        raise CorruptCheckpoint(found[0] + more)


def verify_archives(ckpt_dir: Path, files: list[Path]) -> None:
    """Check that every ``torch.save`` archive among ``files`` reads back whole, before an
    engine applies any of them; each rank checks its share (file i on rank i mod world) and
    all agree, so a damaged file is a :class:`CorruptCheckpoint` on every rank.

    A torch.save file is a zip archive with a CRC-32 per member: a truncated file has lost the
    zip directory at its end and a changed byte fails its member's CRC, both found without
    unpickling anything (``torch.load`` itself reads a changed tensor without a word)."""
    problem = None
    for f in files[rank()::world_size()]:
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
            why = None if bad is None else f"cannot be read (member {bad} fails its CRC-32)"
        except Exception as e:  # missing, truncated, not a zip: all unreadable
            why = _unreadable(e)
        if why:
            problem = f"{Path(f).relative_to(ckpt_dir)}: {why}"
            break
    agree_readable(problem)


def _unreadable(e: BaseException) -> str:
    return f"cannot be read ({type(e).__name__}: {first_line(e, 120)})"
