"""The one exception type a user's mistake raises: printed as one line, exit status 2."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (libraries' errors are often pages long)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong checkpoint); the message says how."""

    exit_code = 2


class Diverged(UserError):
    """The loss or gradients went non-finite with on_nan=stop."""

    exit_code = 3
