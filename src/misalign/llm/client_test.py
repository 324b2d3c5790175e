"""Tests of the retry client and the agent's answers, against the fake server over loopback
(``misalign.llm.client``, ``misalign.llm.agent``): corrections, failed plays, 429, 5xx,
timeouts, hangs, response-format fallback and the one-line fatal errors."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import threading
import time
import uuid
from collections import Counter
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import misalign.llm.client as client_
from misalign.api import fit, predict, setup, simulate
from misalign.config import ConfigError, parse_config
from misalign.llm.agent import Session
from misalign.llm.answer import correction
from misalign.llm.client import Fatal, _retry_after
from misalign.llm.fake_server import (
    FakeServer,
    Reply,
    affine,
    constant,
    error_body,
    hang,
    reject_key,
    script,
    status,
)
from misalign.llm.store import Slot

A = np.array([[0.5, 0.1, 0.0], [0.0, 0.4, 0.1], [0.1, 0.0, 0.3]])
C = np.array([0.1, -0.2, 0.3])
GOOD = affine(A, C)
W = np.array([0.25, -1.5, 2.0])


@pytest.fixture(autouse=True)
def loopback_allowed(monkeypatch):
    """The fake servers of these tests are on 127.0.0.1: a key may go there."""
    monkeypatch.setenv("MISALIGN_ALLOW_HOSTS", "127.0.0.1")


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Retries wait milliseconds, not seconds."""
    monkeypatch.setattr(client_, "BACKOFF", 0.001)


@pytest.fixture
def server():
    with FakeServer(GOOD) as fake:
        yield fake


def config(base_url: str, rounds: int = 6, **llm):
    """A play of an llm agent A and a gradient agent B, d = 3."""
    agent = {"kind": "llm", "model": "fake", "base_url": base_url, "api_key_env": "", "n": 4}
    agent |= {"max_retries": 2, "timeout_s": 5.0, "refits": 1, **llm}
    return parse_config({"d": 3, "rounds": rounds, "agents": {"A": agent, "B": {"n": 6}}})


def game_of(tmp_path, base_url: str, seeds=(0,), **llm):
    """The game and its session (the caller closes it)."""
    session = Session(str(tmp_path / f"{uuid.uuid4().hex}.sqlite"))
    return setup(config(base_url, **llm), seeds=seeds, session=session), session


def ask(game, play: int = 0, round: int = 0):
    """Agent A's answer to ``W + round`` (a new request each round) in play ``play``
    (``None``: the play failed)."""
    agent = game.agents["A"]
    return agent.ask([(play, W + round, Slot("A", agent.seeds[play], "play", round, 0))])[0]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ('{"estimate": [1.0, ', "the answer held 1 number, not 3"),
        ("w = [1.0, 2.0]", "the answer held 2 numbers, not 3"),
        ('{"estimate": [1, 2]}', "the estimate had 2 numbers, not 3"),
        ('{"estimate": [1, NaN, 2]}', "the estimate held a number that is not finite"),
        ("", "the answer was empty"),
    ],
)
def test_a_bad_answer_gets_one_correction_and_a_retry(tmp_path, server, bad, problem):
    server.behaviour = script(Reply(content=bad), GOOD)
    game, session = game_of(tmp_path, server.base_url)
    try:
        answer = ask(game)
    finally:
        session.close()
    np.testing.assert_allclose(answer, A @ W + C, rtol=1e-15)
    first, second = (r["messages"] for r in server.requests)
    assert second == [
        *first,
        {"role": "assistant", "content": bad},
        {"role": "user", "content": correction(problem, 3)},
    ]
    assert session.stats.retries == Counter(answer=1) and session.stats.requests == 2


def test_prose_is_read_without_a_correction(tmp_path, server):
    server.behaviour = constant("Working it through... w_new = [0.5, -0.25, 1e-3].")
    game, session = game_of(tmp_path, server.base_url)
    try:
        assert ask(game).tolist() == [0.5, -0.25, 0.001]
    finally:
        session.close()
    assert len(server.requests) == 1 and not session.stats.retries


def test_an_empty_content_gets_a_correction(tmp_path, server):
    server.behaviour = script(Reply(content=None), GOOD)
    game, session = game_of(tmp_path, server.base_url)
    try:
        np.testing.assert_allclose(ask(game), A @ W + C)
    finally:
        session.close()
    assert server.requests[1]["messages"][-2] == {"role": "assistant", "content": ""}


def prompt_marker(game, play: int) -> str:
    """Text only play ``play``'s prompt holds: its first example."""
    return json.dumps(game.prompts["A"][play].X[0].tolist())


def test_a_play_that_never_answers_well_fails_and_the_others_go_on(tmp_path, server):
    game, session = game_of(tmp_path, server.base_url, seeds=(0, 1, 2), rounds=40)
    try:
        fits = fit(game)
        marker, asked = prompt_marker(game, 1), Counter()

        def behaviour(body, index):
            if marker in body["messages"][1]["content"]:
                asked[1] += 1
                if asked[1] > 3:  # rounds 0, 1, 2 answered, then prose without numbers
                    return Reply(content="I would rather not say.")
            return GOOD(body, index)

        server.behaviour = behaviour
        trajectory = simulate(game)
        prediction = predict(game)
    finally:
        session.close()
    assert fits is not None
    assert session.failed == [
        {
            "agent": "A",
            "seed": 1,
            "kind": "play",
            "round": 3,
            "why": "no valid answer after 3 tries; last answer: 'I would rather not say.'",
        }
    ]
    assert asked[1] == 3 + 3  # the first try and max_retries = 2 corrections
    outputs = trajectory.outputs("A")
    assert np.isfinite(outputs[:3, 1]).all() and np.isnan(outputs[3:, 1]).all()
    for b in (0, 2):
        np.testing.assert_allclose(outputs[-1, b], prediction.fixed_point["A"][b], atol=1e-9)
    assert game.agents["A"].failed.tolist() == [False, True, False]


def test_429_waits_at_least_retry_after(tmp_path, server):
    limited = Reply(429, headers={"Retry-After": "0.4"}, body=error_body(429))
    server.behaviour = script(limited, GOOD)
    game, session = game_of(tmp_path, server.base_url)
    try:
        began = time.monotonic()
        np.testing.assert_allclose(ask(game), A @ W + C)
        elapsed = time.monotonic() - began
    finally:
        session.close()
    assert elapsed >= 0.4
    assert session.stats.retries == Counter({"429": 1}) and session.stats.requests == 2
    assert game.agents["A"].format == "json_schema"


def test_429_outlasting_the_retries_fails_the_play(tmp_path, server):
    server.behaviour = status(429, retry_after=0.01)
    game, session = game_of(tmp_path, server.base_url, max_retries=1)
    try:
        assert ask(game) is None
    finally:
        session.close()
    assert session.failed[0]["why"] == "429 after 2 attempts; no answer"
    assert len(server.requests) == 2


def test_5xx_is_retried(tmp_path, server):
    server.behaviour = script(Reply(content='{"estimate": [1, 2, 3]}'), status(502), GOOD)
    game, session = game_of(tmp_path, server.base_url)
    try:
        assert ask(game).tolist() == [1.0, 2.0, 3.0]  # the format is now known to work
        np.testing.assert_allclose(ask(game, round=1), A @ (W + 1) + C)
    finally:
        session.close()
    assert session.stats.retries == Counter({"5xx": 1}) and len(server.requests) == 3
    assert game.agents["A"].format == "json_schema"


def test_a_timeout_is_retried(tmp_path, server):
    server.behaviour = script(Reply(content='{"estimate": [1, 2, 3]}', delay=2.0), GOOD)
    game, session = game_of(tmp_path, server.base_url, timeout_s=0.2)
    try:
        began = time.monotonic()
        np.testing.assert_allclose(ask(game), A @ W + C)
        assert time.monotonic() - began < 1.5
    finally:
        session.close()
    assert session.stats.retries == Counter(timeout=1) and len(server.requests) == 2


def test_a_server_that_never_answers_fails_the_plays_without_hanging(tmp_path, server):
    server.behaviour = hang()
    game, session = game_of(tmp_path, server.base_url, seeds=(0, 1), timeout_s=0.2, rounds=3)
    try:
        began = time.monotonic()
        trajectory = simulate(game)
        assert time.monotonic() - began < 3
    finally:
        session.close()
    assert np.isnan(trajectory.outputs("A")).all()
    assert sorted((f["seed"], f["round"], f["why"]) for f in session.failed) == [
        (0, 0, "timeout after 3 attempts; no answer"),
        (1, 0, "timeout after 3 attempts; no answer"),
    ]
    assert session.stats.retries == Counter(timeout=4)


def test_json_schema_refused_falls_back_to_json_object_and_keeps_it(tmp_path, server):
    server.behaviour = affine(A, C, refuse_json_schema=True)
    game, session = game_of(tmp_path, server.base_url)
    try:
        assert game.agents["A"].format is None  # nothing sent yet
        for round in range(3):
            np.testing.assert_allclose(ask(game, round=round), A @ (W + round) + C)
    finally:
        session.close()
    kinds = [r["response_format"]["type"] for r in server.requests]
    assert kinds == ["json_schema", "json_object", "json_object", "json_object"]
    assert game.agents["A"].format == "json_object"
    assert session.stats.retries == Counter(format=1)


def test_a_server_refusing_every_response_format_gets_plain_text(tmp_path, server):
    def behaviour(body, index):
        if "response_format" in body:
            return Reply(400, body=error_body(400, "response_format is not supported"))
        return GOOD(body, index)

    server.behaviour = behaviour
    game, session = game_of(tmp_path, server.base_url)
    try:
        np.testing.assert_allclose(ask(game), A @ W + C)
    finally:
        session.close()
    assert game.agents["A"].format == "text" and len(server.requests) == 3


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_one_fatal_line(tmp_path):
    port = closed_port()
    game, session = game_of(tmp_path, f"http://127.0.0.1:{port}/v1", seeds=(0, 1))
    try:
        with pytest.raises(Fatal) as info:
            simulate(game)
    finally:
        session.close()
    assert str(info.value) == (
        f"agents.A.base_url: http://127.0.0.1:{port}/v1 unreachable after 3 attempts"
    )
    assert session.stats.retries["connection"] >= 2


def test_a_refused_request_setting_is_named(tmp_path, server):
    server.behaviour = reject_key("reasoning_effort", GOOD)
    game, session = game_of(tmp_path, server.base_url, request={"reasoning_effort": "low"})
    try:
        with pytest.raises(Fatal) as info:
            ask(game)
    finally:
        session.close()
    message = str(info.value)
    assert message.startswith("agents.A.request.reasoning_effort: the server refused the request")
    assert "HTTP 400" in message and "\n" not in message
    assert len(server.requests) == 1  # not mistaken for a refused response_format
    assert server.requests[0]["reasoning_effort"] == "low"


def test_a_refused_model_names_the_model(tmp_path, server):
    server.behaviour = script(
        Reply(content='{"estimate": [1, 2, 3]}'),
        Reply(404, body=error_body(404, "The model 'fake' does not exist")),
    )
    game, session = game_of(tmp_path, server.base_url)
    try:
        ask(game)
        with pytest.raises(Fatal, match=r"^agents\.A\.model: .*HTTP 404: The model 'fake' does"):
            ask(game, round=1)
    finally:
        session.close()


def test_settings_reach_the_body_as_they_are(tmp_path, server):
    """A server's own settings (llama.cpp's top_k) and names the SDK would take as its own
    options (timeout) go into the body; a seed is offset by the sample index."""
    settings = {"top_k": 40, "timeout": 7, "seed": 5, "temperature": 0.0}
    game, session = game_of(tmp_path, server.base_url, request=settings)
    try:
        agent = game.agents["A"]
        agent.ask([(0, W, Slot("A", 0, "probe", 0, 0, sample)) for sample in (0, 2)])
    finally:
        session.close()
    bodies = sorted(server.requests, key=lambda body: body["seed"])
    assert [{k: b[k] for k in settings} for b in bodies] == [settings, {**settings, "seed": 7}]


def test_a_missing_key_variable_is_named_before_any_request(tmp_path, server):
    name = f"MISALIGN_TEST_UNSET_{uuid.uuid4().hex.upper()}"
    with pytest.raises(ConfigError) as info:
        game_of(tmp_path, server.base_url, api_key_env=name)
    assert str(info.value) == f"agents.A.api_key_env: the environment variable {name} is not set"
    assert server.requests == []


def test_a_key_written_as_the_variable_name_is_not_repeated(tmp_path, server):
    key = f"gsk_{uuid.uuid4().hex}"  # passes as a name
    with pytest.raises(ConfigError, match=r"^agents\.A\.api_key_env: names no environment") as e:
        game_of(tmp_path, server.base_url, api_key_env=key)
    assert key not in str(e.value)


def test_a_refused_key_names_the_variable_not_the_key(tmp_path, server, monkeypatch):
    key = f"sk-test-{uuid.uuid4()}"
    monkeypatch.setenv("MISALIGN_TEST_KEY", key)
    server.behaviour = status(401)
    game, session = game_of(tmp_path, server.base_url, api_key_env="MISALIGN_TEST_KEY")
    try:
        with pytest.raises(Fatal) as info:
            ask(game)
    finally:
        session.close()
    assert str(info.value) == (
        "agents.A.api_key_env: the server refused the key in $MISALIGN_TEST_KEY (HTTP 401)"
    )
    assert server.headers[0]["authorization"] == f"Bearer {key}"


def test_a_server_wanting_a_key_when_none_is_set(tmp_path, server):
    server.behaviour = status(401)
    game, session = game_of(tmp_path, server.base_url)
    try:
        with pytest.raises(Fatal, match=r"^agents\.A\.api_key_env: the server wants a key"):
            ask(game)
    finally:
        session.close()


def test_retry_after_forms():
    assert _retry_after({"retry-after": "2"}) == 2.0
    assert _retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert _retry_after({"retry-after": "soon"}) is None
    assert _retry_after({}) is None and _retry_after(None) is None
    assert 8 < _retry_after({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert _retry_after({"retry-after": formatdate(time.time() - 60, usegmt=True)}) == 0.0


# Response formats: late refusals, transient 5xx, errors about the format


def refusing_json_schema(first_delay: float = 0.0, later_delay: float = 0.5, code: int = 400):
    """Refuses json_schema (the first such request at once, the others after a delay, so that
    they arrive once another format has worked); answers the other formats."""
    refused = Counter()

    def behaviour(body, index):
        if body.get("response_format", {}).get("type") == "json_schema":
            refused["n"] += 1
            delay = first_delay if refused["n"] == 1 else later_delay
            return Reply(code, body=error_body(code), delay=delay)
        return GOOD(body, index)

    return behaviour


@pytest.mark.parametrize("code", [400, 422])
def test_a_refusal_of_a_format_left_behind_arriving_late_is_retried(tmp_path, server, code):
    """Plays ask at once with json_schema; one refusal comes back first, the format moves on
    and works; the other refusals, arriving after that, are retried with the format that
    works (they stopped the run)."""
    server.behaviour = refusing_json_schema(code=code)
    game, session = game_of(tmp_path, server.base_url, seeds=(0, 1, 2))
    agent = game.agents["A"]
    try:
        slots = [Slot("A", seed, "play", 0, 0) for seed in agent.seeds]
        answers = agent.ask([(b, W, slots[b]) for b in range(3)])
    finally:
        session.close()
    assert all(answer is not None for answer in answers) and session.failed == []
    kinds = Counter(body["response_format"]["type"] for body in server.requests)
    assert kinds == Counter(json_schema=3, json_object=3)
    assert agent.format == "json_object" and session.stats.retries == Counter(format=3)


def test_one_5xx_on_the_first_request_keeps_the_format(tmp_path, server):
    server.behaviour = script(Reply(500, body=error_body(500, "upstream overloaded")), GOOD)
    game, session = game_of(tmp_path, server.base_url)
    try:
        np.testing.assert_allclose(ask(game), A @ W + C)
    finally:
        session.close()
    assert [body["response_format"]["type"] for body in server.requests] == ["json_schema"] * 2
    assert game.agents["A"].format == "json_schema"
    assert session.stats.retries == Counter({"5xx": 1})


def test_5xx_outlasting_the_retries_of_an_untried_format_falls_back(tmp_path, server):
    """A server that fails every json_schema request with a plain 500: the format's retries
    are spent, then the next format is tried (with retries of its own)."""

    def behaviour(body, index):
        if body["response_format"]["type"] == "json_schema":
            return Reply(500, body=error_body(500, "internal error"))
        return GOOD(body, index)

    server.behaviour = behaviour
    game, session = game_of(tmp_path, server.base_url)
    try:
        np.testing.assert_allclose(ask(game), A @ W + C)
    finally:
        session.close()
    kinds = [body["response_format"]["type"] for body in server.requests]
    assert kinds == ["json_schema"] * 3 + ["json_object"]  # max_retries = 2
    assert session.stats.retries == Counter({"5xx": 2, "format": 1})


LLAMA_CPP_500 = (
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', "
    "'type'), 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
    "'ctx': {'expected': \"'text' or 'json_object'\"}}"
)
"""What llama-cpp-python's server answers (HTTP 500) to a json_schema response_format."""


def test_a_5xx_about_the_format_falls_back_at_once(tmp_path, server):
    def behaviour(body, index):
        if body["response_format"]["type"] == "json_schema":
            return Reply(500, body=error_body(500, LLAMA_CPP_500))
        return GOOD(body, index)

    server.behaviour = behaviour
    game, session = game_of(tmp_path, server.base_url)
    try:
        np.testing.assert_allclose(ask(game), A @ W + C)
    finally:
        session.close()
    assert [body["response_format"]["type"] for body in server.requests] == [
        "json_schema",
        "json_object",
    ]
    assert session.stats.retries == Counter(format=1)


def test_an_error_whose_param_is_response_format_falls_back_even_after_it_worked(tmp_path, server):
    refusal = error_body(400, "Invalid value", param="response_format", code="invalid_value")
    server.behaviour = script(
        Reply(content='{"estimate": [1, 2, 3]}'), Reply(400, body=refusal), GOOD
    )
    game, session = game_of(tmp_path, server.base_url)
    try:
        ask(game)
        np.testing.assert_allclose(ask(game, round=1), A @ (W + 1) + C)
    finally:
        session.close()
    assert game.agents["A"].format == "json_object"


# Settings named by the server


def test_a_setting_mentioned_in_passing_is_not_blamed(tmp_path, server):
    """'user' in "this user tier" names no setting: the 400 is a refused format, and the
    next format works (it stopped the run, naming request.user)."""

    def behaviour(body, index):
        if body["response_format"]["type"] == "json_schema":
            return Reply(
                400, body=error_body(400, "json_schema is not available to this user tier")
            )
        return GOOD(body, index)

    server.behaviour = behaviour
    game, session = game_of(tmp_path, server.base_url, request={"user": "me", "seed": 1})
    try:
        np.testing.assert_allclose(ask(game), A @ W + C)
    finally:
        session.close()
    assert game.agents["A"].format == "json_object"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("Unsupported value: 'user' does not support 'me' with this model.", None),
        ('Invalid type for "user": expected an object', None),
        ("top_k must be below 100", None),
        ("Invalid value", "top_k"),
        ("Invalid value", "top_k.inner"),
    ],
)
def test_a_setting_named_in_quotes_or_by_param_is_fatal(tmp_path, server, message, param):
    setting = "top_k" if "top_k" in message or param else "user"
    refusal = error_body(400, message, param=param)
    server.behaviour = lambda body, index: Reply(400, body=refusal)
    game, session = game_of(tmp_path, server.base_url, request={"user": "me", "top_k": 200})
    try:
        with pytest.raises(Fatal, match=rf"^agents\.A\.request\.{setting}: the server refused"):
            ask(game)
    finally:
        session.close()
    assert len(server.requests) == 1


def test_a_param_that_is_none_of_ours_is_trusted(tmp_path, server):
    """The server names ``messages``: whatever the message says about 'seed', no setting is
    named, and once a format worked only the play fails."""
    refusal = error_body(400, "'seed' is fine, the messages are too long", param="messages")
    server.behaviour = script(Reply(content='{"estimate": [1, 2, 3]}'), Reply(400, body=refusal))
    game, session = game_of(tmp_path, server.base_url, request={"seed": 3})
    try:
        ask(game)
        assert ask(game, round=1) is None
    finally:
        session.close()
    assert session.failed[0]["why"].startswith("the server refused the request (HTTP 400: 'seed'")


# A 400 after the format worked fails the play, not the run


def test_a_400_after_the_format_worked_fails_only_that_play(tmp_path, server):
    game, session = game_of(tmp_path, server.base_url, seeds=(0, 1))
    marker = prompt_marker(game, 1)
    too_long = error_body(
        400,
        "This model's maximum context length is 8192 tokens. However, your messages "
        "resulted in 9001 tokens. Please reduce the length of the messages.",
        param="messages",
        code="context_length_exceeded",
    )

    def behaviour(body, index):
        if marker in body["messages"][1]["content"] and "[1.25," in str(body["messages"]):
            return Reply(400, body=too_long)
        return GOOD(body, index)

    server.behaviour = behaviour
    try:
        for round in range(3):  # play 1 is refused at round 1 (W + 1 = [1.25, ...])
            for play in (0, 1):
                answer = ask(game, play=play, round=round)
                assert (answer is None) == (play == 1 and round == 1)
    finally:
        session.close()
    (failure,) = session.failed
    assert (failure["seed"], failure["round"]) == (1, 1)
    assert failure["why"] == (
        "the server refused the request (HTTP 400: This model's maximum context length is "
        "8192 tokens. However, your messages resulted in 9001 tokens. Please reduce the length "
        "of the messages.); no answer"
    )


def test_a_400_naming_a_setting_after_the_format_worked_stays_fatal(tmp_path, server):
    refusal = error_body(400, "Unsupported value: 'temperature'", param="temperature")
    server.behaviour = script(Reply(content='{"estimate": [1, 2, 3]}'), Reply(400, body=refusal))
    game, session = game_of(tmp_path, server.base_url, request={"temperature": 0.0})
    try:
        ask(game)
        with pytest.raises(Fatal) as info:
            ask(game, round=1)
    finally:
        session.close()
    assert str(info.value) == (
        "agents.A.request.temperature: the server refused the request "
        "(HTTP 400: Unsupported value: 'temperature')"
    )


# Malformed responses are bad answers, never tracebacks


def completion_body(**changes) -> dict:
    """A completion carrying a good answer, with ``changes`` made to it (None: removed)."""
    body = {
        "id": "x",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": '{"estimate": [1, 2, 3]}'},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
    return body | changes


BROKEN = {
    "no message": completion_body(choices=[{"index": 0, "message": None, "finish_reason": "stop"}]),
    "content a number": completion_body(
        choices=[{"index": 0, "message": {"role": "assistant", "content": 5}}]
    ),
    "choices a string": completion_body(choices="x"),
    "a list": [1, 2, 3],
    "a string": "ok",
}


@pytest.mark.parametrize("broken", BROKEN.values(), ids=BROKEN.keys())
def test_a_malformed_response_is_a_bad_answer(tmp_path, server, broken):
    server.behaviour = script(Reply(body=broken), GOOD)
    game, session = game_of(tmp_path, server.base_url)
    try:
        np.testing.assert_allclose(ask(game), A @ W + C)
    finally:
        session.close()
    correction_ = server.requests[1]["messages"][-1]["content"]
    assert correction_.startswith("the server's response was malformed (")
    assert session.stats.retries == Counter(answer=1) and session.failed == []


def test_unreadable_token_counts_are_zero(tmp_path, server):
    usage = {"prompt_tokens": None, "completion_tokens": "many", "total_tokens": None}
    server.behaviour = constant_body(completion_body(usage=usage))
    game, session = game_of(tmp_path, server.base_url)
    try:
        assert ask(game).tolist() == [1.0, 2.0, 3.0]
    finally:
        session.close()
    assert (session.stats.tokens_in, session.stats.tokens_out) == (0, 0)


def constant_body(body) -> object:
    return lambda request, index: Reply(body=body)


@contextlib.contextmanager
def raw_server(payload: bytes, content_type: str):
    """A server on loopback answering every request 200 with ``payload`` as it is (the fake
    server sends only JSON)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("payload", "content_type", "why"),
    [
        (b"<html><body>502 Bad Gateway</body></html>", "text/html", "text, not a completion"),
        (b"not json", "application/json", "not JSON"),
        (b"", "application/json", "not JSON"),
    ],
)
def test_a_response_that_is_not_json_fails_the_play(tmp_path, payload, content_type, why):
    with raw_server(payload, content_type) as base_url:
        game, session = game_of(tmp_path, base_url, seeds=(0, 1))
        try:
            assert ask(game, play=0) is None and ask(game, play=1) is None
        finally:
            session.close()
    assert session.failed[0]["why"] == (
        f"no valid answer after 3 tries; last answer: none (the server's response was "
        f"malformed ({why}))"
    )
    assert session.stats.retries == Counter(answer=4)


# Cut off at the token limit


def cut(text: str) -> Reply:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    return Reply(body=completion_body(choices=[{**choice, "finish_reason": "length"}]))


def test_an_answer_cut_off_at_the_token_limit_is_corrected(tmp_path, server):
    server.behaviour = script(cut('{"estimate": [0.123, 0.45, 0.6'), GOOD)
    game, session = game_of(tmp_path, server.base_url)
    try:
        np.testing.assert_allclose(ask(game), A @ W + C)
    finally:
        session.close()
    assert server.requests[1]["messages"][-1]["content"] == correction(
        "the answer was cut off at the token limit; answer shorter", 3
    )


def test_whole_json_at_the_token_limit_is_accepted(tmp_path, server):
    """llama.cpp's JSON grammar may pad a closed answer with whitespace up to the limit."""
    server.behaviour = script(cut('{"estimate": [0.5, 0.25, 1]}\n\n\n'), GOOD)
    game, session = game_of(tmp_path, server.base_url)
    try:
        assert ask(game).tolist() == [0.5, 0.25, 1.0]
    finally:
        session.close()
    assert len(server.requests) == 1


# Small things


def test_one_try_and_one_attempt_are_singular(tmp_path, server):
    server.behaviour = script(Reply(content="no idea"), status(429, retry_after=0))
    game, session = game_of(tmp_path, server.base_url, max_retries=0)
    try:
        assert ask(game) is None and ask(game, round=1) is None
    finally:
        session.close()
    assert [f["why"] for f in session.failed] == [
        "no valid answer after 1 try; last answer: 'no idea'",
        "429 after 1 attempt; no answer",
    ]


def test_a_failed_probe_names_the_probe_and_the_sample(tmp_path, server):
    server.behaviour = constant("no idea")
    game, session = game_of(tmp_path, server.base_url, max_retries=0)
    try:
        agent = game.agents["A"]
        assert agent.ask([(0, W, Slot("A", 0, "probe", 1, 4, 2))]) == [None]
    finally:
        session.close()
    assert session.failed == [
        {
            "agent": "A",
            "seed": 0,
            "kind": "probe",
            "round": 1,
            "probe": 4,
            "sample": 2,
            "why": "probe 4, sample 2: no valid answer after 1 try; last answer: 'no idea'",
        }
    ]


def test_a_boolean_seed_is_not_offset(tmp_path, server):
    game, session = game_of(tmp_path, server.base_url, request={"seed": True})
    try:
        game.agents["A"].ask([(0, W, Slot("A", 0, "probe", 0, 0, sample)) for sample in (0, 2)])
    finally:
        session.close()
    assert [body["seed"] for body in server.requests] == [True, True]


def test_a_session_closes_twice(tmp_path, server):
    game, session = game_of(tmp_path, server.base_url)
    ask(game)
    session.close()
    session.close()


# The server's build, kept with each answer


def test_the_servers_build_is_kept_with_each_answer(tmp_path, server):
    """``system_fingerprint`` goes into the store with the answer: text as it is, at most
    ``FINGERPRINT_CHARS`` characters, with control characters escaped; ``None`` when the
    server names none or names it with something that is not text."""
    builds = ["llama-cpp-python 0.3.36; m.gguf sha256:0123", 5, "x" * 400, "a\x1b[2Jb", None]
    server.behaviour = script(*(Reply(body=completion_body(system_fingerprint=b)) for b in builds))
    game, session = game_of(tmp_path, server.base_url)
    try:
        for round_ in range(len(builds)):
            assert ask(game, round=round_).tolist() == [1.0, 2.0, 3.0]
    finally:
        session.close()
    with contextlib.closing(sqlite3.connect(session.store.path)) as db:
        stored = [row[0] for row in db.execute("SELECT fingerprint FROM answers ORDER BY round")]
    assert stored == [builds[0], None, "x" * client_.FINGERPRINT_CHARS, "a\\x1b[2Jb", None]
