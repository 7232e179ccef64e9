"""The one error type a user should ever see from this repo.

A `UserError` carries a single line that names the bad thing and what was expected. Entry points
catch it, print `error: <message>` to stderr and exit with status 2, so a typo never ends in a
stack trace, and nothing written earlier (checkpoints, caches, reports) is touched on the way out.
"""


class UserError(Exception):
    """Bad input from the user: a path, a flag, an environment variable, a data file."""

    def __init__(self, message: str):
        # One line, always: multi-line messages get folded so logs stay greppable.
        super().__init__(" ".join(str(message).split()))
