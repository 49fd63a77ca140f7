"""Errors a user can cause, and the one place the command line turns any exception into one line.

    Aimv2Error                    exit 1 unless said otherwise
    ├── ConfigError (ValueError)  exit 2: the invocation or the config is wrong (an option, a value,
    │                             settings that do not fit together)
    └── RunError (RuntimeError)   exit 1: the run could not go on (damaged checkpoint, a loss that
        ├── CheckpointError       stays non-finite, ...)
        └── DiskFullError         a write ran out of space (names the path and the bytes it needed)

Code raises these where it knows what went wrong, or plain exceptions of the standard kinds;
`describe(exc)` maps both at the top level: ValueError -> 2 (a value given was invalid), OSError ->
1 with its file name, anything else -> 1 with its type. `aimv2 --debug` or AIMV2_DEBUG=1 prints the
traceback as well.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback

EXIT_RUNTIME, EXIT_CONFIG = 1, 2


class Aimv2Error(Exception):
    """An error with a message meant for the user (one line, naming the file or option)."""
    exit_code = EXIT_RUNTIME


class ConfigError(Aimv2Error, ValueError):
    """A wrong option, config value or combination of them."""
    exit_code = EXIT_CONFIG


class RunError(Aimv2Error, RuntimeError):
    """The run cannot go on."""


class CheckpointError(RunError):
    """A checkpoint is damaged, or none is whole."""


class DiskFullError(RunError):
    """A write ran out of disk space (ENOSPC / EDQUOT)."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def debug_requested(flag: bool = False) -> bool:
    """--debug, or AIMV2_DEBUG set to anything but '' / '0'."""
    return flag or os.environ.get("AIMV2_DEBUG", "") not in ("", "0")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message without the 'error: ' prefix) of an exception."""
    msg = _one_line(str(exc))
    if isinstance(exc, Aimv2Error):
        return exc.exit_code, msg or type(exc).__name__
    if isinstance(exc, OSError):
        if exc.errno in NO_SPACE:
            where = f" writing {exc.filename!r}" if exc.filename else ""
            return EXIT_RUNTIME, f"disk full{where}: {msg}"
        if exc.filename is not None and exc.strerror:             # e.g. [Errno 2] No such file ...: 'x'
            name = f"{exc.filename!r}" + (f" -> {exc.filename2!r}" if exc.filename2 else "")
            return EXIT_RUNTIME, f"{name}: {exc.strerror}"
        return EXIT_RUNTIME, msg or type(exc).__name__
    if isinstance(exc, ValueError):
        return EXIT_CONFIG, msg or type(exc).__name__
    if isinstance(exc, ImportError):
        return EXIT_RUNTIME, msg
    # not foreseen: keep the type (it is what a bug report needs) and point at --debug
    return EXIT_RUNTIME, f"{type(exc).__name__}: {msg} (run with --debug for the traceback)"


def report(exc: BaseException, debug: bool = False) -> int:
    """Print `exc` as one `error: ...` line on stderr (after its traceback when debugging); the exit code."""
    code, msg = describe(exc)
    if debug_requested(debug):
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {msg}", file=sys.stderr)
    return code


def run_command(func, args, debug: bool = False) -> int:
    """`func(args)` as a command: its exit code, or a reported error's; Ctrl-C -> 130."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:                  # the one place errors become exit codes
        return report(e, debug)
