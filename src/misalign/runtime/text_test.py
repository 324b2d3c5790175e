"""Tests of ``misalign.runtime.text``: nothing a terminal would act on survives ``printable``;
counts
agree with their nouns."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from misalign.runtime.text import plural, printable


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


def test_a_count_of_exactly_one_takes_the_singular():
    assert [plural(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]
    assert plural(1, "retry", "retries") == "1 retry"
    assert plural(3, "retry", "retries") == "3 retries"
    assert plural(1, "request", spec=",") == "1 request"
    assert plural(1234, "point", spec=",") == "1,234 points"
