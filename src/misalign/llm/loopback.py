"""A loopback HTTP server in a daemon thread that closes its keep-alive connections when it
stops: the one mechanism under the fake OpenAI-compatible server of the tests
(``misalign.llm.fake_server``) and the front of ``misalign serve`` (``misalign.llm.dispatch``).
Only the standard library is used."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"


class Loopback:
    """A server on ``127.0.0.1`` serving ``handler`` in a daemon thread; ``stop`` also closes
    the connections clients hold open (HTTP/1.1 keep-alive), so no request outlives it.

    Subclasses name themselves in ``what`` and may release what their requests wait on in
    ``_releasing`` (called before the server shuts down).

    Args:
        handler: the request handler (a ``Handler``: it registers its connection).
        port: the port; 0 picks a free one, known after ``start``.
    """

    what = "the server"
    """How errors name the server."""

    def __init__(self, handler: type[Handler], port: int = 0) -> None:
        self.port = port
        self._handler = handler
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"http://{HOST}:{self.port}/v1"

    def start(self):
        """Listen on the port and serve in a daemon thread.

        Returns:
            The server itself.

        Raises:
            OSError: the port is taken.
        """
        if self._server is not None:
            raise RuntimeError(f"{self.what} is already running")
        self._starting()
        server = _Server((HOST, self.port), self._handler)
        server.owner = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, release what requests wait on, close every client connection
        (again: nothing)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._releasing()
        server.shutdown()
        server.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _starting(self) -> None:
        """Called by ``start`` before it listens."""

    def _releasing(self) -> None:
        """Called by ``stop`` before the server shuts down."""

    def _opened(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def _closed(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that knows the ``Loopback`` it serves for."""

    daemon_threads = True
    request_queue_size = 128
    owner: Any

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (its requests cancelled) is not an error worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    """Serves one connection (HTTP/1.1 keep-alive) for ``self.server.owner``, registered
    while open so that ``Loopback.stop`` can close it; no per-request log lines."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.owner._opened(self.connection)

    def finish(self) -> None:
        self.server.owner._closed(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines."""
