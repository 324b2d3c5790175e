"""Tests of where a key may go (``misalign.llm.hosts``): the rules over a grid of URLs, and
the real command refusing, before any connection, a configuration that would send an
environment variable to a host the user did not allow."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest
import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from misalign.config import ConfigError
from misalign.llm.fake_server import FakeServer, affine
from misalign.llm.hosts import ENV, allowed_hosts, check_destination, is_loopback


def refused(base_url, key_env="TOKEN", allowed=frozenset()) -> str | None:
    try:
        check_destination("agents.A", base_url, key_env, frozenset(allowed))
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    ("base_url", "key_env", "allowed", "verdict"),
    [
        (None, "OPENAI_API_KEY", (), None),  # OpenAI's API, the default
        ("https://api.openai.com/v1", "OPENAI_API_KEY", (), None),
        (None, "AWS_SECRET_ACCESS_KEY", (), "(only $OPENAI_API_KEY goes there unasked)"),
        ("https://api.openai.com/v1", "GITHUB_TOKEN", ("api.openai.com",), None),
        ("http://api.openai.com/v1", "OPENAI_API_KEY", ("api.openai.com",), "plain http://"),
        ("https://api.openai.com.evil.test/v1", "OPENAI_API_KEY", (), "go to api.openai.com.e"),
        ("https://evil.test/v1", "OPENAI_API_KEY", (), "--allow-host evil.test"),
        ("https://evil.test/v1", "TOKEN", ("evil.test",), None),
        ("https://EVIL.test:8443/v1", "TOKEN", ("evil.test:8443",), None),
        ("https://evil.test:8443/v1", "TOKEN", ("evil.test:9999",), "(not allowed)"),
        ("http://evil.test/v1", "TOKEN", ("evil.test",), "over plain http://"),
        ("http://10.0.0.1:8080/v1", "TOKEN", ("10.0.0.1",), "over plain http://"),
        ("http://127.0.0.1:8080/v1", "TOKEN", (), "--allow-host 127.0.0.1"),
        ("http://127.0.0.1:8080/v1", "TOKEN", ("127.0.0.1",), None),
        ("http://127.8.9.10/v1", "TOKEN", ("127.8.9.10",), None),
        ("http://localhost:8080/v1", "TOKEN", ("localhost",), None),
        ("http://[::1]:8080/v1", "TOKEN", ("::1",), None),
        ("http://127.0.0.1.evil.test/v1", "TOKEN", ("127.0.0.1",), "over plain http://"),
        ("ftp://127.0.0.1/v1", "TOKEN", ("127.0.0.1",), "not an http:// or https:// URL"),
        ("not a url", "TOKEN", (), "not an http:// or https:// URL"),
        ("http://127.0.0.1:port/v1", "TOKEN", (), "not a URL"),
    ],
)
def test_where_a_key_may_go(base_url, key_env, allowed, verdict):
    message = refused(base_url, key_env, allowed)
    if verdict is None:
        assert message is None
    else:
        assert message is not None and verdict in message and "\n" not in message


@given(
    host=st.sampled_from(["127.0.0.1", "localhost", "evil.test", "api.openai.com", "10.1.2.3"]),
    scheme=st.sampled_from(["http", "https"]),
    key_env=st.sampled_from(["OPENAI_API_KEY", "GITHUB_TOKEN"]),
    allow=st.booleans(),
)
def test_without_a_key_nothing_is_refused_and_with_one_only_what_the_rules_allow(
    host, scheme, key_env, allow
):
    url = f"{scheme}://{host}/v1"
    allowed = {host} if allow else set()
    assert refused(url, key_env="", allowed=allowed) is None
    openai = host == "api.openai.com" and scheme == "https" and key_env == "OPENAI_API_KEY"
    may = (scheme == "https" or is_loopback(host)) and (allow or openai)
    assert (refused(url, key_env, allowed) is None) == may


def test_allowed_hosts_come_from_flags_and_the_environment(monkeypatch):
    monkeypatch.setenv(ENV, " Models.Example.org, ,127.0.0.1:8080")
    assert allowed_hosts(["Other.test"]) == {"other.test", "models.example.org", "127.0.0.1:8080"}
    monkeypatch.delenv(ENV)
    assert allowed_hosts() == frozenset()


class Listener:
    """A loopback socket that counts the connections made to it (and answers none)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.socket.close()


def run(tmp_path, base_url: str, key_env: str, *flags: str, env: dict | None = None):
    agent = {"kind": "llm", "model": "fake", "base_url": base_url, "api_key_env": key_env}
    agent |= {"n": 3, "max_retries": 0, "timeout_s": 5.0}
    config = tmp_path / "play.toml"
    config.write_text(tomli_w.dumps({"d": 2, "rounds": 3, "agents": {"A": agent, "B": {"n": 4}}}))
    return subprocess.run(
        [sys.executable, "-m", "misalign.cli", "run", str(config), "--store", "s.sqlite"]
        + ["--out", "out", *flags],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env=env,
    )


@pytest.fixture
def secret_env(monkeypatch):
    """A token in the environment, as GITHUB_TOKEN would be, and no hosts allowed."""
    token = f"ghp_{uuid.uuid4().hex}"
    monkeypatch.setenv("MISALIGN_TEST_TOKEN", token)
    monkeypatch.delenv(ENV, raising=False)
    return token


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/v1",
        "http://localhost:{port}/v1",
        "http://127.0.0.1:{port}/v1?x=1",
        "https://127.0.0.1:{port}/v1",
    ],
)
def test_a_configuration_cannot_send_a_variable_to_a_host_not_allowed(
    tmp_path, secret_env, template
):
    """Through the real command: one line naming the host and how to allow it, exit 2, and
    not one connection made, nothing written."""
    listener = Listener()
    try:
        done = run(tmp_path, template.format(port=listener.port), "MISALIGN_TEST_TOKEN")
    finally:
        listener.close()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("misalign: error: agents.A.base_url: the key in $MISALIGN_TEST")
    assert "--allow-host" in lines[0] and secret_env not in done.stderr + done.stdout
    assert listener.connections == 0
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("base_url", "flags"),
    [
        ("http://evil.invalid/v1", ("--allow-host", "evil.invalid")),
        ("https://evil.invalid/v1", ()),
        ("https://evil.invalid/v1", ("--allow-host", "other.invalid")),
        ("https://api.openai.com.evil.invalid/v1", ()),
        ("http://api.openai.com/v1", ()),
    ],
)
def test_remote_hosts_are_refused_before_any_lookup(tmp_path, secret_env, base_url, flags):
    done = run(tmp_path, base_url, "MISALIGN_TEST_TOKEN", *flags)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("misalign: error: agents.A.base_url: the key in $MISALIGN_TEST")


@pytest.fixture
def server():
    with FakeServer(affine(0.5 * np.eye(2), np.ones(2))) as fake:
        yield fake


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_allowed_host_gets_the_key(tmp_path, secret_env, server, how):
    import os

    env = dict(os.environ)
    flags = ("--allow-host", "127.0.0.1") if how == "flag" else ()
    if how == "environment":
        env[ENV] = "other.test,127.0.0.1"
    done = run(tmp_path, server.base_url, "MISALIGN_TEST_TOKEN", *flags, env=env)
    assert done.returncode == 0, done.stderr
    assert server.headers and all(
        h["authorization"] == f"Bearer {secret_env}" for h in server.headers
    )


def test_a_keyless_loopback_server_needs_nothing(tmp_path, secret_env, server):
    done = run(tmp_path, server.base_url, "")
    assert done.returncode == 0, done.stderr
    assert server.requests and all(secret_env not in str(h) for h in server.headers)


def test_a_replay_sends_nothing_and_needs_no_permission(tmp_path, secret_env, server):
    import os

    env = dict(os.environ) | {ENV: "127.0.0.1"}
    assert run(tmp_path, server.base_url, "MISALIGN_TEST_TOKEN", env=env).returncode == 0
    asked = len(server.requests)
    done = run(tmp_path, server.base_url, "MISALIGN_TEST_TOKEN", "--replay")
    assert done.returncode == 0, done.stderr
    assert len(server.requests) == asked


def test_the_sdks_ambient_headers_go_to_openai_only(tmp_path, secret_env, server, monkeypatch):
    """OPENAI_ORG_ID, OPENAI_PROJECT_ID and OPENAI_CUSTOM_HEADERS, which the SDK sends on its
    own, never reach another host (here a keyless loopback server)."""
    monkeypatch.setenv("OPENAI_ORG_ID", "org-secret-organisation")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-secret-project")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", f"X-Secret: {secret_env}\nX-Other: 1")
    done = run(tmp_path, server.base_url, "")
    assert done.returncode == 0, done.stderr
    sent = " ".join(f"{k}: {v}" for h in server.headers for k, v in h.items())
    assert server.headers and "secret" not in sent.lower() and "x-other" not in sent.lower()
