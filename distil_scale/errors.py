"""User errors: one line on stderr naming the field and the fix, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys
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


def main_guard(fn: Callable[[], int | None]) -> Callable[[], None]:
    """Run a launcher's main: user errors -> 'error: ...' and exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            rc = fn()
        except UserError as e:
            print(f"error: {first_line(e, 10**6)}", file=sys.stderr, flush=True)
            for line in getattr(e, "details", ()):
                print(f"error:   {line}", file=sys.stderr, flush=True)
            sys.exit(2)
        sys.exit(rc or 0)

    return wrapper
