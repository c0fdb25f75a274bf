"""The one exception type that carries a message meant for the user, and how such a
message shows the value it is about."""

from __future__ import annotations

import itertools
import math
import reprlib

MAX_SHOWN = 60  # characters of a value shown in a message


class SfdiagError(Exception):
    """A problem with the user's input (config, arguments, files).

    The CLI prints the message on stderr, without a traceback, and exits 2.
    """


class _BoundedRepr(reprlib.Repr):
    """reprlib with dicts in their own order and huge integers described, not converted."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxdict = self.maxset = self.maxfrozenset = 4
        self.maxdeque = self.maxarray = 4
        self.maxstring = self.maxother = MAX_SHOWN
        self.maxlong = 40

    def repr_int(self, x: int, level: int) -> str:
        # Python refuses to write an int of more than 4300 digits in decimal, and a long one
        # says nothing more than its size
        if x.bit_length() > 128:
            digits = int(x.bit_length() * math.log10(2)) + 1
            return f"{'-' if x < 0 else ''}<an integer of about {digits} digits>"
        return super().repr_int(x, level)

    def repr_dict(self, x: dict, level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [
            f"{self.repr1(key, level - 1)}: {self.repr1(value, level - 1)}"
            for key, value in itertools.islice(x.items(), self.maxdict)
        ]
        if len(x) > self.maxdict:
            items.append("...")
        return "{" + ", ".join(items) + "}"


_BOUNDED = _BoundedRepr()


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters: a few items of each
    container, a few levels deep. Never expands a YAML alias bomb or a self-referencing
    list, and never writes out a huge integer."""
    text = _BOUNDED.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
