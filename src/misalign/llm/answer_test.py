"""Tests of reading a language model's answer (``misalign.llm.answer``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from misalign.llm.answer import BadAnswer, correction, parse, response_format, schema


def test_strict_json_object():
    assert parse('{"estimate": [1, -2.5, 3e-2]}', 3).tolist() == [1.0, -2.5, 0.03]


def test_bare_json_list():
    assert parse("[0.5, 0.25]", 2).tolist() == [0.5, 0.25]


def test_prose_falls_back_to_the_last_d_numbers():
    text = "From w = [1, 2, 3] one step gives w_new = [0.5, -.25, 4e1]. Done."
    assert parse(text, 3).tolist() == [0.5, -0.25, 40.0]


def test_json_wrapped_in_prose_and_a_code_fence():
    text = 'Sure! Here it is:\n```json\n{"estimate": [1.5, 2.5]}\n```'
    assert parse(text, 2).tolist() == [1.5, 2.5]


def test_a_json_object_without_estimate_falls_back_to_its_numbers():
    assert parse('{"w": [7, 8]}', 2).tolist() == [7.0, 8.0]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"estimate": [1, 2]}', "had 2 numbers, not 3"),
        ("[1, 2, 3, 4]", "had 4 numbers, not 3"),
        ("I think it is 1 or 2", "held 2 numbers, not 3"),
        ("I think it is 7", "held 1 number, not 3"),
        ('{"estimate": [1, NaN, 3]}', "not finite"),
        ('{"estimate": [1, Infinity, 3]}', "not finite"),
        ("[-Infinity, 0, 0]", "not finite"),
        ("w = [1e400, 0, 0]", "not finite"),
        ("[1" + "0" * 400 + ", 0, 0]", "not finite"),  # an integer beyond float64
        ("[" + "9" * 5000 + ", 0, 0]", "not finite"),  # beyond Python's int-string limit
        ('{"estimate": [true, 0, 1]}', "other than numbers"),
        ('{"estimate": [false, 0, 1]}', "other than numbers"),
        ('{"estimate": ["1", 0, 1]}', "other than numbers"),
        ('{"estimate": [[1], 0, 1]}', "other than numbers"),
        ("", "empty"),
        ("   \n", "empty"),
        (None, "empty"),
        ("[" * 100000, "held 0 numbers"),  # too deep for json: read as prose
    ],
)
def test_bad_answers_say_what_is_wrong(text, problem):
    with pytest.raises(BadAnswer, match=problem):
        parse(text, 3)


def test_correction_names_the_problem_and_the_format():
    message = correction("the estimate had 2 numbers, not 3", 3)
    assert message.startswith("the estimate had 2 numbers, not 3. ")
    assert '{"estimate": [3 finite numbers]}' in message


def test_response_formats():
    assert response_format("text", 2) is None
    assert response_format("json_object", 2) == {"type": "json_object", "schema": schema(2)}
    strict = response_format("json_schema", 2)["json_schema"]
    assert strict["strict"] is True
    assert strict["schema"]["properties"]["estimate"]["minItems"] == 2


finite = st.floats(allow_nan=False, allow_infinity=False)
vectors = st.integers(1, 6).flatmap(lambda d: st.lists(finite, min_size=d, max_size=d))
prose = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=60)
wordy = st.text(st.characters(categories=["L", "Zs", "P"], exclude_characters="-+.[]{}"))


@given(vectors, st.booleans())
def test_json_round_trips_exactly(values, wrapped):
    text = json.dumps({"estimate": values} if wrapped else values)
    parsed = parse(text, len(values))
    assert [math.copysign(1, v) for v in parsed] == [math.copysign(1, v) for v in values]
    assert parsed.tolist() == values


@given(vectors, prose, wordy, st.booleans())
def test_prose_fallback_finds_the_json_after_any_text(values, before, after, wrapped):
    """Any text before, text without digits or signs after: the fallback reads the numbers."""
    answer = json.dumps({"estimate": values} if wrapped else values)
    parsed = parse(f"{before}\n{answer}{after}", len(values))
    assert np.array_equal(parsed, values)
    assert [math.copysign(1, v) for v in parsed] == [math.copysign(1, v) for v in values]


@pytest.mark.parametrize(
    ("text", "d", "expected"),
    [
        ("w_new = [0.5, -0.3] (step 2 of 3)", 2, [0.5, -0.3]),
        ("From [1, 2] I get [0.25, 0.75]; that is step 3 of 4.", 2, [0.25, 0.75]),
        ("w = [0.5 -0.3]; done in 2 of 3 steps", 2, [0.5, -0.3]),  # numpy's way
        ("The list [1, 2, 3] is longer; the answer: 4 and 5", 2, [4.0, 5.0]),  # no list of 2
        ("between [0, 1] then [2, 3, 4], finally 5 6", 2, [0.0, 1.0]),
    ],
)
def test_prose_prefers_the_last_bracketed_list_of_d_numbers(text, d, expected):
    assert parse(text, d).tolist() == expected


@pytest.mark.parametrize(
    "text",
    ['{"estimate": [0.123, 0.45', 'Sure: {"estimate": [0.1, 0.2]} as asked', "0.5, 0.25"],
)
def test_strict_reads_json_only(text):
    """An answer cut off at the token limit is accepted only if it is JSON whole."""
    with pytest.raises(BadAnswer, match="not JSON"):
        parse(text, 2, strict=True)
    assert parse('{"estimate": [0.5, 0.25]}\n\n', 2, strict=True).tolist() == [0.5, 0.25]


@given(vectors, vectors, wordy)
def test_the_last_list_wins_over_numbers_after_it(values, earlier, words):
    """A list of ``d`` numbers followed by prose with other numbers (a step count) is read;
    an earlier list of ``d`` numbers (the incoming estimate) is not."""
    d = len(values)
    earlier = (earlier * d)[:d]
    text = f"From {json.dumps(earlier)}{words} I get {json.dumps(values)} (step {d} of {d + 1})"
    assert parse(text, d).tolist() == values
