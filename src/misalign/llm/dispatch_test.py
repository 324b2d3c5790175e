"""Tests of the front of the local model's server (``misalign.llm.dispatch``), with fake
OpenAI servers on 127.0.0.1 as its workers."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from openai import OpenAI

from misalign.llm.dispatch import Dispatcher, stamp, stamp_event
from misalign.llm.fake_server import FakeServer, affine, status

GOOD = affine(np.eye(2), np.zeros(2))
BUILD = "llama-cpp-python 0.0; model.gguf sha256:0123456789ab"
ASK = {"model": "local", "messages": [{"role": "user", "content": "w = [1, 2]"}]}


def post(port: int, body: dict | bytes, path: str = "/v1/chat/completions", **headers):
    """``(status, headers, body)`` of one POST to ``127.0.0.1:port``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, data, {"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_stamp_sets_the_build_in_completions_only():
    completion = {"id": "x", "object": "chat.completion", "choices": []}
    stamped = json.loads(stamp(json.dumps(completion).encode(), BUILD))
    assert stamped == completion | {"system_fingerprint": BUILD}
    text = {"object": "text_completion", "system_fingerprint": "theirs"}
    assert json.loads(stamp(json.dumps(text).encode(), BUILD))["system_fingerprint"] == BUILD
    for other in (b"not json", b"[1, 2]", b'{"object": "list", "data": []}', b'{"error": {}}'):
        assert stamp(other, BUILD) is other


def test_stamp_event_stamps_data_lines_only():
    chunk = b'data: {"object": "chat.completion.chunk", "choices": []}\r\n'
    stamped = stamp_event(chunk, BUILD)
    assert stamped.startswith(b"data: {") and stamped.endswith(b"}\r\n")
    assert json.loads(stamped[6:])["system_fingerprint"] == BUILD
    for line in (b"data: [DONE]\r\n", b"\r\n", b": ping\r\n", b"event: error\r\n"):
        assert stamp_event(line, BUILD) is line


def test_a_dispatcher_needs_a_worker():
    with pytest.raises(ValueError, match="at least one worker"):
        Dispatcher([], BUILD)


def test_each_request_goes_to_an_idle_worker_whole():
    """Six requests at once to two workers that take 0.3 s each: each worker gets three, one
    after the other (never two at once), and all six are answered in about three latencies."""
    arrivals: dict[int, list[float]] = {0: [], 1: []}

    def timed(worker: int):
        def behaviour(body, index):
            arrivals[worker].append(time.monotonic())
            return GOOD(body, index)

        return behaviour

    a, b = FakeServer(timed(0), latency=0.3), FakeServer(timed(1), latency=0.3)
    with a, b, Dispatcher([a.port, b.port], BUILD) as front:
        began = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: post(front.port, ASK), range(6)))
        wall = time.monotonic() - began
    assert [code for code, _, _ in answers] == [200] * 6
    assert [len(a.requests), len(b.requests)] == [3, 3]
    for times in arrivals.values():
        assert min(np.diff(times)) >= 0.29, times  # the next only after the answer before
    assert 0.89 < wall < 1.8
    body = json.loads(answers[0][2])
    assert body["system_fingerprint"] == BUILD
    assert json.loads(body["choices"][0]["message"]["content"]) == {"estimate": [1.0, 2.0]}


def asking(content: str) -> dict:
    return {"model": "local", "messages": [{"role": "user", "content": content}]}


def slow_give(monkeypatch, seconds: float, times: int | None = None) -> None:
    """Make ``Dispatcher.give`` take ``seconds`` before the worker is idle again (the first
    ``times`` calls; every call when ``None``); 0: leave it as it is."""
    if seconds == 0:
        return
    give, calls = Dispatcher.give, []

    def slow(self, port: int) -> None:
        calls.append(port)
        if times is None or len(calls) <= times:
            time.sleep(seconds)
        give(self, port)

    monkeypatch.setattr(Dispatcher, "give", slow)


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_an_idle_worker_whose_last_prompt_began_alike_is_taken(monkeypatch, delay):
    """Two prompts at once go to both workers; then each prompt, sent alone, goes back to
    the worker that answered it (its cached prompt), and prompts one at a time that share
    neither stay with the worker that answered last. With a slow ``give`` (a loaded
    machine): the worker is given back before its client has the answer, so a client asking
    again at once still finds it idle."""
    slow_give(monkeypatch, delay)
    a, b = FakeServer(GOOD, latency=0.3), FakeServer(GOOD, latency=0.3)
    first, second = asking("w = [1, 2], first"), asking("w = [1, 2], second")
    with a, b, Dispatcher([a.port, b.port], BUILD) as front:
        with ThreadPoolExecutor(2) as pool:
            codes = pool.map(lambda ask: post(front.port, ask)[0], [first, second])
        assert list(codes) == [200] * 2
        had = {0: a.requests[0], 1: b.requests[0]}
        for ask in (second, first, second, first):
            assert post(front.port, ask)[0] == 200
        others = [asking(f"other {i}: w = [3, 4]") for i in range(3)]
        for ask in others:
            assert post(front.port, ask)[0] == 200
    assert a.requests[1:3] == [had[0]] * 2 and b.requests[1:3] == [had[1]] * 2
    assert others in (a.requests[3:], b.requests[3:])


def test_the_openai_sdk_reads_the_build_through_the_front():
    with FakeServer(GOOD) as worker, Dispatcher([worker.port], BUILD) as front:
        client = OpenAI(base_url=front.base_url, api_key="none", max_retries=0, timeout=10)
        completion = client.chat.completions.create(**ASK)
        client.close()
    assert completion.system_fingerprint == BUILD
    assert worker.requests == [ASK]


def test_errors_and_other_routes_pass_through_as_they_are():
    with FakeServer(status(429, retry_after=3)) as worker, Dispatcher([worker.port], BUILD) as f:
        code, headers, body = post(f.port, ASK)
        assert code == 429 and headers["Retry-After"] == "3"
        assert "system_fingerprint" not in json.loads(body)
        connection = http.client.HTTPConnection("127.0.0.1", f.port, timeout=10)
        connection.request("GET", "/v1/models")
        response = connection.getresponse()
        assert response.status == 404 and b"no route GET /v1/models" in response.read()
        connection.close()


def test_a_chunked_request_is_sent_on_whole():
    with FakeServer(GOOD) as worker, Dispatcher([worker.port], BUILD) as front:
        connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
        halves = [json.dumps(ASK)[:20].encode(), json.dumps(ASK)[20:].encode()]
        connection.request("POST", "/v1/chat/completions", iter(halves))
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["system_fingerprint"]
        connection.close()
    assert worker.requests == [ASK]


def test_an_unreadable_length_is_a_400():
    with FakeServer(GOOD) as worker, Dispatcher([worker.port], BUILD) as front:
        code, _, body = post(front.port, b"{}", **{"Content-Length": "many"})
        assert code == 400 and b"unreadable" in body
    assert worker.requests == []


def test_a_worker_that_is_gone_is_a_502_and_is_not_lost():
    """A worker that cannot be reached: each request gets a 502 with an OpenAI-style error
    body (retried by a client), and the worker is given back (the next request does not
    wait for ever)."""
    with FakeServer(GOOD) as gone:
        port = gone.port
    with Dispatcher([port], BUILD) as front:
        for _ in range(2):
            code, _, body = post(front.port, ASK)
            assert code == 502
            assert json.loads(body)["error"]["message"].startswith(f"worker on port {port} failed")


@contextlib.contextmanager
def streaming_worker():
    """A worker answering every POST with a server-sent event stream of two chunks and
    ``[DONE]`` (close-delimited, as HTTP/1.0 allows)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for text in ("Hel", "lo"):
                delta = {"delta": {"content": text}}
                chunk = {"object": "chat.completion.chunk", "choices": [delta]}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\r\n\r\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_stream_is_relayed_chunk_by_chunk_and_stamped():
    with streaming_worker() as port, Dispatcher([port], BUILD) as front:
        client = OpenAI(base_url=front.base_url, api_key="none", max_retries=0, timeout=10)
        chunks = list(client.chat.completions.create(**ASK, stream=True))
        client.close()
    assert "".join(c.choices[0].delta.content for c in chunks) == "Hello"
    assert {c.system_fingerprint for c in chunks} == {BUILD}


def test_a_streamed_answer_gives_its_worker_back_before_its_last_chunk(monkeypatch):
    """A client asking again as soon as it has read a stream to its end (the terminating
    chunk) finds the worker idle: it was given back before that chunk, so a slow ``give``
    delays the first answer, not the second request."""
    slow_give(monkeypatch, 1.0, times=1)
    with streaming_worker() as port, Dispatcher([port], BUILD) as front:
        code, _, first = post(front.port, {**ASK, "stream": True})
        began = time.monotonic()
        again, _, second = post(front.port, {**ASK, "stream": True})
        waited = time.monotonic() - began
    assert code == again == 200 and first == second and b"[DONE]" in second
    assert waited < 0.9


def test_stop_answers_the_waiting_requests_and_closes():
    """Stopping while one request is at the worker and another waits for it: the waiting one
    gets a 503 or a closed connection, never a hang; stopping again does nothing."""
    with FakeServer(GOOD, latency=1.0) as worker:
        front = Dispatcher([worker.port], BUILD).start()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, front.port, ASK)
            time.sleep(0.3)
            second = pool.submit(post, front.port, ASK)
            time.sleep(0.3)
            began = time.monotonic()
            front.stop()
            front.stop()
            outcomes = []
            for future in (first, second):
                try:
                    outcomes.append(future.result(timeout=10)[0])
                except (OSError, http.client.HTTPException):
                    outcomes.append("closed")
        assert time.monotonic() - began < 5
    assert outcomes[1] in (503, "closed") and len(worker.requests) == 1
