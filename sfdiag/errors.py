"""The one exception type that carries a message meant for the user."""

from __future__ import annotations


class SfdiagError(Exception):
    """A problem with the user's input (config, arguments, files).

    The CLI prints the message on stderr, without a traceback, and exits 2.
    """
