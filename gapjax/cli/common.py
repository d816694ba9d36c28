"""What the command lines share: one-line errors and progress on stderr."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from gapjax.train.checkpoint import CheckpointError

#: Exceptions that are the user's to fix (a file, a name, a value): one line, no traceback.
USER_ERRORS = (OSError, ValueError, KeyError, ImportError, CheckpointError)


def one_line(error: BaseException) -> str:
    """The first line of ``error``'s message (an OSError's reason and file name)."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class Parser(argparse.ArgumentParser):
    """``argparse`` with ``--traceback`` and usage errors in one line (exit status 2)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_argument("--traceback", action="store_true",
                          help="on an error, show the traceback instead of one line")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def fail(self, message: str) -> None:
        """Names one problem on stderr (the command goes on; it exits 1 at the end)."""
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def user_errors(self, traceback: bool = False) -> Iterator[None]:
        """Turns a user error raised inside into one line and exit status 1."""
        try:
            yield
        except USER_ERRORS as error:
            if traceback:
                raise
            self.exit(1, f"{self.prog}: error: {one_line(error)}\n")


def progress(message: str) -> None:
    """One progress line on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


__all__ = ["USER_ERRORS", "Parser", "one_line", "progress"]
