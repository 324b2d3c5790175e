"""Tests of the fake Chat Completions server, through the real ``openai`` SDK over loopback."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from misalign.llm.fake_server import (
    FakeServer,
    Reply,
    affine,
    constant,
    estimate_of,
    fingerprint,
    hang,
    reject_key,
    script,
    status,
)

A = np.array([[0.5, 0.1, 0.0], [0.2, 0.3, 0.7], [-1.0 / 3.0, 0.0, 0.9]])
C = np.array([0.1, -2.0 / 7.0, 3.0])
W = [0.125, -1.5, 2.0 / 3.0]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "estimate",
        "schema": {
            "type": "object",
            "properties": {"estimate": {"type": "array", "items": {"type": "number"}}},
            "required": ["estimate"],
        },
    },
}


def client(server: FakeServer, **kwargs) -> OpenAI:
    """A synchronous SDK client for the server, without retries."""
    kwargs.setdefault("max_retries", 0)
    return OpenAI(base_url=server.base_url, api_key="test-key", **kwargs)


def messages(w: list[float] = W, sample: int = 0) -> list[dict]:
    """A prompt with a system array, two example arrays, the estimate, then a correction."""
    user = (
        f"Sample {sample}. Examples: x = [1, 2, 3] and x = [4.5, 5, -6]; a pair [1, 2]; "
        f"text [a, b, c]. Your estimate: {json.dumps(w)}. Answer in JSON."
    )
    return [
        {"role": "system", "content": "You improve estimates like [9, 9, 9]."},
        {"role": "user", "content": user},
        {"role": "assistant", "content": "not JSON"},
        {"role": "user", "content": "Answer again: [7, 7, 7]."},
    ]


def ask(chat: OpenAI, **kwargs) -> str:
    """The content of one completion."""
    kwargs.setdefault("messages", messages())
    answer = chat.chat.completions.create(model="fake-model", **kwargs)
    return answer.choices[0].message.content


def test_estimate_of_reads_the_last_array_of_d_numbers_in_the_first_user_message():
    body = {"messages": messages()}
    assert estimate_of(body, 3).tolist() == W
    assert estimate_of(body, 2).tolist() == [1, 2]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "[1, 2]"}]}]}
    assert estimate_of(parts, 2).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="no array of 4"):
        estimate_of(body, 4)
    with pytest.raises(ValueError, match="role 'user'"):
        estimate_of({"messages": [{"role": "system", "content": "[1, 2, 3]"}]}, 3)


def test_affine_answers_a_w_plus_c_exactly_in_the_openai_format():
    with FakeServer(affine(A, C)) as server:
        answer = client(server).chat.completions.create(
            model="fake-model", messages=messages(), response_format=SCHEMA, seed=3
        )
    assert json.loads(answer.choices[0].message.content) == {"estimate": (A @ W + C).tolist()}
    assert answer.object == "chat.completion"
    assert answer.model == "fake-model"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert server.base_url.startswith("http://127.0.0.1:")
    assert server.base_url.endswith("/v1")
    assert server.requests[0]["seed"] == 3
    assert server.requests[0]["response_format"] == SCHEMA
    assert server.headers[0]["authorization"] == "Bearer test-key"


def test_affine_without_an_estimate_is_a_bad_request():
    with FakeServer(affine(A, C)) as server:
        chat = client(server)
        with pytest.raises(openai.BadRequestError, match="no array"):
            ask(chat, messages=[{"role": "user", "content": "Hello."}])


def test_noise_is_reproducible_per_request_and_independent_across_requests():
    with FakeServer(affine(A, C, noise_std=0.1, seed=5)) as server:
        chat = client(server)
        first, again = ask(chat, seed=1), ask(chat, seed=1)
        other_seed = ask(chat, seed=2)
        other_sample = ask(chat, seed=1, messages=messages(sample=1))
        count = server.count()
    assert first == again
    assert len({first, other_seed, other_sample}) == 3
    noise = np.array(json.loads(first)["estimate"]) - (A @ W + C)
    assert 0 < np.abs(noise).max() < 1
    assert count[fingerprint(server.requests[0])] == 2
    assert sorted(count.values()) == [1, 1, 2]


def test_refusing_json_schema_gives_a_server_error_while_json_object_works():
    with FakeServer(affine(A, C, refuse_json_schema=True)) as server:
        chat = client(server)
        with pytest.raises(openai.InternalServerError):
            ask(chat, response_format=SCHEMA)
        answer = ask(chat, response_format={"type": "json_object"})
        assert json.loads(answer) == {"estimate": (A @ W + C).tolist()}
        assert json.loads(ask(chat)) == json.loads(answer)


def test_rate_limit_reaches_the_client_with_its_retry_after_header():
    with FakeServer(status(429, retry_after=1)) as server:
        chat = client(server)
        with pytest.raises(openai.RateLimitError) as caught:
            ask(chat)
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.type == "rate_limit_error"


def test_script_plays_its_items_in_order_then_repeats_the_last():
    items = script(status(500), Reply(content="a"), affine(A, C), constant("b"))
    with FakeServer(items) as server:
        chat = client(server)
        with pytest.raises(openai.InternalServerError):
            ask(chat)
        assert ask(chat) == "a"
        assert json.loads(ask(chat)) == {"estimate": (A @ W + C).tolist()}
        assert [ask(chat), ask(chat)] == ["b", "b"]


def test_the_sdk_retries_after_the_servers_retry_after():
    with FakeServer(script(status(500, retry_after=0.01), constant("ok"))) as server:
        assert ask(client(server, max_retries=1)) == "ok"
    assert [h["x-stainless-retry-count"] for h in server.headers] == ["0", "1"]


def test_reject_key_rejects_requests_carrying_the_key_and_delegates_the_rest():
    with FakeServer(reject_key("seed", constant("fine"))) as server:
        chat = client(server)
        with pytest.raises(openai.BadRequestError) as caught:
            ask(chat, seed=1)
        assert ask(chat) == "fine"
    assert caught.value.param == "seed"
    assert caught.value.code == "unsupported_parameter"
    assert "Unsupported parameter: 'seed'" in caught.value.message


def test_concurrent_requests_overlap_their_latency():
    async def many(server: FakeServer) -> list[str]:
        async with AsyncOpenAI(base_url=server.base_url, api_key="test-key", max_retries=0) as chat:
            calls = [
                chat.chat.completions.create(model="fake-model", messages=messages(sample=k))
                for k in range(32)
            ]
            return [answer.choices[0].message.content for answer in await asyncio.gather(*calls)]

    with FakeServer(affine(A, C), latency=0.2) as server:
        start = time.perf_counter()
        answers = asyncio.run(many(server))
        elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert len(server.requests) == 32
    assert len(set(server.count())) == 32
    assert all(json.loads(a) == {"estimate": (A @ W + C).tolist()} for a in answers)


def test_a_hanging_reply_times_out_on_the_client_and_the_server_still_stops():
    server = FakeServer(script(Reply(content="late", delay=5.0), hang())).start()
    try:
        chat = client(server, timeout=0.5)
        for _ in range(2):
            with pytest.raises(openai.APITimeoutError):
                ask(chat)
    finally:
        start = time.perf_counter()
        server.stop()
        assert time.perf_counter() - start < 1.0
    assert len(server.requests) == 2


def test_a_broken_behaviour_a_wrong_route_and_a_non_json_body_are_errors():
    def broken(body: dict, index: int) -> Reply:
        raise KeyError("oops")

    with FakeServer(broken) as server:
        with pytest.raises(openai.InternalServerError, match="oops"):
            ask(client(server))
        for path, data in [("/models", None), ("/chat/completions", b"{")]:
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(urllib.request.Request(server.base_url + path, data=data))
            assert caught.value.code == (404 if data is None else 400)
            assert "error" in json.loads(caught.value.read())
    assert len(server.requests) == 1
