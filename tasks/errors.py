"""Errors that are the user's to fix (a wrong path, an unknown version, a bad value).

The CLI prints them as one line, ``mpemd: error: <message>``, with no traceback (``-v`` shows it);
flows and tasks raise them instead of retrying what cannot succeed. The message says what is wrong
and, where it can, what exists instead.
"""


class UserError(Exception):
    """A problem in the user's input or environment, not a bug: reported in one line, never retried."""
