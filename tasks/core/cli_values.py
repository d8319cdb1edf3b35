"""Values as people type them on a command line: ``KEY=VALUE`` pairs and booleans, one spelling each.

Used by every command line of the project (``mpemd`` flags, ``mpemd sql --param``, training overrides
``lr=0.01``), so the same text means the same value everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class ValueFormatError(argparse.ArgumentTypeError, ValueError):
    """A typed value that does not parse: a ``ValueError``, and argparse prints its message as is."""


def parse_key_value(text: str) -> tuple[str, str]:
    """``"lr=0.01"`` -> ``("lr", "0.01")``: the key stripped, the value as given (it may hold ``=``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueFormatError(f"wants KEY=VALUE, got {text!r}")
    return key.strip(), value


def parse_key_values(items: Iterable[str]) -> dict[str, str]:
    """``["lr=0.01", "epochs=5"]`` -> ``{"lr": "0.01", "epochs": "5"}`` (a later key wins)."""
    return dict(map(parse_key_value, items))


def parse_bool(value: Any, name: str = "value") -> bool:
    """A bool, or one of ``TRUE_WORDS`` / ``FALSE_WORDS`` in any case; anything else raises."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueFormatError(f"{name}: expected a boolean ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}), "
                           f"got {value!r}")
