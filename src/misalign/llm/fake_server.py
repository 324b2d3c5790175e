"""An in-process fake OpenAI-compatible Chat Completions server for tests and benchmarks.

The server listens on loopback only (``127.0.0.1``) and answers
``POST /v1/chat/completions`` in the OpenAI format, so the official ``openai`` SDK
(``OpenAI(base_url=server.base_url)``) talks to it unchanged. What it answers is a
*behaviour*: a function from (request body, 0-based index of the request at the
server) to a :class:`Reply`. Stock behaviours:

- :func:`affine`: answers ``{"estimate": A w + c}`` (plus optional reproducible
  Gaussian noise), where ``w`` is the estimate in the first user message
  (:func:`estimate_of`); it can refuse ``json_schema`` response formats with a 500,
  as llama.cpp's server does;
- :func:`constant`: always the same text (prose, malformed JSON, NaN...);
- :func:`script`: the k-th request gets the k-th reply, the last one repeating;
- :func:`status`: an HTTP error with an OpenAI-style body and optional ``Retry-After``;
- :func:`hang`: never answers (until the server stops);
- :func:`reject_key`: a 400 ``unsupported_parameter`` error when the body carries a key.

Each request is served in its own daemon thread, so ``latency`` (slept per request)
overlaps across concurrent requests. Connections are HTTP/1.1 keep-alive, as httpx
expects. Only the standard library and numpy are used.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from misalign.llm.loopback import Handler, Loopback
from misalign.runtime.text import plural

CHAT_PATH = "/v1/chat/completions"
_ARRAY = re.compile(r"\[[^\[\]]*\]")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass
class Reply:
    """What the server sends for one request.

    Attributes:
        status: The HTTP status code.
        content: The assistant message's text (status 200, when ``body`` is None).
        headers: Extra response headers, e.g. ``{"Retry-After": "1"}``.
        body: The JSON body to send verbatim. None means the OpenAI completion
            carrying ``content`` for status 200, else an OpenAI-style error body
            ``{"error": {"message", "type", "param", "code"}}``.
        delay: Seconds to wait before answering (on top of the server's latency).
        hang: Never answer; the connection is held until the server stops, then closed.
    """

    status: int = 200
    content: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    delay: float = 0.0
    hang: bool = False


Behaviour = Callable[[dict[str, Any], int], Reply]
"""(request body, 0-based index of this request at the server) -> reply."""


def fingerprint(body: dict[str, Any]) -> str:
    """The canonical key of a request body, as counted by :meth:`FakeServer.count`.

    Args:
        body: A request body (JSON-serialisable).

    Returns:
        The sha256 hex digest of ``json.dumps(body, sort_keys=True)``.
    """
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def error_body(
    status: int, message: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An OpenAI-style error body.

    Args:
        status: The HTTP status code; it picks the error type.
        message: The message; a generic one if None.
        param: The offending parameter, if any.
        code: A machine-readable error code, if any.

    Returns:
        ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``.
    """
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message = message or f"fake server: HTTP {status}"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _text(content: Any) -> str:
    """The text of a message's content: a string, or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def estimate_of(body: dict[str, Any], d: int) -> np.ndarray:
    """The estimate ``w`` a request asks the agent to improve.

    It is the last JSON array of exactly ``d`` numbers in the first message with role
    ``"user"``; earlier such arrays there are in-context examples, and later user
    messages are correction requests, so both are ignored.

    Args:
        body: A Chat Completions request body.
        d: The dimension of the estimate.

    Returns:
        The estimate, a float array of shape ``(d,)``.

    Raises:
        ValueError: If there is no user message or it holds no array of ``d`` numbers.
    """
    messages = body.get("messages") or []
    user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is None:
        raise ValueError("no message with role 'user'")
    found = None
    for match in _ARRAY.finditer(_text(user.get("content"))):
        try:
            values = json.loads(match.group())
        except json.JSONDecodeError:
            continue
        if len(values) == d and all(_is_number(v) for v in values):
            found = values
    if found is None:
        raise ValueError(f"no array of {plural(d, 'number')} in the first user message")
    return np.asarray(found, dtype=float)


def affine(
    A: ArrayLike,
    c: ArrayLike,
    noise_std: float = 0.0,
    seed: int = 0,
    refuse_json_schema: bool = False,
) -> Behaviour:
    """An agent whose answer is an affine map of its incoming estimate.

    Args:
        A: The matrix, shape ``(m, d)``.
        c: The offset, shape ``(m,)``.
        noise_std: Standard deviation of Gaussian noise added to each answer. The noise
            is drawn from a generator seeded by ``seed`` and the request's
            :func:`fingerprint`: the same request gets the same answer, distinct
            requests (another ``seed`` key, another sample index in the prompt...)
            independent draws.
        seed: Seed of the noise.
        refuse_json_schema: Answer HTTP 500 to requests whose ``response_format`` type
            is ``"json_schema"`` (as llama.cpp's server does); ``json_object`` or no
            ``response_format`` are answered normally.

    Returns:
        A behaviour answering ``{"estimate": [...]}`` with ``A w + c`` (floats written
        at full precision), or a 400 error if the request holds no estimate.
    """
    A = np.atleast_2d(np.asarray(A, dtype=float))
    c = np.asarray(c, dtype=float).reshape(-1)
    if c.shape != (A.shape[0],):
        raise ValueError(f"c has shape {c.shape}, A has shape {A.shape}")

    def behaviour(body: dict[str, Any], index: int) -> Reply:
        kind = (body.get("response_format") or {}).get("type")
        if refuse_json_schema and kind == "json_schema":
            return Reply(500, body=error_body(500, "json_schema response_format is unsupported"))
        try:
            w = estimate_of(body, A.shape[1])
        except ValueError as error:
            return Reply(400, body=error_body(400, f"fake server: {error}"))
        answer = A @ w + c
        if noise_std > 0:
            rng = np.random.default_rng([seed, int(fingerprint(body), 16)])
            answer = answer + noise_std * rng.standard_normal(answer.shape)
        return Reply(content=json.dumps({"estimate": [float(v) for v in answer]}))

    return behaviour


def constant(text: str) -> Behaviour:
    """An agent that always answers the same text.

    Args:
        text: The assistant message's content, e.g. prose, malformed JSON, a wrong-length
            or NaN estimate (``'{"estimate": [NaN, 1]}'``).

    Returns:
        The behaviour.
    """
    return lambda body, index: Reply(content=text)


def script(*items: Reply | Behaviour) -> Behaviour:
    """A sequence of replies: the k-th request at the server gets the k-th item.

    Args:
        *items: Replies, or behaviours called with the request; the last item repeats.

    Returns:
        The behaviour.
    """
    if not items:
        raise ValueError("script needs at least one item")

    def behaviour(body: dict[str, Any], index: int) -> Reply:
        item = items[min(index, len(items) - 1)]
        return item if isinstance(item, Reply) else item(body, index)

    return behaviour


def status(code: int, retry_after: float | str | None = None) -> Behaviour:
    """An HTTP error with an OpenAI-style error body.

    Args:
        code: The status code (429, 500, 400...).
        retry_after: The ``Retry-After`` header's value in seconds, if any.

    Returns:
        The behaviour.
    """
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
    return lambda body, index: Reply(code, headers=dict(headers), body=error_body(code))


def hang() -> Behaviour:
    """An agent that never answers: each connection is held until the server stops.

    Returns:
        The behaviour.
    """
    return lambda body, index: Reply(hang=True)


def reject_key(key: str, otherwise: Behaviour) -> Behaviour:
    """A server that rejects a request parameter, as OpenAI does for unsupported ones.

    Args:
        key: The top-level request key to reject (e.g. ``"seed"``, ``"temperature"``).
        otherwise: The behaviour for requests without that key.

    Returns:
        A behaviour answering HTTP 400 with ``code`` ``"unsupported_parameter"`` and
        ``param`` ``key`` whenever the body holds ``key``.
    """
    message = f"Unsupported parameter: '{key}' is not supported with this model."
    rejection = error_body(400, message, param=key, code="unsupported_parameter")

    def behaviour(body: dict[str, Any], index: int) -> Reply:
        return Reply(400, body=rejection) if key in body else otherwise(body, index)

    return behaviour


def _completion(body: dict[str, Any], content: str | None, index: int) -> dict[str, Any]:
    """The OpenAI Chat Completions response carrying ``content``."""
    prompt = json.dumps(body.get("messages", []))
    prompt_tokens = len(prompt) // 4 + 1
    completion_tokens = len(content or "") // 4 + 1
    return {
        "id": f"chatcmpl-fake-{index}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class _Handler(Handler):
    """Serves one connection (HTTP/1.1 keep-alive) on behalf of a :class:`FakeServer`."""

    def do_GET(self) -> None:
        self.send(404, error_body(404, f"fake server: no route GET {self.path}"))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.split("?")[0] != CHAT_PATH:
            self.send(404, error_body(404, f"fake server: no route POST {self.path}"))
            return
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.send(400, error_body(400, "fake server: the body is not JSON"))
            return
        if not isinstance(body, dict):
            self.send(400, error_body(400, "fake server: the body is not a JSON object"))
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        fake = self.server.owner
        reply, index = fake._reply(body, headers)
        wait = None if reply.hang else fake.latency + reply.delay
        if (wait is None or wait > 0) and fake._stopping.wait(wait):
            self.close_connection = True  # stopped while waiting: drop the request
            return
        if reply.body is not None:
            payload = reply.body
        elif reply.status == 200:
            payload = _completion(body, reply.content, index)
        else:
            payload = error_body(reply.status)
        if self.send(reply.status, payload, reply.headers) and reply.status == 200:
            fake._answered(body)

    def send(
        self, code: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> bool:
        """Send a JSON response with a Content-Length (so the connection can be reused).

        Args:
            code: The HTTP status code.
            payload: The JSON body.
            headers: Extra headers.

        Returns:
            Whether the response was written (the client had not gone away).
        """
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client went away (e.g. it timed out)
            self.close_connection = True
            return False
        return True


class FakeServer(Loopback):
    """A fake OpenAI-compatible Chat Completions server on ``127.0.0.1``.

    Use it as a context manager (it starts on enter and stops on exit) or call
    :meth:`start` and :meth:`stop`. Point a client at :attr:`base_url`.

    Attributes:
        behaviour: What the server answers.
        latency: Seconds added to every answer (slept in the request's own thread, so
            concurrent requests overlap).
        port: The port; 0 picks a free one at start.
    """

    what = "the fake server"

    def __init__(self, behaviour: Behaviour, latency: float = 0.0, port: int = 0) -> None:
        """Create a server (not started).

        Args:
            behaviour: Maps (request body, 0-based request index) to a :class:`Reply`.
            latency: Seconds added to every answer.
            port: The port to listen on; 0 picks a free one.
        """
        super().__init__(_Handler, port)
        self.behaviour = behaviour
        self.latency = latency
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._answers: list[str] = []
        self._headers: list[dict[str, str]] = []
        self._stopping = threading.Event()

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request body received, in order of arrival (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def headers(self) -> list[dict[str, str]]:
        """Each request's headers, names lower-cased, in order of arrival (a copy)."""
        with self._lock:
            return list(self._headers)

    def count(self) -> collections.Counter[str]:
        """How many times each canonical request body arrived.

        Returns:
            A counter keyed by :func:`fingerprint` of the body.
        """
        with self._lock:
            return collections.Counter(fingerprint(body) for body in self._requests)

    def answered(self) -> collections.Counter[str]:
        """How many times each canonical request body was answered with a completion (what a
        paid API would charge for), keyed by :func:`fingerprint`."""
        with self._lock:
            return collections.Counter(self._answers)

    def _answered(self, body: dict[str, Any]) -> None:
        with self._lock:
            self._answers.append(fingerprint(body))

    def _starting(self) -> None:
        self._stopping.clear()

    def _releasing(self) -> None:
        """Release hanging and delayed requests."""
        self._stopping.set()

    def _reply(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[Reply, int]:
        """Record a request and ask the behaviour for its reply.

        Args:
            body: The request body.
            headers: The request headers.

        Returns:
            The reply (a 500 if the behaviour raised) and the request's index.
        """
        with self._lock:
            index = len(self._requests)
            self._requests.append(body)
            self._headers.append(headers)
        try:
            return self.behaviour(body, index), index
        except Exception as error:  # a broken behaviour shows up as a 500, not a hang
            message = f"fake server: behaviour raised {error!r}"
            return Reply(500, body=error_body(500, message)), index
