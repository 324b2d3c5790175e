"""Tests of the agents' message templates (``misalign.llm.template``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from misalign.config import ConfigError, LLMAgentConfig
from misalign.llm.agent import LLMAgent, Session
from misalign.llm.template import Templates
from misalign.prompt import Prompt

X = np.array([[0.1, 1 / 3], [-2.5e-7, 12345.678901234567], [np.pi, -np.e]])
Y = np.array([1 / 7, -0.0, 6.02214076e23])
W = np.array([np.sqrt(2), -1e-300])


def config(**settings) -> LLMAgentConfig:
    return LLMAgentConfig(kind="llm", model="fake", n=3, api_key_env="", **settings)


def render(templates: Templates, estimate=W, round: int = 5) -> list[dict]:
    return templates.messages("A", X, Y, estimate, 0.5, round)


def arrays(text: str) -> list[list[float]]:
    """Every JSON array of numbers in the text, in order."""
    found = []
    for candidate in re.findall(r"\[[^\[\]]*\]", text):
        with contextlib.suppress(json.JSONDecodeError):  # '[2 numbers]'
            found.append(json.loads(candidate))
    return found


@pytest.mark.parametrize("protocol", ["gd-step", "improve"])
def test_defaults_write_every_number_exactly(protocol):
    system, user = render(Templates.load(config(protocol=protocol), "agents.A"))
    assert system["role"] == "system" and "agent A" in system["content"]
    assert user["role"] == "user"
    found = arrays(user["content"])
    examples = [a for a in found if len(a) == 2][: len(X)]
    assert examples == X.tolist()  # floats read back bit for bit
    assert found[len(X)] == W.tolist()  # the estimate follows the examples
    ys = [float(v) for v in re.findall(r", y = (\S+)", user["content"])]
    assert [repr(v) for v in ys] == [repr(v) for v in Y.tolist()]  # -0.0 included
    assert f"d = {X.shape[1]}" in user["content"]


def test_gd_step_states_eta_and_n():
    user = render(Templates.load(config(), "agents.A"))[1]["content"]
    assert "eta = 0.5" in user and "n = 3" in user


def test_digits_round_to_significant_digits():
    user = render(Templates.load(config(digits=3), "agents.A"))[1]["content"]
    found = arrays(user)
    assert found[0] == [0.1, 0.333]
    assert found[1] == [-2.5e-7, 12300.0]
    assert found[3] == [1.41, -1e-300]
    assert "y = 0.143" in user and "y = 6.02e+23" in user


def write(tmp_path, text: str, name: str = "user.j2") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_custom_template_and_an_empty_system_message(tmp_path):
    user = write(tmp_path, "r{{ round }} {{ name }} {{ estimate }} {{ n }}x{{ d }} {{ eta }}")
    system = write(tmp_path, "{# nothing #}\n", "system.j2")
    messages = render(Templates.load(config(prompt=user, system=system), "agents.A"))
    assert messages == [{"role": "user", "content": f"r5 A {W.tolist()} 3x2 0.5"}]


def test_jinja_globals_and_loops_are_allowed(tmp_path):
    user = write(tmp_path, "{% for i in range(d) %}{{ i }}{% endfor %} {{ estimate }}")
    assert render(Templates.load(config(prompt=user), "agents.A"))[1]["content"].startswith("01 ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Examples: {{ examples }}", r"agents\.A\.prompt: .* never uses 'estimate'"),
        ("{{ estimate }} {{ w_star }}", r"agents\.A\.prompt: .* uses 'w_star', which is not a"),
        ("{{ estimate }}\n{% if %}", r"agents\.A\.prompt: .* line 2: "),
        ("{{ estimate }}\n\n{% for x in examples %}", r"agents\.A\.prompt: .* line 3: "),
        ("{{ estimate }}\n{{ estimate | nosuchfilter }}", r"line 2: No filter named 'nosuch"),
        ("{{ estimate is nosuchtest }}", r"agents\.A\.prompt: .* line 1: No test named"),
    ],
)
def test_bad_templates_are_one_line_naming_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        Templates.load(config(prompt=write(tmp_path, text)), "agents.A")
    assert "\n" not in str(info.value)


def test_the_system_template_is_checked_but_needs_no_estimate(tmp_path):
    Templates.load(config(system=write(tmp_path, "You are {{ name }}.")), "agents.A")
    with pytest.raises(ConfigError, match=r"agents\.A\.system: .* uses 'secret'"):
        Templates.load(config(system=write(tmp_path, "{{ secret }}")), "agents.A")


def test_unreadable_templates(tmp_path):
    with pytest.raises(ConfigError, match=r"agents\.A\.prompt: cannot read .*missing\.j2"):
        Templates.load(config(prompt=str(tmp_path / "missing.j2")), "agents.A")
    with pytest.raises(ConfigError, match=r"agents\.A\.prompt: cannot read .*\(not a regular f"):
        Templates.load(config(prompt=str(tmp_path)), "agents.A")
    binary = tmp_path / "binary.j2"
    binary.write_bytes(b"\xff\xfe{{ estimate }}\x80")
    with pytest.raises(ConfigError, match=r"agents\.A\.prompt: cannot read .*not UTF-8"):
        Templates.load(config(prompt=str(binary)), "agents.A")


def prompts() -> list[Prompt]:
    return [Prompt(X, Y, np.zeros(2), np.eye(2))]


@pytest.mark.parametrize(
    "text",
    [
        "{{ examples[100].x }} {{ estimate }}",
        "{{ estimate }} {{ 1 // 0 }}",
        "{{ estimate }} {{ examples.nothing }}",
    ],
)
def test_a_template_that_fails_to_render_fails_at_setup(tmp_path, text):
    session = Session(str(tmp_path / "store.sqlite"))
    try:
        with pytest.raises(
            ConfigError, match=r"^agents\.A\.prompt: .*user\.j2 does not render"
        ) as e:
            LLMAgent("A", config(prompt=write(tmp_path, text)), prompts(), [0], session)
        assert "\n" not in str(e.value)
    finally:
        session.close()


# A template from someone else: the sandbox


SECRET = "sk-canary-7f3a9c1e55d04b2b"
"""A key-like value in the environment that no template may reach."""
REACH_OS = [  # each reaches the os module through a Jinja2 global or a value it is given
    "self._TemplateReference__context.cycler.__init__.__globals__.os",
    "cycler.__init__.__globals__.os",
    "joiner.__init__.__globals__.os",
    "namespace.__init__.__globals__.os",
    "self.__init__.__globals__.__builtins__.__import__('os')",
    "lipsum.__globals__.os",
    "examples[0].__class__.__init__.__globals__.__builtins__.__import__('os')",
    "(examples[0]|attr('__class__')).__init__.__globals__.__builtins__.__import__('os')",
]
PAYLOADS = [
    *(f"{{{{ {reach}.environ.MISALIGN_TEST_SECRET }}}}" for reach in REACH_OS),
    *(f"{{{{ {reach}.system('touch CANARY') }}}}" for reach in REACH_OS),
    "{{ estimate.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ '{0.__class__.__mro__}'.format(estimate) }}",
    "{{ examples[0].__class__.__init__.__globals__ }}",
    "{% for e in examples %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}",
    "{% set ns = namespace() %}{{ ns.__init__.__globals__ }}",
    "{{ estimate.append(1) or estimate }}",
    "{{ examples.pop() }}",
    "{{ (estimate|attr('__class__')).__base__.__subclasses__() }}",
    "{{ 'x' * 10**9 }}",
    "{{ 9 ** 99999999 }}",
    "{% for i in range(10) %}{{ 'y' * 200000 }}{% endfor %}",
    "{% include '/etc/passwd' %}",
    "{% import '/etc/passwd' as p %}",
    "{% from '/etc/passwd' import x %}",
    "{% extends '/etc/passwd' %}",
]


@pytest.mark.parametrize("payload", PAYLOADS[: len(REACH_OS)])
def test_the_payloads_are_real_outside_the_sandbox(monkeypatch, payload):
    """Each payload that reads the environment does so through a plain Jinja2 environment:
    what the sandbox refuses below is a working attack, not a typo."""
    import jinja2

    from misalign.llm.template import Example

    monkeypatch.setenv("MISALIGN_TEST_SECRET", SECRET)
    values = {"examples": [Example([0.0], 0.0)], "estimate": [0.0]}
    assert jinja2.Environment().from_string(payload).render(values) == SECRET


@pytest.fixture
def fake_server():
    from misalign.llm.fake_server import FakeServer, affine

    with FakeServer(affine(np.eye(2) * 0.5, np.zeros(2))) as server:
        yield server


@pytest.mark.parametrize("where", ["prompt", "system"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_hostile_template_is_one_line_and_nothing_runs(
    tmp_path, monkeypatch, fake_server, payload, where
):
    """Through the real command: a template that reaches for Python, the environment, other
    files or unbounded memory is one line naming it and exit 2, before any request; nothing
    runs (no CANARY file), the secret is in no output, no request and no stored answer."""
    import subprocess
    import sys

    import tomli_w

    monkeypatch.setenv("MISALIGN_TEST_SECRET", SECRET)
    text = payload if where == "system" else f"{payload} {{{{ estimate }}}}"
    template = write(tmp_path, text, "evil.j2")
    agent = {"kind": "llm", "model": "fake", "base_url": fake_server.base_url, "n": 2}
    agent |= {"api_key_env": "", where: template, "max_retries": 0}
    config = tmp_path / "play.toml"
    config.write_text(tomli_w.dumps({"d": 2, "rounds": 2, "agents": {"A": agent, "B": {"n": 3}}}))
    for flags in ([], ["--replay"]):
        done = subprocess.run(
            [sys.executable, "-m", "misalign.cli", "run", str(config), "--store", "s.sqlite"]
            + ["--out", "out", *flags],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"misalign: error: agents.A.{where}: {template}"), lines[0]
        assert SECRET not in done.stdout + done.stderr
    assert not (tmp_path / "CANARY").exists()
    assert fake_server.requests == []
    assert not (tmp_path / "out").exists()
    assert all(SECRET.encode() not in f.read_bytes() for f in tmp_path.rglob("*") if f.is_file())


def test_ordinary_templates_still_render_in_the_sandbox(tmp_path):
    text = (
        "{% set ns = namespace(total=0) %}{% for e in examples %}{% set ns.total = ns.total"
        " + e.y %}{{ loop.index }}: {{ e.x | join(', ') }}{{ joiner(';')() }}{% endfor %}"
        "{{ ns.total | round(2) }} {{ estimate | tojson }} {{ '%.3f' | format(eta) }}"
        " {{ name | upper }} {{ dict(a=1).a }} {{ range(3) | list }} {{ 2 ** 10 }} {{ 'ab' * 3 }}"
    )
    user = render(Templates.load(config(prompt=write(tmp_path, text)), "agents.A"))[1]["content"]
    assert user.startswith("1: 0.1, 0.3333333333333333") and "2: -2.5e-07, " in user
    assert user.endswith(f"{json.dumps(W.tolist())} 0.500 A 1 [0, 1, 2] 1024 ababab")


def _outside(tmp_path: Path, shared: Path, how: str) -> tuple[str, str]:
    """A template path a shared configuration in ``shared`` might name to read a file that is
    not its own; and what the refusal says."""
    secret = tmp_path / "home" / ".env"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text(f"TOKEN={SECRET} {{{{ estimate }}}}")
    if how == "environment":
        return "/proc/self/environ", "lies outside the configuration's folder"
    if how == "system file":
        return "/etc/hostname", "lies outside the configuration's folder"
    if how == "absolute":
        return str(secret), "lies outside the configuration's folder"
    if how == "up and out":
        return "../home/.env", "lies outside the configuration's folder"
    if how == "a link out":
        (shared / "link.j2").symlink_to(secret)
        return "link.j2", "lies outside the configuration's folder"
    if how == "fifo":
        os.mkfifo(shared / "pipe.j2")
        return "pipe.j2", "not a regular file"
    if how == "a directory":
        (shared / "dir.j2").mkdir()
        return "dir.j2", "not a regular file"
    if how == "2 MB":
        (shared / "big.j2").write_text("{{ estimate }}" + " " * 2_000_000)
        return "big.j2", "is larger than 1,000,000 bytes"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "environment",
        "system file",
        "absolute",
        "up and out",
        "a link out",
        "fifo",
        "a directory",
        "2 MB",
    ],
)
@pytest.mark.parametrize("where", ["prompt", "system"])
def test_a_configuration_reads_no_template_but_its_own(
    tmp_path, monkeypatch, fake_server, how, where
):
    """Through the real command, live and --replay: a template path that leads out of the
    configuration's folder (or is no regular file of at most 1 MB) is one line naming the
    field, exit 2, at once; nothing is sent, and the secret is nowhere."""
    import subprocess
    import sys

    import tomli_w

    monkeypatch.setenv("MISALIGN_TEST_SECRET", SECRET)
    shared = tmp_path / "shared"
    shared.mkdir()
    path, says = _outside(tmp_path, shared, how)
    agent = {"kind": "llm", "model": "fake", "base_url": fake_server.base_url, "n": 2}
    agent |= {"api_key_env": "", where: path, "max_retries": 0}
    config = shared / "play.toml"
    config.write_text(tomli_w.dumps({"d": 2, "rounds": 2, "agents": {"A": agent, "B": {"n": 3}}}))
    for flags in ([], ["--replay"]):
        done = subprocess.run(
            [sys.executable, "-m", "misalign.cli", "run", str(config), "--store", "s.sqlite"]
            + ["--out", "out", *flags],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith(f"misalign: error: agents.A.{where}: ") and says in lines[0]
        assert SECRET not in done.stdout + done.stderr
    assert fake_server.requests == []


def test_a_template_beside_the_configuration_is_read_from_its_folder(tmp_path, fake_server):
    """A relative template path is the configuration's folder's, wherever the command runs."""
    import subprocess
    import sys

    import tomli_w

    shared = tmp_path / "shared"
    (shared / "templates").mkdir(parents=True)
    (shared / "templates" / "mine.j2").write_text("mine: {{ estimate }}")
    agent = {"kind": "llm", "model": "fake", "base_url": fake_server.base_url, "n": 2}
    agent |= {"api_key_env": "", "prompt": "templates/mine.j2", "refits": 0}
    config = shared / "play.toml"
    config.write_text(tomli_w.dumps({"d": 2, "rounds": 2, "agents": {"A": agent, "B": {"n": 3}}}))
    done = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "run", str(config), "--store", "s.sqlite"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert fake_server.requests[0]["messages"][-1]["content"].startswith("mine: [")
