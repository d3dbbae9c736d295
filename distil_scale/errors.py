"""User errors: one line on stderr naming the field and the fix, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable

from .config import ConfigError


class UserError(ConfigError):
    """Bad input that is not a config key (a path, a file's content, a model): same contract."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one line: its message's first line, or its type where it has none."""
    return str(e).splitlines()[0][:limit] if str(e) else type(e).__name__


def main_guard(fn: Callable[[], int | None]) -> Callable[[], None]:
    """Run a launcher's main: user errors -> 'error: ...' and exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            rc = fn()
        except ConfigError as e:
            print(f"error: {first_line(e, 10**6)}", file=sys.stderr, flush=True)
            sys.exit(2)
        sys.exit(rc or 0)

    return wrapper
