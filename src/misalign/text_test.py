"""Tests of ``misalign.text``: nothing a terminal would act on survives ``printable``."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from misalign.text import printable


def test_escapes_are_written_out_and_the_rest_is_kept():
    text = "bad \x1b[31mRED\x1b]8;;http://evil.example\x07LINK\x1b]8;;\x07 \r done\n é ✓"
    assert printable(text) == (
        "bad \\x1b[31mRED\\x1b]8;;http://evil.example\\x07LINK\\x1b]8;;\\x07 \\r done\\n é ✓"
    )


@given(st.text())
def test_the_result_is_printable(text):
    out = printable(text)
    assert out.isprintable()
    assert printable(out) == out  # nothing left to escape
