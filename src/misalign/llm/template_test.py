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
from misalign.llm.store import Store
from misalign.llm.template import Templates
from misalign.model.prompt import Prompt

X = np.array([[0.1, 1 / 3], [-2.5e-7, 12345.678901234567], [np.pi, -np.e]])
Y = np.array([1 / 7, -0.0, 6.02214076e23])
W = np.array([np.sqrt(2), -1e-300])


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Templates given as data are read from the working directory: the test's folder."""
    monkeypatch.chdir(tmp_path)


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
    with pytest.raises(ConfigError, match=r"agents\.A\.prompt: .* is a directory, not a regular"):
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


def _sample(values, *kept):
    """``values`` as test parameters, each marked ``slow`` but those ``kept``: every case
    runs the real command (a process or two, about a second each), so the default run keeps
    a few and ``pytest -m slow`` (CI) runs the rest."""
    return [v if v in kept else pytest.param(v, marks=pytest.mark.slow) for v in values]


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
@pytest.mark.parametrize(
    "payload",
    _sample(PAYLOADS, PAYLOADS[0], PAYLOADS[len(REACH_OS)], "{% include '/etc/passwd' %}"),
)
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
    Store(tmp_path / "s.sqlite").close()  # a store to replay (a run makes one lazily)
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


def test_the_default_templates_render_as_before():
    """The shipped templates write, bit for bit, what they wrote before the render was
    guarded (a SHA-256 of the messages of 12 requests, taken before the change)."""
    import hashlib

    rng = np.random.default_rng(0)
    out = []
    for protocol in ["gd-step", "improve"]:
        for digits in [None, 4]:
            for n, d in [(3, 2), (20, 5), (200, 10)]:
                agent = LLMAgentConfig(
                    kind="llm", model="m", n=n, api_key_env="", protocol=protocol, digits=digits
                )
                templates = Templates.load(agent, "agents.A")
                X, y, w = (
                    rng.standard_normal((n, d)),
                    rng.standard_normal(n),
                    rng.standard_normal(d),
                )
                out.append(templates.messages("A", X, y, w, 0.5, 3))
    digest = hashlib.sha256(json.dumps(out).encode()).hexdigest()
    assert digest == "e1f80fbbef21eba4c8deb2d94ac612ea89e72c7cb24f9d47d7f2a551ae1be836"


# A configuration from someone else: where its templates may lie


PEAK = """
import atexit, pathlib, sys
def peak():  # VmHWM: this process's own peak, not the forking parent's (as ru_maxrss counts)
    status = pathlib.Path("/proc/self/status").read_text().splitlines()
    kib = next(line.split()[1] for line in status if line.startswith("VmHWM"))
    pathlib.Path(".peak").write_text(kib)
atexit.register(peak)
from misalign.cli import main
main(sys.argv[1:])
"""
"""The command, writing its peak resident memory (KiB) to ``.peak`` as it exits."""


def run_cli(config, cwd, *flags, timeout: float = 60):
    """``misalign run CONFIG --store s.sqlite --out out FLAGS`` in a child process: its exit
    code, stdout, stderr, wall seconds and peak memory (bytes, its own ``VmHWM``; infinite
    when it was killed before it could say)."""
    import subprocess
    import sys
    import threading
    import time

    args = [sys.executable, "-c", PEAK, "run", str(config), "--store", "s.sqlite"]
    with open(cwd / ".stdout", "w+") as out, open(cwd / ".stderr", "w+") as err:
        start = time.monotonic()
        child = subprocess.Popen([*args, "--out", "out", *flags], cwd=cwd, stdout=out, stderr=err)
        timer = threading.Timer(timeout, child.kill)
        timer.start()
        child.wait()
        timer.cancel()
        out.seek(0)
        err.seek(0)
        texts = out.read(), err.read()
    (cwd / ".stdout").unlink()
    (cwd / ".stderr").unlink()
    peak = cwd / ".peak"
    memory = int(peak.read_text()) * 1024 if peak.exists() else float("inf")
    peak.unlink(missing_ok=True)
    return child.returncode, *texts, time.monotonic() - start, memory


def play_toml(folder, server, **agent) -> Path:
    """A two-agent play whose llm agent A has ``agent``'s settings, written to ``folder``."""
    import tomli_w

    settings = {"kind": "llm", "model": "fake", "base_url": server.base_url, "n": 2}
    settings |= {"api_key_env": "", "max_retries": 0, **agent}
    path = folder / "play.toml"
    path.write_text(tomli_w.dumps({"d": 2, "rounds": 2, "agents": {"A": settings, "B": {"n": 3}}}))
    return path


def secret_file(folder) -> Path:
    path = folder / "secret.j2"
    path.write_text(f"{SECRET} {{{{ estimate }}}}")
    return path


def fifo(folder) -> str:

    os.mkfifo(folder / "pipe.j2")
    return "pipe.j2"


def link_out(folder, elsewhere) -> str:
    (folder / "link.j2").symlink_to(secret_file(elsewhere))
    return "link.j2"


def big(folder) -> str:
    (folder / "big.j2").write_text("{{ estimate }}" + " " * 2_000_000)
    return "big.j2"


def latin1(folder) -> str:
    (folder / "latin1.j2").write_bytes("{{ estimate }} caf\xe9".encode("latin-1"))
    return "latin1.j2"


OUTSIDE = {  # each writes what it needs and gives the template path the configuration names
    "environ": lambda folder, elsewhere: "/proc/self/environ",
    "hostname": lambda folder, elsewhere: "/etc/hostname",
    "a secret elsewhere": lambda folder, elsewhere: str(secret_file(elsewhere)),
    "../ escape": lambda folder, elsewhere: f"../{elsewhere.name}/{secret_file(elsewhere).name}",
    "a link pointing out": link_out,
    "/dev/zero": lambda folder, elsewhere: "/dev/zero",
    "a FIFO": lambda folder, elsewhere: fifo(folder),
    "a directory": lambda folder, elsewhere: (folder / "dir.j2").mkdir() or "dir.j2",
    "2 MB": lambda folder, elsewhere: big(folder),
    "not UTF-8": lambda folder, elsewhere: latin1(folder),
}
WHY = {
    "a FIFO": "is a FIFO, not a regular file",
    "a directory": "is a directory, not a regular file",
    "2 MB": "is larger than 1,000,000 bytes",
    "not UTF-8": "(not UTF-8 text)",
}


@pytest.mark.parametrize("where", ["prompt", "system"])
@pytest.mark.parametrize("case", _sample(list(OUTSIDE), "../ escape", "a FIFO"))
def test_a_template_outside_the_configuration_or_not_a_text_file_is_refused(
    tmp_path, tmp_path_factory, monkeypatch, fake_server, case, where
):
    """Through the real command, live and ``--replay``: a template path that leaves the
    configuration's folder (absolute, ``../``, a link), or names no regular UTF-8 file of at
    most 1 MB, is one line naming the field, exit 2, within seconds (a FIFO is not waited
    on); nothing reaches the server and the secret is nowhere."""
    monkeypatch.setenv("MISALIGN_TEST_SECRET", SECRET)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    template = OUTSIDE[case](tmp_path, elsewhere)
    config = play_toml(tmp_path, fake_server, **{where: template})
    Store(tmp_path / "s.sqlite").close()  # a store to replay (a run makes one lazily)
    for flags in ([], ["--replay"]):
        code, out, err, wall, _ = run_cli(config, tmp_path, *flags, timeout=30)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and wall < 20, (wall, err)
        assert lines[0].startswith(f"misalign: error: agents.A.{where}: "), lines[0]
        assert WHY.get(case, "the configuration's folder: a template must be") in lines[0]
        assert SECRET not in out + err
    assert fake_server.requests == []
    assert not (tmp_path / "out").exists()
    written = [f for f in tmp_path.rglob("*") if f.is_file() and not f.is_symlink()]
    assert all(SECRET.encode() not in f.read_bytes() for f in written)


def test_templates_are_read_from_the_configurations_folder(tmp_path, fake_server):
    """A relative template path is the configuration's folder's, wherever the command runs;
    the run directory's ``config.toml`` names it absolute, and is refused as a configuration
    of its own (the template lies outside ``runs/<hash>``): re-run the original."""
    folder = tmp_path / "shared"
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "mine.j2").write_text("MINE {{ estimate }}")
    config = play_toml(folder, fake_server, prompt="templates/mine.j2")
    code, _, err, _, _ = run_cli(config, tmp_path)
    assert code == 0, err
    assert fake_server.requests and all(
        r["messages"][-1]["content"].startswith("MINE [") for r in fake_server.requests
    )
    written = (tmp_path / "out" / "config.toml").read_text()
    assert f'prompt = "{folder / "templates" / "mine.j2"}"' in written
    code, _, err, _, _ = run_cli(tmp_path / "out" / "config.toml", tmp_path, "--replay")
    assert code == 2 and err.strip().startswith("misalign: error: agents.A.prompt: "), err
    assert "the configuration's folder" in err and len(err.strip().splitlines()) == 1
    code, _, err, _, _ = run_cli(config, tmp_path, "--replay")  # the original re-runs
    assert code == 0, err


def test_a_template_given_as_data_is_read_from_the_working_directory(tmp_path):
    from misalign.config import parse_config

    (tmp_path / "mine.j2").write_text("{{ estimate }}")
    play = {"d": 2, "rounds": 1, "agents": {"A": {"kind": "llm", "model": "m", "n": 2}}}
    play["agents"]["A"] |= {"api_key_env": "", "prompt": "mine.j2"}
    assert parse_config(play).agents["A"].prompt == str(tmp_path / "mine.j2")
    play["agents"]["A"]["prompt"] = "../mine.j2"
    with pytest.raises(ConfigError, match=r"^agents\.A\.prompt: '\.\./mine\.j2' lies outside"):
        parse_config(play)


# A template from someone else: time and memory

GROWTH = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "squared powers": "{% set a = 9 ** 99999 %}" + "{% set a = a * a %}" * 12,
    "squares": "{% set a = 9 ** 9999 %}" + "{% set a = a * a %}" * 12,
    "~ doubling": '{% set a = "x" * 999999 %}' + "{% set a = a ~ a %}" * 11,
    "+ doubling": '{% set a = "x" * 999999 %}' + "{% set a = a + a %}" * 11,
    "list + doubling": "{% set a = [0] * 999999 %}" + "{% set a = a + a %}" * 11,
    "nested literals": "{% set a = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] %}"
    + "{% set a = [a, a, a, a, a, a, a, a, a, a] %}" * 9
    + "{{ a }}",
    "center": '{{ "x"|center(999999999) }}',
    "% width filter": '{{ "%1000000000s"|format(1) }}',
    "% precision filter": '{{ "%.1000000000f"|format(1.0) }}',
    "% width": '{{ "%1000000000s" % 1 }}',
    "format width": '{{ "{:>1000000000}".format(1) }}',
    "format precision": '{{ "{:.1000000000f}".format(1.0) }}',
    "ljust": '{{ "x".ljust(1000000000) }}',
    "replace": '{% set a = "x" * 999999 %}{{ a.replace("x", a) }}',
    "join": '{% set a = "x" * 999999 %}{{ ([a] * 1000)|join }}',
    "indent": '{{ ("x\n" * 400000)|indent(1000) }}',
    "wordwrap": '{{ "a b c"|wordwrap(1, wrapstring="x" * 999999) }}',
    "batch": "{{ [1]|batch(1000000000, 0)|list }}",
    "slice": "{{ range(10)|slice(1000000000)|list }}",
    "sum": '{% set a = "x" * 99999 %}{{ ([[a] * 1000] * 1000)|sum(start=[])|length }}',
}


@pytest.mark.parametrize("payload", _sample(list(GROWTH), "nested loops", "~ doubling"))
def test_a_template_that_would_hang_or_exhaust_memory_is_one_line(tmp_path, fake_server, payload):
    """Through the real command: each payload (which runs for minutes or allocates
    gigabytes unchecked) is one line naming the template, exit 2, in seconds and with the
    command's memory bounded; nothing reaches the server."""
    (tmp_path / "evil.j2").write_text(f"{GROWTH[payload]} {{{{ estimate }}}}")
    config = play_toml(tmp_path, fake_server, prompt="evil.j2")
    code, _, err, wall, peak = run_cli(config, tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"misalign: error: agents.A.prompt: {tmp_path / 'evil.j2'} is"), err
    assert wall < 10 and peak < 600e6, (wall, peak)
    assert fake_server.requests == []


def test_the_render_budget_restores_the_trace_function(tmp_path):
    import sys

    seen = []

    def tracer(frame, event, arg):
        seen.append(event)

    (tmp_path / "loop.j2").write_text("{% for i in range(1000) %}{{ i }}{% endfor %}{{ estimate }}")
    templates = Templates.load(config(prompt="loop.j2"), "agents.A")
    sys.settrace(tracer)
    try:
        render(templates)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)
