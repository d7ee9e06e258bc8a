"""The one exception type that reaches the user as a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input the user can fix: printed as one line, no traceback, exit code 2."""


EXIT_USER_ERROR = 2
