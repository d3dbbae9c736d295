"""User errors: one line on stderr naming the field and the fix, exit code 2, no traceback."""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Callable


class UserError(ValueError):
    """Bad input (a path, a file's content, a model, a config key): one line on stderr naming
    what to change, exit code 2. :class:`~distil_scale.config.ConfigError` is the config-key kind.

    ``details``: further lines, one per reason, when one line cannot hold them (every
    checkpoint of a run refusing to load, each for its own reason)."""

    def __init__(self, msg: str, details: list[str] | tuple[str, ...] = ()):
        super().__init__(msg)
        self.details = list(details)


def first_line(e: BaseException, limit: int = 200, *, typed: bool = False) -> str:
    """An exception as one line: its message's first line (after its type's name when
    ``typed``), or its type when it has none."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    first = text.splitlines()[0][:limit]
    return f"{type(e).__name__}: {first}" if typed else first


def plural(n: int, word: str, many: str = "") -> str:
    """'1 process', '2 processes'."""
    return f"{n} {word if n == 1 else many or word + 's'}"


ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # set by torchrun for each worker


def main_guard(fn: Callable[[], int | None]) -> Callable[[], None]:
    """Run a launcher's main: user errors -> 'error: ...' and exit 2, no traceback.

    Under torchrun the error also goes to the file torchrun reads back, so its failure summary
    names it as the root cause (without it, only "exitcode: 2" and a link); any other
    exception is recorded there with its traceback by torch's own ``record``."""

    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            rc = _recorded(fn)()
        except UserError as e:
            lines = [f"error: {first_line(e, 10**6)}",
                     *(f"error:   {line}" for line in getattr(e, "details", ()))]
            for line in lines:
                print(line, file=sys.stderr, flush=True)
            _tell_torchrun(e, lines)
            sys.exit(2)
        sys.exit(rc or 0)

    return wrapper


def _recorded(fn):
    if not os.environ.get(ERROR_FILE_ENV):
        return fn
    # only under torchrun: it imports torch, which the console scripts' --help does not load
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


def _tell_torchrun(e: UserError, lines: list[str]) -> None:
    """Write torchrun's error-file format (torch's ErrorHandler.record_exception): the
    summary prints "py_callstack" as the traceback, here the error's lines instead."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    data = {"message": {"message": f"{type(e).__name__}: {first_line(e)}",
                        "extraInfo": {"py_callstack": "\n".join(lines),
                                      "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the summary then says less; the error itself is on stderr already
