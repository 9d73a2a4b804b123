"""User-facing errors.

Anything a user can cause (bad file, bad flag, missing model) raises :class:`MlxLoraError`;
the CLI turns it into one line on stderr and exit code 2. Everything else is a bug and may raise.
"""


class MlxLoraError(Exception):
    """An error the user can fix; its message is one line: what, where, what to do."""
