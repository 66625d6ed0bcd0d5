"""Errors a user can fix. The CLI prints them as one message, without a traceback, and exits 2."""


class LlmtuneError(Exception):
    """Base of every user-fixable error; the message names the file, key or row."""
