"""Durable, atomic writes and the one-run-per-directory lock: the one place for both.

A file or directory becomes visible under its final name only once its bytes are on disk
(fsync, then rename, then fsync of the parent so the rename itself survives a power loss).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

from .distributed import from_rank0, rank
from .errors import UserError, first_line

LOCK = ".lock"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under ``root``, then every directory, bottom up (a file's directory entry is
    only durable once its directory is synced)."""
    for d, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(d))


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """``path`` holds either its old content or all of ``data``, never a part of it.

    ``data``: the bytes, a str (UTF-8), or a function that writes into the open file (numpy's
    savers). The temporary name is unique per process and thread: several ranks (or loader
    threads) may write the same path at once, and the last rename wins whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _aside(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


def recover_dir(final: Path) -> None:
    """A kill between :func:`replace_dir`'s two renames leaves only the old copy, aside: it is
    put back, so a complete directory is never lost."""
    old = _aside(final)
    if old.is_dir() and not final.exists():
        old.rename(final)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Make the fully written directory ``tmp`` appear as ``final`` (replacing an older one):
    a reader sees the old directory or the new one, never a mixture."""
    fsync_tree(tmp)
    recover_dir(final)
    old = _aside(final)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class RunLock:
    """``<dir>/.lock`` holding the owner's pid and host, created exclusively. A lock whose pid is
    gone on this host is stale (a crashed or killed run) and is taken over; a lock from another
    host cannot be checked and is refused with the way to clear it."""

    def __init__(self, directory: Path, flag: str):
        self.path = Path(directory) / LOCK
        self.flag = flag  # what the user typed that named the directory
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._refusal() from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise self._refusal()

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self) -> bool:
        owner = self._owner()
        if not owner:
            # being written this instant, or left empty by a crash: a file older than a few
            # seconds with nothing in it belongs to nobody
            try:
                return time.time() - self.path.stat().st_mtime > 5
            except FileNotFoundError:
                return True
        if owner.get("host") != socket.gethostname():
            return False
        pid = int(owner.get("pid", -1))
        return pid == os.getpid() or not _alive(pid)

    def _refusal(self) -> UserError:
        o = self._owner()
        who = f"pid {o.get('pid')} on {o.get('host')}" if o else "another process"
        return UserError(f"{self.flag}: '{self.path.parent}' is in use by a running job ({who}); "
                         f"wait for it to finish or choose another {self.flag} (if that job is "
                         f"dead on another machine, delete {self.path})")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def claim_output_dir(out: Path, flag: str) -> RunLock | None:
    """Create ``out`` and take its lock on rank 0, before any data is read: a path that cannot
    be written, or a directory another job is using, is one line on every rank at once."""
    out, err, lock = Path(out), "", None
    if rank() == 0:
        try:
            if out.exists() and not out.is_dir():
                raise UserError(f"{flag}: '{out}' is a file, not a directory; choose another "
                                f"{flag}")
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(out, flag)
            lock.acquire()
        except UserError as e:
            err = str(e)
        except OSError as e:
            err = (f"{flag}: cannot write to '{out}' ({e.strerror or first_line(e)}); choose a "
                   f"writable {flag}")
    err = from_rank0(err)
    if err:
        raise UserError(err)
    return lock
