"""The front of the local model's server: one loopback port, several workers behind it.

``llama-cpp-python``'s server answers one request at a time (a lock around its one model), so
answers in parallel take several server processes (workers), each on its own loopback port.
The ``Dispatcher`` listens on ``127.0.0.1:PORT`` and hands each request to an idle worker,
whole: requests wait, in order of arrival, while every worker is busy, and a worker gets its
next request only once it has answered the one before. Of the idle workers it takes the one
whose last request began like this one (a worker evaluates only the part of a prompt it has
not cached, one token at a time), and else the one that answered last.
It returns the worker's answer with ``system_fingerprint`` set, in every completion and every
streamed chunk, to the server's build (``misalign.llm.serve.build``), which the client stores
beside each answer.

Only the standard library: one thread per client connection (HTTP/1.1 keep-alive), one new
connection to the worker per request. A worker that cannot be reached is a 502 with an
OpenAI-style error body (a client retries a 5xx).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import threading
from collections.abc import Callable

from misalign.llm.loopback import HOST, Handler, Loopback

STAMPED = {"chat.completion", "chat.completion.chunk", "text_completion"}
"""The ``object`` of the responses that get a ``system_fingerprint``."""
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
}
"""Headers that belong to one connection, not to the request or answer (and the length, which
the front sets itself)."""


def stamp(data: bytes, fingerprint: str) -> bytes:
    """A JSON completion (or chunk) with ``system_fingerprint`` set; anything else as it is.

    Args:
        data: a response body.
        fingerprint: the server's build.

    Returns:
        The body, re-encoded as compact JSON when it is a completion.
    """
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        return data
    if not isinstance(body, dict) or body.get("object") not in STAMPED:
        return data
    body["system_fingerprint"] = fingerprint
    return json.dumps(body, separators=(",", ":")).encode()


def stamp_event(line: bytes, fingerprint: str) -> bytes:
    """One line of a server-sent event stream, with the completion chunk of a ``data:`` line
    stamped (``stamp``); other lines (``data: [DONE]``, blank lines) as they are."""
    if not line.startswith(b"data:"):
        return line
    payload = line[5:].strip()
    ending = line[len(line.rstrip(b"\r\n")) :]
    stamped = stamp(payload, fingerprint)
    return line if stamped is payload else b"data: " + stamped + ending


def _shared(a: bytes, b: bytes) -> int:
    """How many bytes ``a`` and ``b`` share at their beginning."""
    return len(os.path.commonprefix([a, b]))


def _dechunked(stream) -> bytes:
    """A chunked request body read whole (its trailers read and dropped)."""
    parts = []
    while size := int(stream.readline().split(b";")[0].strip() or b"0", 16):
        parts.append(stream.read(size))
        stream.readline()
    while stream.readline().strip():
        pass
    return b"".join(parts)


def error_body(status: int, message: str) -> bytes:
    """An OpenAI-style error body."""
    error = {"message": message, "type": "server_error", "param": None, "code": status}
    return json.dumps({"error": error}).encode()


class Dispatcher(Loopback):
    """The front: a loopback HTTP server handing each request to an idle worker.

    Args:
        workers: the workers' ports on ``127.0.0.1``.
        fingerprint: the ``system_fingerprint`` set in every completion.
        port: the front's port (0: a free one, known after ``start``).
    """

    what = "the dispatcher"

    def __init__(self, workers: list[int], fingerprint: str, port: int = 0) -> None:
        if not workers:
            raise ValueError("a dispatcher needs at least one worker")
        super().__init__(_Handler, port)
        self.workers = list(workers)
        self.fingerprint = fingerprint
        self._idle = list(self.workers)
        """The idle workers, the one given back last (whose answer was read last) at the
        end."""
        self._last: dict[int, bytes] = {}
        """The body of the request each worker answered last."""
        self._changed = threading.Condition()
        self._stopping = False

    def _releasing(self) -> None:
        """Release the requests waiting for a worker (each gets a 503)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def take(self, body: bytes = b"") -> int | None:
        """An idle worker's port for a request, waiting while all are busy (the longest
        waiting request is served first); ``None`` once the dispatcher stops.

        Of the idle workers, the one whose last request shares the longest beginning with
        ``body`` (the longest prompt it has cached, which it need not evaluate again), then
        the one given back last.
        """
        with self._changed:
            while not self._idle and not self._stopping:
                self._changed.wait()
            if self._stopping:
                return None
            ranked = enumerate(self._idle)
            index, port = max(
                ranked, key=lambda p: (_shared(self._last.get(p[1], b""), body), p[0])
            )
            del self._idle[index]
            self._last[port] = body
            return port

    def give(self, port: int) -> None:
        """Give back a worker that has answered."""
        with self._changed:
            self._idle.append(port)
            self._changed.notify()


class _Handler(Handler):
    """Serves one client connection (HTTP/1.1 keep-alive), forwarding each request."""

    def do_GET(self) -> None:
        self.forward()

    def do_POST(self) -> None:
        self.forward()

    def forward(self) -> None:
        """Read the request, wait for an idle worker, send it there, relay the answer."""
        self._started = False
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                body = _dechunked(self.rfile)
            else:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
        except ValueError:
            self.close_connection = True
            self.reply(400, error_body(400, "the request's length or chunks are unreadable"))
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        dispatcher = self.server.owner
        port = dispatcher.take(body or b"")
        if port is None:
            self.close_connection = True
            self.reply(503, error_body(503, "the local model server is stopping"))
            return
        worker = http.client.HTTPConnection(HOST, port)
        given = False

        def give_back() -> None:
            nonlocal given
            if not given:
                given = True
                try:
                    worker.close()
                finally:
                    dispatcher.give(port)

        try:
            worker.request(self.command, self.path, body, headers)
            self.relay(worker.getresponse(), dispatcher.fingerprint, give_back)
        except (OSError, http.client.HTTPException) as exc:
            self.close_connection = True
            if not self._started:
                message = f"worker on port {port} failed: {type(exc).__name__}: {exc}"
                with contextlib.suppress(OSError):
                    self.reply(502, error_body(502, message))
        finally:
            give_back()

    def relay(
        self,
        response: http.client.HTTPResponse,
        fingerprint: str,
        give_back: Callable[[], None],
    ) -> None:
        """Send the worker's answer on: a JSON body stamped whole, an event stream line by
        line as it comes (chunked), anything else as it is. ``give_back()`` once the answer is
        read whole, before the client has the last of it: a client that asks again as soon
        as it is answered finds that worker idle (and its prompt cached)."""
        kind = response.getheader("Content-Type", "")
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
        if kind.startswith("text/event-stream"):
            self._begin(response.status, headers + [("Transfer-Encoding", "chunked")])
            while line := response.readline():
                self._chunk(stamp_event(line, fingerprint))
            give_back()
            self._chunk(b"")
            return
        data = response.read()
        give_back()
        if kind.startswith("application/json"):
            data = stamp(data, fingerprint)
        self._begin(response.status, headers + [("Content-Length", str(len(data)))])
        self.wfile.write(data)
        self.wfile.flush()

    def reply(self, status: int, data: bytes) -> None:
        """Send a JSON answer of the front's own."""
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        self._begin(status, headers)
        self.wfile.write(data)
        self.wfile.flush()

    def _begin(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Send the status line and headers; after them, a failure can only hang up."""
        self._started = True
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        """One chunk of a chunked body (empty: the last)."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
