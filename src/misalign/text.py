"""Text from outside (server messages, model answers, names and paths from shared files) made
safe to print on a terminal: control characters (ESC sequences that recolour, move the
cursor, retitle the window or hide links; CR that overwrites a line) are shown as escapes
(``\\x1b``), never sent to the terminal as they are."""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every character that is not printable (control and format characters,
    line breaks) written as its escape, and everything else as it is.

    Args:
        text: any text.

    Returns:
        One line of printable characters.
    """
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
