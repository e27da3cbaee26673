"""The project's one error base, and the one way a command reports it.

A ``HiggsError`` is a problem the user can fix: a config key, a data file, a damaged checkpoint, a folder that
cannot be written, a flag's value. Every command prints it as one line, ``higgs-ddp: error: ...``, and exits 2.
Anything else is a bug and keeps its traceback: no command catches ValueError, OSError or RuntimeError as
such, because torch and the libraries raise those for their own bugs too.

The subclasses keep the builtin base they had (ConfigError is a ValueError, CodecError a RuntimeError, ...),
so code that catches those still does. dual_loss.AlignmentError stays outside: dual_loss.py imports nothing of
this package (the trainer counts it as a user error by name).
"""

from __future__ import annotations

import sys


class HiggsError(Exception):
    """A problem the user can fix; its message is one line (a data error lists its problems below that)."""


class InputError(HiggsError, ValueError):
    """A setting, flag or file given to a command (not through the config) that cannot be used."""


def error_line(e: BaseException) -> str:
    """The first line of an error's message (a multi-line message keeps its details for the log)."""
    return (str(e).splitlines() or [type(e).__name__])[0]


def report(e: BaseException, whole: bool = False) -> int:
    """Print a user error as ``higgs-ddp: error: ...`` on stderr; -> the exit code, 2. ``whole``: the message
    as it is, every line (a data error's list of problems)."""
    print(f"higgs-ddp: error: {e if whole else error_line(e)}", file=sys.stderr, flush=True)
    return 2
