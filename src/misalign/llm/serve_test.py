"""Tests for misalign.llm.serve: the real local model behind its OpenAI-compatible server.

The ``local_llm`` tests need ``pip install '.[local]'``; without it they are skipped, and CI
installs it and runs them (``pytest -m local_llm``).
"""

import contextlib
import hashlib
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from misalign.config import ConfigError
from misalign.llm import serve
from misalign.llm.serve import LocalServer, check_installed, model_path
from misalign.runtime.reaper import descendants, same_process


def _missing() -> str | None:
    try:
        check_installed()
    except ConfigError as error:
        return str(error)
    return None


MISSING = _missing()
local_llm = pytest.mark.local_llm
needs_model = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

D = 3
SCHEMA = {
    "type": "object",
    "properties": {
        "estimate": {"type": "array", "items": {"type": "number"}, "minItems": D, "maxItems": D}
    },
    "required": ["estimate"],
}
MESSAGES = [
    {"role": "system", "content": "You answer with JSON only."},
    {
        "role": "user",
        "content": f'Estimate w, a list of {D} numbers. Answer as {{"estimate": [...]}}.',
    },
]


def test_a_missing_model_package_is_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"not installed: pip install '\.\[local\]'"):
        model_path()
    with pytest.raises(ConfigError, match=r"no llama_cpp, .*pip install '\.\[local\]'"):
        check_installed()


def test_base_url_needs_a_port() -> None:
    with pytest.raises(RuntimeError, match="not been started"):
        _ = LocalServer().base_url
    assert LocalServer(8123).base_url == "http://127.0.0.1:8123/v1"


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer() as running:
        yield running


def _client(server: LocalServer) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="local", max_retries=0, timeout=60)


def _ask(client: OpenAI, messages: list[dict[str, str]]) -> str:
    completion = client.chat.completions.create(
        model=serve.ALIAS,
        messages=messages,
        response_format={"type": "json_object", "schema": SCHEMA},
        temperature=0,
        max_tokens=200,
    )
    content = completion.choices[0].message.content
    assert content is not None
    return content


@local_llm
@needs_model
def test_json_object_with_schema_gives_d_finite_floats_reproducibly(server: LocalServer) -> None:
    """The same request gets the same answer: after another request that shares its prefix,
    and right after itself (which the server answers from its cached prefix)."""
    client = _client(server)
    other = [MESSAGES[0], {"role": "user", "content": "Estimate w: 3 numbers, as JSON."}]
    answers = [_ask(client, MESSAGES), _ask(client, other), *(_ask(client, MESSAGES) for _ in "ab")]
    assert answers[0] == answers[2] == answers[3], answers
    estimate = json.loads(answers[0])["estimate"]
    assert len(estimate) == D, answers[0]
    assert all(isinstance(x, int | float) and math.isfinite(x) for x in estimate), answers[0]


@local_llm
@needs_model
def test_a_json_schema_response_format_is_a_server_error(server: LocalServer) -> None:
    """The fact the agents' fallback chain relies on: this server answers
    ``{"type": "json_schema"}`` with HTTP 500, so a client falls back to ``json_object``."""
    with pytest.raises(openai.InternalServerError):
        _client(server).chat.completions.create(
            model=serve.ALIAS,
            messages=MESSAGES,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "estimate", "schema": SCHEMA, "strict": True},
            },
            temperature=0,
            max_tokens=200,
        )
    assert server.running()


@local_llm
@needs_model
def test_a_server_that_dies_while_starting_is_one_error_with_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    local = LocalServer(model=broken, workers=2)
    with pytest.raises(RuntimeError, match=r"\(worker [12] of 2\) exited with code") as caught:
        local.start()
    assert f"Failed to load model from file: {broken}" in str(caught.value)
    assert not local.running() and local.pids == []
    assert all(log.is_file() for log in local.logs)  # kept for the reader
    assert f"(log: {local.logs[0].parent}/worker-" in str(caught.value)
    shutil.rmtree(local.logs[0].parent)


@local_llm
@needs_model
def test_a_port_in_use_is_one_error_before_starting() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        local = LocalServer(port)
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is in use"):
            local.start()
        assert local.log_dir is None and local.pids == []


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _workers_of(pid: int) -> dict[int, str]:
    """The llama.cpp servers below process ``pid``, with their start times."""
    found = {}
    for child, start in descendants(pid).items():
        with contextlib.suppress(OSError):
            if b"llama_cpp.server" in Path(f"/proc/{child}/cmdline").read_bytes():
                found[child] = start
    return found


def _alive(processes: dict[int, str]) -> list[int]:
    return [pid for pid, start in processes.items() if same_process(pid, start)]


@contextlib.contextmanager
def _serving(workers: int) -> Iterator[tuple[subprocess.Popen, str]]:
    """``serve(None, workers)`` in a child process, once it printed its base_url; killed on
    leaving if it still runs (SIGTERM first, so that it stops its workers)."""
    code = f"from misalign.llm.serve import serve; serve(None, {workers})"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen([sys.executable, "-c", code], **pipes) as process:
        try:
            ready, _, _ = select.select([process.stdout], [], [], 90)
            assert ready, "serve() printed nothing within 90 s"
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            why = process.stderr.read() if not line and process.wait(30) is not None else ""
            assert line.startswith("base_url: http://127.0.0.1:"), f"{line!r} {why}"
            yield process, line.removeprefix("base_url: ")
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()


on_linux = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@local_llm
@needs_model
@on_linux
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_serve_prints_its_base_url_answers_and_stops_every_worker(stop) -> None:
    with _serving(2) as (process, base_url):
        workers = _workers_of(process.pid)
        assert len(workers) == 2 and not set(workers) & {process.pid}
        models = _get(f"{base_url}/models")
        assert [model["id"] for model in models["data"]] == [serve.ALIAS]
        process.send_signal(stop)
        assert process.wait(30) == 0, process.stderr.read() if process.stderr else ""
        with pytest.raises(urllib.error.URLError):
            _get(f"{base_url}/models")
        assert _alive(workers) == [] and descendants(process.pid) == {}


@local_llm
@needs_model
@on_linux
def test_a_killed_serve_leaves_no_worker() -> None:
    """SIGKILL gives serve() no chance to stop its workers: its watchdog ends them."""
    with _serving(2) as (process, _):
        time.sleep(1.0)  # the watchdog notes the workers every 0.5 s
        workers = _workers_of(process.pid)
        assert len(workers) == 2
        process.kill()
        process.wait()
        deadline = time.monotonic() + 15
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(workers) == []


@local_llm
@needs_model
@on_linux
def test_serve_fails_when_a_worker_dies_and_stops_the_others() -> None:
    with _serving(2) as (process, _):
        workers = _workers_of(process.pid)
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        assert process.wait(30) == 1
        assert process.stderr is not None
        error = process.stderr.read()
        assert "RuntimeError: the local model server on port " in error, error
        log = re.search(r"\(worker [12] of 2\) exited with code -9 \(log: (\S+)\)", error)
        assert log, error
        shutil.rmtree(Path(log.group(1)).parent)
        assert _alive(workers) == []


@local_llm
@needs_model
@on_linux
def test_stop_stops_every_worker() -> None:
    local = LocalServer(workers=3).start()
    try:
        workers = {pid: start for pid, start in descendants(os.getpid()).items()}
        workers = {pid: workers[pid] for pid in local.pids}
        assert len(workers) == 3 and len(_alive(workers)) == 3
        assert local.running() and local.log_dir is not None
        log_dir = local.log_dir
    finally:
        local.stop()
    assert _alive(workers) == [] and not local.running() and not log_dir.exists()
    local.stop()  # again: nothing


PROMPTS = [
    "Estimate w, a list of 3 numbers.",
    "Give three numbers near 1, as JSON.",
    "w = [0.5, -1.0, 2.0]. Estimate the next w.",
    "Estimate w: 3 numbers, as JSON.",
    "Answer with three small integers.",
    "What are three numbers that sum to zero?",
]


def _answers(local: LocalServer, at_once: int) -> list[tuple[str, str | None]]:
    """The text and ``system_fingerprint`` of each of ``PROMPTS``, ``at_once`` in flight."""
    client = _client(local)

    def ask(prompt: str) -> tuple[str, str | None]:
        completion = client.chat.completions.create(
            model=serve.ALIAS,
            messages=[MESSAGES[0], {"role": "user", "content": prompt}],
            response_format={"type": "json_object", "schema": SCHEMA},
            temperature=0,
            max_tokens=60,
        )
        return completion.choices[0].message.content or "", completion.system_fingerprint

    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(ask, PROMPTS))


@local_llm
@needs_model
def test_three_workers_at_once_answer_as_one_worker_does() -> None:
    """The same temperature-0 requests, answered one at a time by one worker and three at a
    time by three workers (each worker answers others before them, in another order): the
    same answers, each naming the server's build."""
    with LocalServer() as one:
        alone = _answers(one, 1)
    with LocalServer(workers=3) as three:
        together = _answers(three, 3)
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert {build for _, build in alone + together} == {one.fingerprint} == {three.fingerprint}
    assert len({text for text, _ in alone}) > 1  # the prompts get different answers


def test_more_workers_than_memory_holds_are_refused_before_starting(monkeypatch) -> None:
    monkeypatch.setattr(serve, "available_memory", lambda: 2**30)
    monkeypatch.setattr(serve, "check_installed", lambda: pytest.fail("checked the install"))
    local = LocalServer(workers=4)
    with pytest.raises(ConfigError, match=r"^--workers 4: needs about 1\.1 GiB") as caught:
        local.start()
    assert "(240 MiB per worker and 130 MiB shared), but 1.0 GiB is available" in str(caught.value)
    assert local.pids == [] and local.log_dir is None
    serve.check_memory(3)  # 850 MiB fits


def test_at_least_one_worker() -> None:
    with pytest.raises(ConfigError, match="--workers 0: at least 1"):
        LocalServer(workers=0)


def test_the_build_names_the_package_the_model_file_and_the_settings(tmp_path) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:12]
    built = serve.build(model, batch=4)
    assert built.startswith("llama-cpp-python ")
    assert built.endswith(f"; tiny.gguf sha256:{digest}; threads 1, batch 4, seed 0")


EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "local_llm.toml"


def _play(out: Path, store: Path, *extra: str) -> dict:
    """``misalign run examples/local_llm.toml`` as a real process, shortened, ``--json``."""
    short = ["--set", "rounds=5", "--set", "agents.A.probes=3", "--set", "agents.A.refits=1"]
    result = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "run", str(EXAMPLE), "--json"]
        + ["--out", str(out), "--store", str(store), *short, *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@local_llm
@needs_model
def test_a_play_against_the_real_model_fits_it_and_replays_offline(tmp_path: Path) -> None:
    """The whole path end to end against the real local model: a short play of
    examples/local_llm.toml (the json_schema refusal and the fallback to json_object, the
    answers parsed, the map fitted globally and locally, the report), then a replay with the
    server gone that sends no request and gives identical outputs and fits."""
    store = tmp_path / "llm.sqlite"
    with LocalServer(workers=2) as local:
        live = _play(tmp_path / "live", store, "--set", f"agents.A.base_url='{local.base_url}'")
    with contextlib.closing(sqlite3.connect(store)) as db:
        builds = {build for (build,) in db.execute("SELECT fingerprint FROM answers")}
    assert builds == {local.fingerprint}  # every answer names the server's build
    assert live["llm"]["requests"] > 0 and live["llm"]["format"]["A"] == "json_object"
    assert live["llm"]["retries"].get("format") == 1 and not live["llm"]["failed"]
    fit = live["fit"]["A"]
    assert fit["global"]["probes"] == 3 and math.isfinite(fit["global"]["r2"])
    assert len(fit["global"]["A"]) == 2 and len(fit["global"]["c"]) == 2
    assert len(live["outputs"]["A"]) == 5
    replay = _play(tmp_path / "replay", store, "--replay")  # the server is stopped now
    assert replay["llm"]["requests"] == 0 and replay["llm"]["cached"] > 0
    assert replay["outputs"] == live["outputs"]
    assert replay["fit"] == live["fit"] and replay["prediction"] == live["prediction"]
