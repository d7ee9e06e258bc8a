"""The one exception type that reaches the user as a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input the user can fix: printed as one line, no traceback, exit code 2."""


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: finished stages are kept, a re-run resumes


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def exit_code_for(exc: BaseException) -> int:
    """The exit code the CLI ends with when a run raised `exc`."""
    if isinstance(exc, UserError):
        return EXIT_USER_ERROR
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return 1
