"""Reading a language model's answer as ``d`` numbers.

The agent asks for ``{"estimate": [d numbers]}``; ``parse`` reads that strictly, then falls
back to the last bracketed list of ``d`` numbers in the text, else its last ``d`` numbers (a
model that wraps its JSON in prose, or answers in prose), and checks length and finiteness.
A bad answer gets one short ``correction``. (An answer cut off at the token limit is refused
by the agent, from the server's ``finish_reason``; its numbers may still parse here.)
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from misalign.runtime.text import plural

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
"""A number as a model writes it: ``-1``, ``0.5``, ``.5``, ``3e-2``."""
BRACKETED = re.compile(r"\[([^\[\]]*)\]")
"""A bracketed list without brackets inside."""
SEPARATORS = re.compile(r"[\s,;]+")


class BadAnswer(ValueError):
    """An answer that is not ``d`` finite numbers; the message says what is wrong."""


def schema(d: int) -> dict:
    """The JSON schema of an answer: ``{"estimate": [d numbers]}``."""
    return {
        "type": "object",
        "properties": {
            "estimate": {"type": "array", "items": {"type": "number"}, "minItems": d, "maxItems": d}
        },
        "required": ["estimate"],
        "additionalProperties": False,
    }


def response_format(kind: str, d: int) -> dict | None:
    """The ``response_format`` of a request: ``json_schema`` (strict structured output),
    ``json_object`` (JSON mode, with the schema for servers such as llama.cpp's that take
    one there) or ``text`` (none)."""
    if kind == "json_schema":
        return {
            "type": "json_schema",
            "json_schema": {"name": "estimate", "schema": schema(d), "strict": True},
        }
    if kind == "json_object":
        return {"type": "json_object", "schema": schema(d)}
    return None


FORMATS = ("json_schema", "json_object", "text")
"""The fallback chain of ``response_format``: the first the server accepts is kept."""


def parse(text: str | None, d: int, strict: bool = False) -> np.ndarray:
    """The ``d`` numbers of an answer.

    Reads ``{"estimate": [...]}`` (or a bare JSON list) strictly; otherwise the last
    bracketed list of exactly ``d`` numbers in the text (``w = [0.5, -0.3] (step 2 of 3)``
    is ``[0.5, -0.3]``), and when there is none, the last ``d`` numbers of the text.
    ``strict``: JSON only, no fallback.

    Raises:
        BadAnswer: empty, fewer or more than ``d`` numbers in the JSON, not JSON
            (``strict``), fewer than ``d`` numbers in the text, or a number that is not
            finite. The messages are part of the requests that follow (the corrections), so
            a store's replay needs them unchanged.
    """
    if not text or not text.strip():
        raise BadAnswer("the answer was empty")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # not JSON; an integer of over 4300 digits
        data = None
    if isinstance(data, dict) and "estimate" in data:
        data = data["estimate"]
    if isinstance(data, list):
        if len(data) != d:
            raise BadAnswer(f"the estimate had {plural(len(data), 'number')}, not {d}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in data):
            raise BadAnswer("the estimate held something other than numbers")
        try:
            values = [float(v) for v in data]
        except OverflowError:  # an integer beyond float64
            raise BadAnswer("the estimate held a number that is not finite") from None
    elif strict:
        raise BadAnswer("the answer was not JSON")
    else:
        found = _last_list(text, d) or NUMBER.findall(text)
        if len(found) < d:
            raise BadAnswer(f"the answer held {plural(len(found), 'number')}, not {d}")
        values = [float(v) for v in found[-d:]]
    if not all(math.isfinite(v) for v in values):
        raise BadAnswer("the estimate held a number that is not finite")
    return np.array(values)


def _last_list(text: str, d: int) -> list[str] | None:
    """The numbers of the last bracketed list of exactly ``d`` numbers in ``text``."""
    for match in reversed(list(BRACKETED.finditer(text))):
        items = [item for item in SEPARATORS.split(match.group(1)) if item]
        if len(items) == d and all(NUMBER.fullmatch(item) for item in items):
            return items
    return None


def correction(problem: str, d: int) -> str:
    """The one short message sent after a bad answer."""
    return f'{problem}. Answer again with JSON only: {{"estimate": [{d} finite numbers]}}.'
