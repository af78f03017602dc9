"""The one exception type a user's mistake raises: printed as one line, exit status 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong checkpoint); the message says how."""
