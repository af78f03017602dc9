"""The one exception type a user's mistake raises; the mains print it as one line and exit 2.

It lives at the bottom of the import graph so that models and data can raise it without
importing the training machinery.
"""
import os


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (libraries' errors are often pages long)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def missing(path: str) -> str:
    """Why a file path cannot be read as a file: what a UserError says after `key=path`."""
    return "is a directory" if os.path.isdir(path) else "does not exist"


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong checkpoint); the message says how."""

    exit_code = 2


class Diverged(UserError):
    """The loss or gradients went non-finite with on_nan=stop."""

    exit_code = 3
