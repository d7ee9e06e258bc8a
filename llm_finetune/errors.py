"""The one exception type that reaches the user as a one-line message and exit code 2, and the
exit codes of the other ways a command ends."""

from __future__ import annotations

import errno
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_BUG = 1  # an unexpected exception: a bug of ours, its traceback in a log file
EXIT_NOT_CONFIRMED = 3  # validation did not confirm the model: nothing published, all kept


class UserError(Exception):
    """Bad input the user can fix: printed as one line, no traceback, exit code 2."""

    exit_code = EXIT_USER_ERROR


class NotConfirmed(UserError):
    """The gate on publishing refused the model: one line, exit code 3, nothing published."""

    exit_code = EXIT_NOT_CONFIRMED


EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: finished stages are kept, a re-run resumes


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cause_in_chain(
    exc: BaseException, matches: Callable[[BaseException], bool]
) -> BaseException | None:
    """The first exception of `exc`'s chain (itself, then what it was raised from or during)
    that `matches`: libraries wrap the error that says what happened in their own."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if matches(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def disk_full(exc: BaseException) -> OSError | None:
    """The "no space left" error behind `exc`, if that is what it is: the user's to fix."""
    found = cause_in_chain(
        exc, lambda e: isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    )
    return found if isinstance(found, OSError) else None


def exit_code_for(exc: BaseException) -> int:
    """The exit code the CLI ends with when a run raised `exc`."""
    if isinstance(exc, UserError):
        return exc.exit_code
    if disk_full(exc):
        return EXIT_USER_ERROR
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_BUG


def abbreviated(value: object) -> str:
    """A value quoted in an error message, cut to 60 characters (it may come from a damaged
    file: megabytes of it would drown the line)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
