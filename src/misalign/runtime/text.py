"""Text for the terminal. From outside (server messages, model answers, names and paths from
shared files), made safe to print: control characters (ESC sequences that recolour, move the
cursor, retitle the window or hide links; CR that overwrites a line) are shown as escapes
(``\\x1b``), never sent to the terminal as they are. Counts, with the noun agreeing
(``plural``: "1 run", "2 runs")."""

from __future__ import annotations

import sys


def printable(text: str) -> str:
    """``text`` with every character that is not printable (control and format characters,
    line breaks) written as its escape, and everything else as it is.

    Args:
        text: any text.

    Returns:
        One line of printable characters.
    """
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def plural(count: int, noun: str, many: str | None = None, spec: str = "") -> str:
    """A count and its noun, singular for exactly one: ``1 run``, ``0 runs``, ``2 runs``.

    Args:
        count: how many.
        noun: the singular (``"run"``).
        many: the plural when it is not ``noun + "s"`` (``"retries"`` for ``"retry"``).
        spec: the count's format spec (``","`` gives ``1,000 points``).

    Returns:
        ``"<count> <noun>"``.
    """
    word = noun if count == 1 else many or noun + "s"
    return f"{count:{spec}} {word}"


def warn(message: str) -> None:
    """One line on stderr, ``misalign: warning: <message>`` (``printable``).

    Args:
        message: what happened, and what is done about it.

    Returns:
        None.
    """
    print(f"misalign: warning: {printable(message)}", file=sys.stderr)
