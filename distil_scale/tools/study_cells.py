"""A study cell (one teacher preparation, one pretraining run, one evaluation of one model) is
reused only when it is the same experiment.

Each finished cell leaves ``cell.json`` holding a key: the hash of its spec (the resolved
config without output paths, the budget it ran under, the data's fingerprint), the keys of the
cells it read from (a retrained student changes every cell downstream of it) and the code
version (a hash of the package's source files and configs). A cell whose key differs is
deleted and run again, with one line saying what changed. A cell interrupted before it
finished keeps its directory only when its started key matches, so a pretraining run resumes
from its checkpoints; anything else starts clean.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..config import flat_keys
from ..fsio import atomic_write

PACKAGE = Path(__file__).resolve().parents[1]
DONE, STARTED = "cell.json", "cell.started"


def code_version(roots: tuple = (), exclude: tuple = ()) -> str:
    """A hash of every .py and .yaml file under the package (and ``roots``) but ``exclude``
    (paths relative to a root; one ending in "/" is a folder): any change to the code a cell
    ran reruns it."""
    h = hashlib.sha1()
    for root in (PACKAGE, *roots):
        root = Path(root)
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml")
                        and p.is_file() and "__pycache__" not in p.parts
                        and not _excluded(p.relative_to(root).as_posix(), exclude)):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _excluded(rel: str, exclude: tuple) -> bool:
    return any(rel == e or (e.endswith("/") and rel.startswith(e)) for e in exclude)


def files_fingerprint(paths) -> list:
    """Name, size and modification time of each file: cheap, and changes when a file does."""
    out = []
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def cell_key(spec: dict, upstream: list, code: str) -> str:
    blob = json.dumps({"spec": spec, "upstream": list(upstream), "code": code},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _changed(old: dict, spec: dict, upstream: list, code: str) -> str:
    """What differs from the stored cell, in words (for the rerun line)."""
    why = []
    if old.get("code") != code:
        why.append("code")
    if old.get("upstream") != list(upstream):
        why.append("an upstream cell")
    before = old.get("spec") or {}
    keys = sorted(k for k in set(before) | set(spec)
                  if json.dumps(before.get(k), sort_keys=True, default=str)
                  != json.dumps(spec.get(k), sort_keys=True, default=str))
    if keys:
        why.append("settings " + ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else ""))
    return "; ".join(why) or "an unreadable record"


class Cells:
    """Runs or reuses cells under ``root``; ``ran`` and ``reused`` name them in order."""

    def __init__(self, root: Path, code: str, say=print):
        self.root, self.code, self.say = Path(root), code, say
        self.ran: list[str] = []
        self.reused: list[str] = []

    def dir(self, name: str) -> Path:
        return self.root / name

    def run(self, name: str, spec: dict, fn, upstream: tuple = ()) -> dict:
        """``fn(cell_dir) -> dict`` unless ``name`` finished with the same key; the result
        comes back with its ``key`` (what a downstream cell lists as upstream)."""
        d = self.dir(name)
        spec = flat_keys(json.loads(json.dumps(spec, default=str)))
        ups = [u["key"] if isinstance(u, dict) else u for u in upstream]
        key = cell_key(spec, ups, self.code)
        done = d / DONE
        if done.is_file():
            try:
                old = json.loads(done.read_text())
            except ValueError:
                old = {}
            if old.get("key") == key and "result" in old:
                self.reused.append(name)
                return {**old["result"], "key": key}
            self.say(f"{name}: changed ({_changed(old, spec, ups, self.code)}); running it "
                     "again")
        started = d / STARTED
        if d.exists() and not (started.is_file() and started.read_text().strip() == key
                               and not done.is_file()):
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        started.write_text(key + "\n")
        result = fn(d)
        atomic_write(done, json.dumps({"key": key, "spec": spec, "upstream": ups,
                                       "code": self.code, "result": result},
                                      indent=1, default=str) + "\n")
        self.ran.append(name)
        return {**result, "key": key}
