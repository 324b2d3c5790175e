"""Tests for misalign.config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.config import MAX_DEPTH, ConfigError, check_depth, load_config, parse_config

BASE = {"seed": 1, "d": 2, "rounds": 10, "agents": {"A": {"n": 4}, "B": {"n": 4}}}


def _with(path, value):
    data = {**BASE, "agents": {k: dict(v) for k, v in BASE["agents"].items()}}
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return data


def test_defaults():
    config = parse_config(BASE)
    a = config.agents["A"]
    assert (a.kind, a.preconditioner, a.eta, a.steps_per_turn, a.noise) == (
        "gd",
        "lsa-optimal",
        1.0,
        1,
        0.0,
    )
    assert config.order == ["A", "B"]


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("d", 0, "d: input should be greater than or equal to 1"),
        ("rounds", 0, "rounds: input should be greater than or equal to 1"),
        ("agents.A.n", 0, "agents.A.n: input should be greater than or equal to 1"),
        ("agents.A.spectrum", [1.0], "agents.A.spectrum: must have length d = 2 (got 1)"),
        ("agents.A.spectrum", [1.0, -1.0], "agents.A.spectrum: must be all positive"),
        ("agents.A.spectrum", [1.0, 0.0], "agents.A.spectrum: must be all positive"),
        ("agents.A.target", [1.0, 2.0, 3.0], "agents.A.target: must have length d = 2 (got 3)"),
        ("agents.A.target", [1.0, float("nan")], "agents.A.target.1: must be a finite number"),
        ("agents.A.eta", float("inf"), "agents.A.eta: must be a finite number"),
        ("agents.A.eta", 0.0, "agents.A.eta: input should be greater than or equal to 1e-30"),
        ("agents.A.eta", 1e-320, "agents.A.eta: input should be greater than or equal to 1e-30"),
        ("agents.A.target", [1e300, 0], "agents.A.target.0: input should be less than or equal"),
        ("agents.A.noise", 1e308, "agents.A.noise: input should be less than or equal to 1e+30"),
        ("agents.A.sampling_std", 1e200, "agents.A.sampling_std: input should be less than"),
        ("agents.A.spectrum", [1.0, 1e-40], "agents.A.spectrum: must be all positive"),
        ("agents.A.n", True, "agents.A.n: input should be a valid integer"),
        ("agents.A.n", "12", "agents.A.n: input should be a valid integer"),
        ("agents.A.n", 12.0, "agents.A.n: input should be a valid integer"),
        ("agents.A.eta", "0.5", "agents.A.eta: input should be a valid number"),
        ("agents.A.rotate", 1, "agents.A.rotate: input should be a valid boolean"),
        ("agents.A.noise", -1.0, "agents.A.noise: input should be greater than or equal to 0"),
        ("agents.A.sampling_std", -0.1, "agents.A.sampling_std: input should be greater than"),
        ("agents.A.steps_per_turn", 10**9, "agents.A.steps_per_turn: input should be less than"),
        ("agents.A.colour", "red", "agents.A.colour: unknown key"),
        ("speed", 3, "speed: unknown key"),
        (
            "agents.A.kind",
            "oracle",
            "agents.A.kind: got 'oracle'; expected one of: gd, lsa, llm, transformer, helper",
        ),
        ("agents.A.preconditioner", "adam", "agents.A.preconditioner: got 'adam'"),
        ("schedule", ["A", "Z"], "schedule: names no agent: 'Z'"),
        ("schedule", ["A"], "schedule: agent 'B' never takes a turn"),
        ("schedule", [], "schedule: list should have at least 1 item"),
        ("agents.A.reads", "Q", "agents.A.reads: names no agent: 'Q'"),
        ("start", [0.0], "start: must have length d = 2 (got 1)"),
        ("agents", {}, "agents: dictionary should have at least 1 item"),
        ("agents.rho", {"n": 2}, "agents.rho: is not a valid agent name"),
        ("seed", -1, "seed: input should be greater than or equal to 0"),
        ("d", "four", "d: input should be a valid integer"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(path, value, message):
    with pytest.raises(ConfigError) as info:
        parse_config(_with(path, value))
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text


@pytest.mark.parametrize("value,ok", [(2.0, False), (0.0, False), (1.0, True), (0.3, True)])
def test_damping_is_a_weight_in_0_1(value, ok):
    data = {**BASE, "defence": {"agent": "A", "method": "damping", "damping": value}}
    if ok:
        assert parse_config(data).defence.damping == value
    else:
        with pytest.raises(ConfigError, match="^defence.damping: input should be"):
            parse_config(data)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="^agents.A.n: is required$"):
        parse_config(_with("agents.A", {}))


def test_load_and_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("d = 2\nrounds = 5\n[agents.A]\nn = 3\n[agents.B]\nn = 3\n")
    config = load_config(
        path,
        ["seed=9", "agents.A.eta=0.5", "agents.B.preconditioner=newton", "agents.B.target=[1, 2]"],
    )
    assert config.seed == 9 and config.agents["A"].eta == 0.5
    assert config.agents["B"].preconditioner == "newton" and config.agents["B"].target == [1, 2]
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["seed"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("agents.Z.n=3", "--set agents.Z.n: no agent 'Z' (agents: A, B); to add one"),
        ("agents.b.n=12", "--set agents.b.n: no agent 'b'; did you mean 'B'? (agents: A, B)"),
        ("agents.b={n = 12}", "--set agents.b: no agent 'b'; did you mean 'B'?"),
        ("agents.alpah.eta=1", "no agent 'alpah'; did you mean 'alpha'?"),
        ("agents.alph={n = 2}", "no agent 'alph'; did you mean 'alpha'?"),
        ("agents.alphas.n=2", "no agent 'alphas'; did you mean 'alpha'?"),
    ],
)
def test_override_never_adds_an_agent_by_a_typo(tmp_path, override, message):
    path = tmp_path / "c.toml"
    path.write_text("d = 2\nrounds = 5\n[agents.A]\nn = 3\n[agents.B]\nn = 3\n")
    if "alp" in override:
        path.write_text("d = 2\nrounds = 5\n[agents.alpha]\nn = 3\n[agents.B]\nn = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_override_adds_an_agent_given_its_whole_table(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("d = 2\nrounds = 5\n[agents.A]\nn = 3\n[agents.B]\nn = 3\n")
    config = load_config(path, ["agents.C={n = 5, eta = 0.5}", "agents.C.rotate=true"])
    assert list(config.agents) == ["A", "B", "C"] and config.agents["C"].n == 5


@pytest.mark.parametrize(
    "text,message",
    [("d = = 2", "invalid TOML"), (None, "no such file"), (b"\xff\xfe", "cannot read")],
)
def test_unreadable_files(tmp_path, text, message):
    path = tmp_path / "c.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def refused(*args) -> str:
    """Run the real command in a child process; it must exit 2 with exactly one line on stderr,
    ``misalign: error: ...``, and no traceback. Returns that line."""
    result = subprocess.run(
        [sys.executable, "-m", "misalign.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("misalign: error: "), result.stderr
    return lines[0]


def nested(depth: int, inner: str = "") -> str:
    """TOML of ``depth`` nested arrays."""
    return "[" * depth + inner + "]" * depth


LLM_AGENT = """d = 2
rounds = 3
[agents.A]
kind = "llm"
model = "fake"
base_url = "http://127.0.0.1:9/v1"
api_key_env = ""
n = 4
request = {{a = {request}}}
[agents.B]
n = 4
"""
"""A play of an llm agent A, its ``request`` table to fill in."""


@pytest.mark.parametrize(
    "text,overrides,says",
    [
        (f"d = 2\nx = {nested(3000)}\n", [], "c.toml: invalid TOML: nested too deeply to read"),
        ("d = 2\n", [f"seed={nested(3000)}"], "--set seed: invalid TOML: nested too deeply"),
        ("d = 2\n", [f"x={nested(300)}"], "x.0.0.0.0.0...: nested more than 32 levels deep"),
        (
            LLM_AGENT.format(request=nested(400)),
            [],
            "agents.A.request.a.0.0...: nested more than 32 levels deep",
        ),
        ("d = 2\n" + "a." * 2000 + "b = 1\n", [], "a.a.a.a.a.a...: nested more than 32"),
    ],
    ids=["file", "set", "set-parsed", "llm-request", "dotted-keys"],
)
def test_deep_nesting_is_one_line_naming_the_file_or_field(tmp_path, text, overrides, says):
    """Nesting that exhausts the TOML parser's recursion (a file or a --set value), or that it
    parses but goes beyond MAX_DEPTH (which pydantic's validation and the config's hash could
    not serialize), is one line and exit 2 for the real command."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    sets = [arg for o in overrides for arg in ("--set", o)]
    line = refused("theory", path, *sets, "--out", tmp_path / "out")
    assert says in line
    assert not (tmp_path / "out").exists()


def test_nesting_is_allowed_up_to_max_depth():
    """``MAX_DEPTH`` levels pass (an llm agent's request may nest tables and lists); one more
    is refused, naming where."""
    check_depth({"a": json.loads(nested(MAX_DEPTH))})
    with pytest.raises(ConfigError, match=r"^a\.0\.0\.0\.0\.0\.\.\.: nested more than 32"):
        check_depth({"a": json.loads(nested(MAX_DEPTH + 1))})
    request = {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    agent = {"kind": "llm", "model": "m", "base_url": "http://h/v1", "api_key_env": ""}
    config = parse_config(_with("agents.A", {**agent, "n": 4, "request": request}))
    assert config.agents["A"].request == request


def test_digest_tracks_the_resolved_config():
    a, b = parse_config(BASE), parse_config(_with("agents.A.eta", 1.0))
    assert a.digest() == b.digest()  # an explicit default is the same configuration
    assert a.digest() != parse_config(_with("seed", 2)).digest()


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 50),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.floats(-3, 3), max_size=6),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_keys = st.sampled_from(
    [
        "n",
        "spectrum",
        "target",
        "noise",
        "eta",
        "preconditioner",
        "kind",
        "reads",
        "rotate",
        "steps_per_turn",
        "sampling_std",
        "serves",
        "mode",
        "checkpoint",
        "bogus",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    top=st.dictionaries(
        st.sampled_from(["seed", "d", "rounds", "schedule", "start", "x"]), _values
    ),
    agent=st.dictionaries(_keys, _values, max_size=6),
)
def test_any_input_is_valid_or_one_line_config_error(top, agent):
    """Fuzzing: whatever the values, parsing succeeds or raises ConfigError with one line."""
    data = {"d": 2, "rounds": 3, **top, "agents": {"A": agent, "B": {"n": 2}}}
    try:
        parse_config(data)
    except ConfigError as exc:
        assert "\n" not in str(exc) and ":" in str(exc)


@pytest.mark.parametrize(
    "path",
    sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml")),
    ids=lambda p: p.name,
)
def test_every_example_configuration_is_valid(path):
    """Every shipped play configuration validates (the language-model ones included: their
    keys are read from the environment only when a run starts)."""
    assert load_config(path).agents


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://[::1/v1", "is not a URL (its host or port cannot be read)"),
        ("http://127.0.0.1:port/v1", "is not a URL (its host or port cannot be read)"),
        ("http://127.0.0.1:18001\t/v1", "must not hold spaces or control characters"),
        ("http://127.0.0.1:18001/v1\r\n", "must not hold spaces or control characters"),
        ("http://127.0.0.1:1/v1\x1b[31m", "must not hold spaces or control characters"),
        ("ftp://127.0.0.1/v1", "must be an http:// or https:// URL with a host"),
        ("http:///v1", "must be an http:// or https:// URL with a host"),
    ],
)
def test_a_base_url_that_is_no_address_is_one_line_that_echoes_nothing(tmp_path, url, says):
    """Through the real command: one line naming the field, never echoing the URL or the
    agent's table (whose api_key_env may be a key written by mistake)."""
    import subprocess
    import sys

    import tomli_w

    key = "gsk_LiveKeyABCDEF0123456789"
    agent = {"kind": "llm", "model": "m", "base_url": url, "api_key_env": key, "n": 2}
    config = tmp_path / "c.toml"
    config.write_text(tomli_w.dumps({"d": 2, "rounds": 3, "agents": {"A": agent, "B": {"n": 2}}}))
    done = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "run", str(config)], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr == f"misalign: error: agents.A.base_url: {says}\n"
    assert key not in done.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev/zero", "directory", "17 MB"])
@pytest.mark.parametrize("named", ["configuration", "sweep base"])
def test_a_file_that_is_no_configuration_is_one_line_at_once(tmp_path, kind, named):
    """A FIFO (never waited on), /dev/zero (never read forever), a directory or an oversized
    file, named on the command line or as a sweep's base: one line, exit 2, in seconds."""
    import os
    import subprocess
    import sys

    target = tmp_path / "c.toml"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev/zero":
        target = Path("/dev/zero")
    elif kind == "directory":
        target.mkdir()
    else:
        target.write_text("# " + "x" * (17 * 2**20) + "\n")
    command = ["run", str(target)]
    if named == "sweep base":
        sweep = tmp_path / "sweep.toml"
        sweep.write_text(f'base = "{target}"\n[axes]\n"agents.A.n" = [2, 3]\n')
        command = ["sweep", str(sweep), "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-m", "misalign.cli", *command], capture_output=True, text=True, timeout=60
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert str(target) in lines[0]
    assert "not a regular file" in lines[0] or "larger than 16,777,216 bytes" in lines[0]
