"""Tests of the language-model agent's store, modes and command line, against the fake server
over loopback (``misalign.llm.agent``): recording, re-runs, --replay, --refresh, --fork-at, a
run killed with SIGKILL, the key that never leaks, and bad input as one line."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tomli_w

import misalign.llm.client as client_
import misalign.llm.store as store_
from misalign.api import fit, setup, simulate
from misalign.cli import main
from misalign.config import parse_config
from misalign.llm.agent import Session
from misalign.llm.fake_server import (
    FakeServer,
    Reply,
    affine,
    error_body,
    fingerprint,
    reject_key,
    script,
    status,
)
from misalign.llm.store import Slot, Store, request_key

A = np.array([[0.5, 0.1, 0.0], [0.0, 0.4, 0.1], [0.1, 0.0, 0.3]])
C = np.array([0.1, -0.2, 0.3])
GOOD = affine(A, C)


HALF_STEP = affine(A, 2 * C)


def eta_aware(body: dict, index: int) -> Reply:
    """Answers that depend on the step size the prompt states, as a model's would."""
    halved = "eta = 0.5" in body["messages"][1]["content"]
    return (HALF_STEP if halved else GOOD)(body, index)


@pytest.fixture(autouse=True)
def loopback_allowed(monkeypatch):
    """The fake servers of these tests are on 127.0.0.1: a key may go there."""
    monkeypatch.setenv("MISALIGN_ALLOW_HOSTS", "127.0.0.1")


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Retries wait milliseconds, not seconds (in this process)."""
    monkeypatch.setattr(client_, "BACKOFF", 0.001)


@pytest.fixture
def server():
    with FakeServer(GOOD) as fake:
        yield fake


def settings(base_url: str, rounds: int = 12, **llm) -> dict:
    """A play of an llm agent A and a gradient agent B, d = 3, as data."""
    agent = {"kind": "llm", "model": "fake", "base_url": base_url, "api_key_env": "", "n": 4}
    agent |= {"max_retries": 1, "timeout_s": 5.0, **llm}
    return {"d": 3, "rounds": rounds, "agents": {"A": agent, "B": {"n": 6}}}


def write_config(path: Path, base_url: str, rounds: int = 12, **llm) -> Path:
    path.write_text(tomli_w.dumps(settings(base_url, rounds, **llm)))
    return path


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``misalign`` in this process: its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def run_json(capsys, config: Path, store: Path, *flags) -> dict:
    """``misalign run CONFIG --store STORE --json FLAGS``'s report (it must succeed)."""
    code, out, err = cli(capsys, "run", config, "--store", store, "--json", *flags)
    assert code == 0, err
    return json.loads(out)


def play(config: dict, session: Session):
    """Set up, fit and play through the Python API; the fits and the trajectory."""
    try:
        game = setup(parse_config(config), session=session)
        return fit(game), simulate(game)
    finally:
        session.close()


def stored(path: Path) -> int:
    """How many answers the store holds."""
    with contextlib.closing(Store(path, readonly=True)) as store:
        return len(store)


# Store, re-runs and modes


def test_a_run_records_every_answer_and_a_second_run_asks_nothing(tmp_path, server, capsys):
    config, store = write_config(tmp_path / "play.toml", server.base_url), tmp_path / "s.sqlite"
    first = run_json(capsys, config, store, "--out", tmp_path / "one")
    sent = len(server.requests)
    assert first["llm"]["requests"] == sent > 0 and stored(store) == sent
    assert max(server.count().values()) == 1
    second = run_json(capsys, config, store, "--out", tmp_path / "two")
    assert second["llm"]["requests"] == 0 and len(server.requests) == sent
    assert second["llm"]["cached"] == sent + first["llm"]["cached"]
    assert second["outputs"] == first["outputs"] and second["fit"] == first["fit"]


def test_the_store_holds_each_play_s_seed_as_an_integer(tmp_path, server, capsys):
    """The seeds are ``uint64`` arrays; the store's ``play`` column holds SQLite integers (a
    NumPy integer would be bound as an 8-byte blob), so a slot is found by its seed."""
    config, store = write_config(tmp_path / "play.toml", server.base_url), tmp_path / "s.sqlite"
    run_json(capsys, config, store, "--set", "seed=7", "--out", tmp_path / "one")
    with contextlib.closing(sqlite3.connect(store)) as db:
        for table in ("answers", "accepted"):
            rows = db.execute(f"SELECT DISTINCT typeof(play), play FROM {table}").fetchall()
            assert rows == [("integer", 7)], table


def test_replay_with_the_server_stopped_gives_the_same_report(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    with FakeServer(GOOD) as server:
        config = write_config(tmp_path / "play.toml", server.base_url)
        live = run_json(capsys, config, store, "--out", tmp_path / "live")
    replay = run_json(capsys, config, store, "--replay", "--out", tmp_path / "replay")
    assert replay["llm"]["requests"] == 0 and replay["llm"]["failed"] == []
    for key in ("outputs", "fit", "prediction", "distance", "rounds_to_prediction"):
        assert replay[key] == live[key], key


def test_replay_through_the_api_is_bit_identical(tmp_path):
    store = str(tmp_path / "s.sqlite")
    with FakeServer(GOOD) as server:
        config = settings(server.base_url)
        live_fits, live = play(config, Session(store))
    fits, replayed = play(config, Session(store, mode="replay"))
    assert np.array_equal(replayed.turns, live.turns)
    assert np.array_equal(fits.agents["A"].global_.map.A, live_fits.agents["A"].global_.map.A)
    assert np.isfinite(live.turns).all()


def test_replay_fails_the_plays_the_run_failed(tmp_path):
    """Bad answers and transient errors that outlasted the retries fail a play; a replay
    fails it at the same round, for the same reason."""
    store = str(tmp_path / "s.sqlite")

    def played(session: Session):
        try:
            game = setup(parse_config(config), seeds=(0, 1, 2), session=session)
            return simulate(game), session.failed
        finally:
            session.close()

    with FakeServer(GOOD) as server:
        config = settings(server.base_url, rounds=8)
        probe = setup(parse_config(config), seeds=(0, 1, 2), session=Session(store))
        markers = [json.dumps(probe.prompts["A"][b].X[0].tolist()) for b in (1, 2)]
        probe.agents["A"].session.close()
        asked = Counter()

        def behaviour(body: dict, index: int) -> Reply:
            user = body["messages"][1]["content"]
            play = next((b for b, marker in zip((1, 2), markers, strict=True) if marker in user), 0)
            asked[play] += 1
            if play == 1 and asked[play] > 3:  # bad answers from round 3
                return Reply(content="no idea")
            if play == 2 and asked[play] > 5:  # rate limited from round 5
                return Reply(429, headers={"Retry-After": "0"}, body=error_body(429))
            return GOOD(body, index)

        server.behaviour = behaviour
        live, failed = played(Session(store))
    failed = sorted(failed, key=lambda failure: failure["seed"])
    assert [(f["seed"], f["round"]) for f in failed] == [(1, 3), (2, 5)]
    assert failed[1]["why"] == "429 after 2 attempts; no answer"
    replayed, again = played(Session(store, mode="replay"))
    assert np.array_equal(replayed.turns, live.turns, equal_nan=True)
    assert sorted(again, key=lambda failure: failure["seed"]) == failed


def one_line_error(code: int, out: str, err: str) -> str:
    """The message of a run that failed as it should: exit 2, one line, no traceback."""
    assert code == 2 and out == ""
    assert err.startswith("misalign: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.removeprefix("misalign: error: ").strip()


def test_a_replay_miss_names_agent_play_and_round(tmp_path, server, capsys):
    config, store = write_config(tmp_path / "play.toml", server.base_url), tmp_path / "s.sqlite"
    run_json(capsys, config, store, "--out", tmp_path / "live")
    sent = len(server.requests)
    result = cli(capsys, "run", config, "--store", store, "--replay", "--set", "rounds=14")
    assert one_line_error(*result) == ("--replay: no recorded answer for agent A, seed 0, round 12")
    assert len(server.requests) == sent


def test_a_replay_of_no_store(tmp_path, capsys):
    config = write_config(tmp_path / "play.toml", "http://127.0.0.1:9/v1")
    result = cli(capsys, "run", config, "--store", tmp_path / "none.sqlite", "--replay")
    assert one_line_error(*result).endswith("none.sqlite: no such file to replay")
    assert not (tmp_path / "none.sqlite").exists()


def test_refresh_asks_everything_again(tmp_path, server, capsys):
    config, store = write_config(tmp_path / "play.toml", server.base_url), tmp_path / "s.sqlite"
    first = run_json(capsys, config, store, "--out", tmp_path / "one")
    answers = first["llm"]["requests"] + first["llm"]["cached"]
    again = run_json(capsys, config, store, "--refresh", "--out", tmp_path / "two")
    assert again["llm"]["requests"] == answers and again["llm"]["cached"] == 0
    assert (
        min(server.count().values()) == 2
        and len(server.requests) == 2 * answers - (first["llm"]["cached"])
    )
    assert stored(store) == first["llm"]["requests"]  # each request's newer answer
    assert again["outputs"] == first["outputs"]


def test_fork_at_takes_the_rounds_before_it_from_the_store(tmp_path, server):
    server.behaviour = eta_aware
    store, K, rounds = str(tmp_path / "s.sqlite"), 5, 12
    _, original = play(settings(server.base_url, rounds), Session(store))
    before = len(server.requests)
    session = Session(store, fork_at=K)
    try:
        game = setup(parse_config(settings(server.base_url, rounds, eta=0.5)), session=session)
        fit(game)
        fitting = len(server.requests) - before
        cached = session.stats.cached
        forked = simulate(game)
    finally:
        session.close()
    assert len(server.requests) - before - fitting == rounds - K  # rounds K.. only
    assert session.stats.cached - cached == K
    asked = server.requests[before:]
    assert all("eta = 0.5" in body["messages"][1]["content"] for body in asked)
    outputs, earlier = forked.outputs("A"), original.outputs("A")
    assert np.array_equal(outputs[:K], earlier[:K])
    assert not np.allclose(outputs[K:], earlier[K:])


def test_fork_at_a_round_answered_from_the_store(tmp_path, server, capsys):
    """A converged play repeats its request: those rounds come from the store, and a fork
    after them still finds them."""
    server.behaviour = eta_aware
    config, store = write_config(tmp_path / "play.toml", server.base_url, 40), tmp_path / "s.db"
    first = run_json(capsys, config, store, "--out", tmp_path / "one")
    assert first["llm"]["cached"] > 0  # the play converged bit for bit: repeated requests
    forked = run_json(
        capsys, config, store, "--fork-at", 39, "--set", "agents.A.eta=0.5", "--out", tmp_path
    )
    assert forked["outputs"]["A"][:39] == first["outputs"]["A"][:39]
    assert forked["outputs"]["A"][39] != first["outputs"]["A"][39]


def test_fork_at_without_a_recorded_play(tmp_path, server, capsys):
    config = write_config(tmp_path / "play.toml", server.base_url)
    result = cli(capsys, "run", config, "--store", tmp_path / "s.sqlite", "--fork-at", 3)
    assert one_line_error(*result) == ("--fork-at: no recorded answer for agent A, seed 0, round 0")


# A run killed with SIGKILL


def recorded(path: Path) -> int:
    """How many answers the store holds."""
    with contextlib.closing(Store(path, readonly=True)) as store:
        return len(store)


@pytest.mark.slow
def test_a_killed_run_resumes_without_asking_twice(tmp_path, capsys):
    """A real ``misalign run`` killed with SIGKILL mid-run, then re-run: no request is answered
    twice at the server (nothing is paid for twice) and the outputs are those of an
    uninterrupted run. Before the kill the server holds every new request unanswered, so the
    requests in flight at the kill are the only ones the re-run sends again."""
    concurrency = 4
    store, killed, resumed = tmp_path / "s.sqlite", tmp_path / "killed", tmp_path / "resumed"
    with FakeServer(GOOD, latency=0.05) as server:
        config = write_config(
            tmp_path / "play.toml", server.base_url, rounds=20, concurrency=concurrency
        )
        command = [sys.executable, "-m", "misalign.cli", "run", str(config), "--seeds", "2"]
        command += ["--store", str(store), "--json"]
        process = subprocess.Popen([*command, "--out", str(killed)], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while len(server.requests) < 30 and time.monotonic() < deadline:
                assert process.poll() is None, "the run ended before it was killed"
                time.sleep(0.005)
            server.behaviour = lambda body, index: Reply(hang=True)  # hold what comes next
            while recorded(store) < sum(server.answered().values()):
                assert time.monotonic() < deadline, "answers were not recorded"
                time.sleep(0.01)  # every answer given is in the store
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert process.returncode == -signal.SIGKILL and not (killed / "run.json").exists()
        held = {fingerprint(b) for b in server.requests} - set(server.answered())
        assert 0 < len(held) <= concurrency  # requests were in flight at the kill
        server.behaviour = GOOD
        done = subprocess.run(
            [*command, "--out", str(resumed)], capture_output=True, text=True, check=True
        )
        assert max(server.answered().values()) == 1  # nothing answered twice
        sent_again = {key for key, n in server.count().items() if n > 1}
        assert sent_again == held  # only the requests held unanswered at the kill
        server.latency = 0.0
        reference = run_json(
            capsys, config, tmp_path / "fresh.sqlite", "--seeds", 2, "--out", tmp_path
        )
    result = json.loads(done.stdout)
    assert result["llm"]["cached"] >= 30 - concurrency
    assert result["llm"]["failed"] == reference["llm"]["failed"] == []
    assert result["outputs"] == reference["outputs"] and result["batch"] == reference["batch"]


# The key never leaks


def every_file(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_key_never_leaks(tmp_path, server, monkeypatch, capsys):
    key = f"sk-test-{uuid.uuid4()}"
    monkeypatch.setenv("MISALIGN_TEST_KEY", key)
    keyed = {"api_key_env": "MISALIGN_TEST_KEY"}
    config = write_config(tmp_path / "play.toml", server.base_url, **keyed)
    store = tmp_path / "s.sqlite"
    printed = []

    def run(*args) -> int:
        code, out, err = cli(capsys, "run", *args)
        printed.append(out + err)
        return code

    assert run(config, "--store", store, "--json", "--out", tmp_path / "json") == 0
    assert run(config, "--store", tmp_path / "t.sqlite", "--out", tmp_path / "text") == 0
    server.behaviour = status(401)
    assert run(config, "--store", store, "--refresh", "--out", tmp_path / "x") == 2
    assert "refused the key in $MISALIGN_TEST_KEY (HTTP 401)" in printed[-1]
    server.behaviour = lambda body, index: Reply(
        400, body=error_body(400, f"Incorrect API key provided: {key}")
    )  # a server that echoes the key
    assert run(config, "--store", store, "--refresh", "--out", tmp_path / "x") == 2
    assert "Incorrect API key provided: ***" in printed[-1]
    server.behaviour = reject_key("reasoning_effort", GOOD)
    rejected = write_config(
        tmp_path / "rejected.toml", server.base_url, request={"reasoning_effort": "low"}, **keyed
    )
    assert run(rejected, "--store", store, "--out", tmp_path / "x") == 2
    unreachable = write_config(
        tmp_path / "gone.toml", f"http://127.0.0.1:{closed_port()}/v1", **keyed
    )
    assert run(unreachable, "--store", tmp_path / "u.sqlite", "--out", tmp_path / "x") == 2
    authorizations = {headers.get("authorization") for headers in server.headers}
    assert authorizations == {f"Bearer {key}"}  # so the scan below means something
    files = every_file(tmp_path)
    assert {p.name for p in files} >= {"run.json", "config.toml", "trajectory.png", "s.sqlite"}
    for path in files:
        assert key.encode() not in path.read_bytes(), path
    for text in printed:
        assert key not in text


# Bad input: one line, exit 2


@pytest.mark.parametrize(
    ("llm", "message"),
    [
        ({"api_key": "sk-live-abcdef0123456789"}, "agents.A.api_key: never write a key"),
        ({"request": {"api_key": "sk-live-abcdef0123456789"}}, "agents.A.request.api_key: never"),
        (
            {"request": {"extra_headers": {"Authorization": "Bearer sk-live-abcdef0123456789"}}},
            "agents.A.request.extra_headers.Authorization: never write a key",
        ),
        ({"api_key_env": "sk-live-abcdef0123456789"}, "agents.A.api_key_env: must be the NAME"),
        ({"api_key_env": "sk_live_abcdef0123456789"}, "agents.A.api_key_env: names no environ"),
        (
            {"api_key_env": "MISALIGN_TEST_UNSET_VARIABLE"},
            "agents.A.api_key_env: the environment variable MISALIGN_TEST_UNSET_VARIABLE is not",
        ),
    ],
)
def test_keys_in_the_configuration_are_refused_unrepeated(tmp_path, server, capsys, llm, message):
    config = write_config(tmp_path / "play.toml", server.base_url, **llm)
    error = one_line_error(*cli(capsys, "run", config, "--store", tmp_path / "s.sqlite"))
    assert error.startswith(message) and "abcdef0123456789" not in error
    assert server.requests == []


def test_an_unreachable_server(tmp_path, capsys):
    port = closed_port()
    config = write_config(tmp_path / "play.toml", f"http://127.0.0.1:{port}/v1")
    error = one_line_error(*cli(capsys, "run", config, "--store", tmp_path / "s.sqlite"))
    assert error == f"agents.A.base_url: http://127.0.0.1:{port}/v1 unreachable after 2 attempts"


def test_a_template_without_the_estimate(tmp_path, server, capsys):
    template = tmp_path / "user.j2"
    template.write_text("Examples: {{ examples }}")
    config = write_config(tmp_path / "play.toml", server.base_url, prompt=str(template))
    error = one_line_error(*cli(capsys, "run", config, "--store", tmp_path / "s.sqlite"))
    assert error == f"agents.A.prompt: {template} never uses 'estimate', the incoming estimate"
    assert server.requests == []


def test_a_refused_request_setting(tmp_path, server, capsys):
    server.behaviour = reject_key("reasoning_effort", GOOD)
    config = write_config(
        tmp_path / "play.toml", server.base_url, request={"reasoning_effort": "high"}
    )
    error = one_line_error(*cli(capsys, "run", config, "--store", tmp_path / "s.sqlite"))
    assert error.startswith("agents.A.request.reasoning_effort: the server refused the request")
    assert "Unsupported parameter" in error


def test_what_was_recorded_before_an_error_is_kept(tmp_path, server, capsys):
    answered = Counter()

    def behaviour(body, index):
        if index >= 5:
            return Reply(401, body=error_body(401))
        answered["good"] += 1
        return GOOD(body, index)

    server.behaviour = behaviour
    config = write_config(tmp_path / "play.toml", server.base_url, concurrency=1)
    store = tmp_path / "s.sqlite"
    error = one_line_error(*cli(capsys, "run", config, "--store", store))
    assert error.startswith("agents.A.api_key_env: the server wants a key (HTTP 401)")
    assert answered["good"] == 5 and stored(store) == 5
    assert not list(tmp_path.glob("s.sqlite-*"))  # the journal was folded back in


def test_a_request_value_holding_the_key_is_refused_before_anything(tmp_path, server, capsys):
    key = uuid.uuid4().hex  # no prefix that would give it away
    keyed = {
        "api_key_env": "MISALIGN_TEST_KEY",
        "request": {"metadata": {"tags": ["a", f"x{key}"]}},
    }
    config = write_config(tmp_path / "play.toml", server.base_url, **keyed)
    store = tmp_path / "s.sqlite"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MISALIGN_TEST_KEY", key)
        error = one_line_error(*cli(capsys, "run", config, "--store", store))
        assert error == (
            "agents.A.request.metadata.tags[1]: never write a key (this holds the value of "
            "$MISALIGN_TEST_KEY)"
        )
        assert server.requests == [] and not store.exists()  # nor the store created
        patch.setenv("MISALIGN_TEST_KEY", f"{key}-other")  # another key: nothing to refuse
        assert run_json(capsys, config, store, "--out", tmp_path)["llm"]["failed"] == []


# Identical requests in flight at once, and what is paid


def test_identical_requests_in_flight_are_sent_once(tmp_path):
    """Two slots asking the same request at once: one request is sent, both slots take its
    answer, and the store notes that both did (the second was sent too, and the store kept
    its answer while the first slot had taken the other)."""
    answers = iter(range(100))

    def behaviour(body: dict, index: int) -> Reply:
        return Reply(content=json.dumps({"estimate": [next(answers), 0, 0]}))

    with FakeServer(behaviour, latency=0.2) as server:
        session = Session(str(tmp_path / "s.sqlite"))
        try:
            game = setup(parse_config(settings(server.base_url)), session=session)
            agent = game.agents["A"]
            slots = [Slot("A", agent.seeds[0], "play", 0, position) for position in (0, 1)]
            w = np.array([0.5, -1.0, 2.0])
            got = agent.ask([(0, w, slot) for slot in slots])
            recorded = [session.store.at(slot, "fake", 3).estimate.tolist() for slot in slots]
        finally:
            session.close()
    assert len(server.requests) == 1
    assert got[0].tolist() == got[1].tolist() == recorded[0] == recorded[1] == [0.0, 0.0, 0.0]
    assert session.stats.requests == 1 and session.stats.cached == 1


def test_tokens_and_cost_count_only_what_was_paid(tmp_path, server, capsys):
    """A replay pays nothing: its tokens and cost are the cached ones."""
    priced = {"price_in": 1.0, "price_out": 2.0}
    store = str(tmp_path / "s.sqlite")
    config = settings(server.base_url, **priced)
    live = Session(store)
    play(config, live)
    replay = Session(store, mode="replay")
    play(config, replay)
    paid = live.stats
    assert paid.tokens_in > 0 and paid.cost > 0
    assert (replay.stats.tokens_in, replay.stats.tokens_out, replay.stats.cost) == (0, 0, 0.0)
    assert replay.stats.cached_tokens_in == paid.tokens_in + paid.cached_tokens_in
    assert replay.stats.cached_tokens_out == paid.tokens_out + paid.cached_tokens_out
    assert replay.stats.cached_cost == pytest.approx(paid.cost + paid.cached_cost)
    assert paid.cost == pytest.approx((paid.tokens_in * 1.0 + paid.tokens_out * 2.0) / 1e6)


# Stores that cannot be used, answers that cannot be read: one line, or a failed play


def test_a_store_that_cannot_be_created(tmp_path, server, capsys):
    config = write_config(tmp_path / "play.toml", server.base_url)
    (tmp_path / "file").write_text("in the way")
    for store in ("/proc/misalign-none/x.sqlite", tmp_path / "file" / "x.sqlite"):
        error = one_line_error(*cli(capsys, "run", config, "--store", store))
        assert error.startswith(f"--store {store}: cannot create the store there")
    assert server.requests == []


def test_a_replay_of_another_programs_database(tmp_path, server, capsys):

    config, store = write_config(tmp_path / "play.toml", server.base_url), tmp_path / "x.db"
    with contextlib.closing(sqlite3.connect(store)) as db, db:
        db.execute("CREATE TABLE answers (question TEXT, answer TEXT)")
    error = one_line_error(*cli(capsys, "run", config, "--store", store, "--replay"))
    assert error.startswith(f"--store {store}: not a misalign store (its table answers has")


def test_malformed_answers_fail_plays_not_the_run(tmp_path, server, capsys):
    server.behaviour = lambda body, index: Reply(
        body={"choices": [{"index": 0, "message": None}], "usage": {"prompt_tokens": None}}
    )
    config = write_config(tmp_path / "play.toml", server.base_url, rounds=3)
    code, out, err = cli(capsys, "run", config, "--store", tmp_path / "s.sqlite", "--json")
    assert code == 1 and err.startswith("misalign: every play failed (1 play;"), err
    report = json.loads(out)
    assert report["llm"]["failed"] and report["observed"]["class"] == "failed"
    assert all("the server's response was malformed" in f["why"] for f in report["llm"]["failed"])


# An untrusted store: edited rows, triggers, views and other programs' databases are refused


EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
REPLAY, FORK = ("--replay",), ("--fork-at", "20")
"""Reading the shipped store by key (a replay) and by slot (a fork after its last round)."""
ROUND_5 = "kind='play' AND round=5"
"""The row of the shipped store that the edits change: agent A's answer in round 5."""


def edited(tmp_path: Path, *statements: str) -> Path:
    """A copy of the shipped store (``examples/local_llm.sqlite``) with ``statements`` run."""
    copy = tmp_path / "edited.sqlite"
    copy.write_bytes((EXAMPLES / "local_llm.sqlite").read_bytes())
    with contextlib.closing(sqlite3.connect(copy)) as db, db:
        for statement in statements:
            db.execute(statement)
    return copy


def rekeyed(path: Path) -> None:
    """Give every row of ``path`` the key of its (edited) request, in answers and accepted."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        for key, request, sample in db.execute("SELECT key, request, sample FROM answers"):
            new = request_key(json.loads(request), sample)
            db.execute("UPDATE answers SET key=? WHERE key=?", (new, key))
            db.execute("UPDATE accepted SET key=? WHERE key=?", (new, key))


def replayed(capsys, tmp_path: Path, store: Path, mode: tuple[str, ...]) -> str:
    """The one-line error of ``misalign run examples/local_llm.toml`` on ``store`` (it must
    fail, having written nothing)."""
    out = tmp_path / "out"
    config = EXAMPLES / "local_llm.toml"
    error = one_line_error(*cli(capsys, "run", config, "--store", store, *mode, "--out", out))
    assert not (out / "run.json").exists()
    return error


def test_the_shipped_store_replays_and_forks(tmp_path, capsys):
    """The checks pass every row of the store shipped with the example, by key and by slot."""
    config, store = EXAMPLES / "local_llm.toml", edited(tmp_path)
    replay = run_json(capsys, config, store, *REPLAY, "--out", tmp_path / "replay")
    fork = run_json(capsys, config, store, *FORK, "--out", tmp_path / "fork")
    assert replay["llm"]["failed"] == fork["llm"]["failed"] == []
    assert replay["outputs"] == fork["outputs"] and fork["llm"]["requests"] == 0


EDITS = {
    "other numbers": ("estimate='[2.5, 0.5]'", "is not what its text parses to"),
    "three numbers": ("estimate='[1, 2, 3]'", "is not what its text parses to"),
    "one number": ("estimate='[1.0]'", "is not what its text parses to"),
    "an object": ("""estimate='{"a": 1}'""", "is not what its text parses to"),
    "a string": ("""estimate='"x"'""", "is not what its text parses to"),
    "not JSON": ("estimate='x'", "its estimate 'x' is not what its text parses to"),
    "NaN": ("estimate='[NaN, 1.0]'", "is not what its text parses to"),
    "1e308": ("estimate='[1e308, 1.0]'", "is not what its text parses to"),
    "Infinity": ("estimate='[Infinity, 1.0]'", "is not what its text parses to"),
    "1e999": ("estimate='[1e999, -1e999]'", "is not what its text parses to"),
    "a number": ("estimate=1.5", "its estimate '1.5' is not what its text parses to"),
    "a blob": ("estimate=X'5b312c20325d'", "a column holds a value of the wrong type"),
    "other text": ("""raw='{"estimate": [7.0, 7.0]}'""", "is not what its text parses to [7.0,"),
    "unreadable text": ("raw='no idea'", "its text does not parse (the answer held 0 numbers"),
    "no text": ("raw=NULL", "its text does not parse (the answer was empty)"),
    "a problem": ("problem='cut off'", "it holds an estimate beside a problem"),
    "another request": (
        "request=replace(request, 'careful', 'careless')",
        "its key is not the SHA-256 of its request",
    ),
    "a request that is not JSON": ("request='{'", "its request is not JSON"),
    "another sample": ("sample=1", "its key is not the SHA-256 of its request"),
    "token counts": ("tokens_in='many'", "a column holds a value of the wrong type"),
}


@pytest.mark.parametrize("mode", [REPLAY, FORK], ids=["replay", "fork"])
@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_an_edited_row_is_never_used(tmp_path, capsys, edit, mode):
    """Each kind of edited row of a copy of the shipped store stops the run before its
    answer is used: one line naming the store, agent, play, round and what is wrong."""
    change, problem = EDITS[edit]
    store = edited(tmp_path, f"UPDATE answers SET {change} WHERE {ROUND_5}")
    error = replayed(capsys, tmp_path, store, mode)
    assert error.startswith(
        f"--store {store}: the recorded answer for agent A, seed 0, round 5 was edited, not used: "
    )
    assert problem in error


@pytest.mark.parametrize("mode", [REPLAY, FORK], ids=["replay", "fork"])
def test_a_row_for_another_model_is_never_used(tmp_path, capsys, mode):
    """A request edited to another model and re-keyed (so that its key is right): read by
    slot (a fork), its model is refused; read by key (a replay), it is no answer at all."""
    other = """replace(request, '"model": "local"', '"model": "other"')"""
    store = edited(tmp_path, f"UPDATE answers SET request={other} WHERE {ROUND_5}")
    rekeyed(store)
    error = replayed(capsys, tmp_path, store, mode)
    where = "agent A, seed 0, round 5"
    if mode == FORK:
        assert error == (
            f"--store {store}: the recorded answer for {where} was edited, not used: its "
            "request is for model 'other', not 'local'"
        )
    else:
        assert error == f"--replay: no recorded answer for {where}"


@pytest.mark.parametrize("mode", [REPLAY, FORK], ids=["replay", "fork"])
def test_a_row_under_another_key_is_never_used(tmp_path, capsys, mode):
    """A row moved to another key (in answers and accepted): by slot, its key is refused; by
    key, it is no answer at all."""
    key = "0" * 64
    store = edited(
        tmp_path,
        f"UPDATE accepted SET key='{key}' WHERE {ROUND_5}",
        f"UPDATE answers SET key='{key}' WHERE {ROUND_5}",
    )
    error = replayed(capsys, tmp_path, store, mode)
    where = "agent A, seed 0, round 5"
    if mode == FORK:
        assert error.endswith(
            f"{where} was edited, not used: its key is not the SHA-256 of its request"
        )
    else:
        assert error == f"--replay: no recorded answer for {where}"


def foreign(path: Path) -> None:
    """Another program's database."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE users (name TEXT, email TEXT)")
        db.execute("INSERT INTO users VALUES ('ada', 'ada@example.org')")


def ours_and(*statements: str):
    """A store of ours, then ``statements`` run in it."""

    def make(path: Path) -> None:
        Store(path).close()
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            for statement in statements:
                db.execute(statement)

    return make


SCHEMAS = {
    "another program's": (foreign, "its table 'users' is not ours"),
    "ours and another's": (
        ours_and("CREATE TABLE users (name TEXT)"),
        "its table 'users' is not ours",
    ),
    "a trigger": (
        ours_and(
            "CREATE TRIGGER rewrite AFTER INSERT ON answers BEGIN "
            "UPDATE answers SET estimate='[0, 0, 0]' WHERE key=new.key; END"
        ),
        "its trigger 'rewrite' is not ours",
    ),
    "a view named answers": (
        ours_and(
            "DROP TABLE answers",
            "CREATE VIEW answers AS SELECT key, agent, play, kind, round, position, sample, 0 "
            "AS attempt, '{}' AS request, NULL AS raw, NULL AS estimate, 0 AS tokens_in, 0 AS "
            "tokens_out, 0.0 AS latency, NULL AS cost, 0.0 AS time, NULL AS problem FROM accepted",
        ),
        "its view 'answers' is not ours",
    ),
    "another index": (
        ours_and("CREATE INDEX mine ON answers (raw)"),
        "its index 'mine' is not ours",
    ),
    "another application_id": (
        ours_and("PRAGMA application_id=1234"),
        "its application_id is 1234, another program's",
    ),
    "a generated estimate": (
        ours_and(
            "DROP TABLE answers",
            "CREATE TABLE answers (key TEXT PRIMARY KEY, agent TEXT, play INTEGER, kind TEXT, "
            "round INTEGER, position INTEGER, sample INTEGER, attempt INTEGER, request TEXT, "
            "raw TEXT, estimate TEXT AS ('[0, 0, 0]'), tokens_in INTEGER, tokens_out INTEGER, "
            "latency REAL, cost REAL, time REAL, problem TEXT)",
        ),
        "its table answers has no column estimate",
    ),
    "a unique index": (  # INSERT OR REPLACE would delete every other answer of the agent
        ours_and("DROP INDEX slots", "CREATE UNIQUE INDEX slots ON answers (agent)"),
        "its index slots is not defined as ours",
    ),
    "a check": (  # an answer paid for could not be written
        ours_and(
            "ALTER TABLE answers RENAME TO old",
            "CREATE TABLE answers (key TEXT PRIMARY KEY, agent TEXT NOT NULL, play INTEGER "
            "NOT NULL, kind TEXT NOT NULL, round INTEGER NOT NULL, position INTEGER NOT NULL, "
            "sample INTEGER NOT NULL, attempt INTEGER NOT NULL, request TEXT NOT NULL, raw "
            "TEXT CHECK (raw IS NULL), estimate TEXT, tokens_in INTEGER NOT NULL, tokens_out "
            "INTEGER NOT NULL, latency REAL NOT NULL, cost REAL, time REAL NOT NULL, problem "
            "TEXT)",
            "DROP TABLE old",
            "CREATE INDEX slots ON answers (agent, play, kind, round, position, sample)",
        ),
        "its table answers is not defined as ours",
    ),
    "a newer schema version": (
        ours_and("PRAGMA user_version=3"),
        "its schema version is 3; this misalign reads up to 2",
    ),
    "a fingerprint of another type": (
        ours_and(
            "ALTER TABLE answers DROP COLUMN fingerprint",
            "ALTER TABLE answers ADD COLUMN fingerprint INTEGER",
        ),
        "its table answers is not defined as ours",
    ),
    "a strict table": (
        ours_and(
            "DROP TABLE exhausted",
            "CREATE TABLE exhausted (key TEXT PRIMARY KEY, agent TEXT NOT NULL, play INTEGER "
            "NOT NULL, round INTEGER NOT NULL, why TEXT NOT NULL, time INTEGER NOT NULL) STRICT",
        ),
        "its table exhausted is not defined as ours",
    ),
}


@pytest.mark.parametrize("mode", [(), REPLAY], ids=["live", "replay"])
@pytest.mark.parametrize("schema", SCHEMAS, ids=list(SCHEMAS))
def test_a_database_not_ours_is_refused_untouched(tmp_path, server, capsys, schema, mode):
    """Another program's database, or a store holding a trigger, a view or anything else not
    ours, is refused before anything is read from it or written into it: one line, exit 2,
    no request, its bytes unchanged and nothing left beside it."""
    make, problem = SCHEMAS[schema]
    (tmp_path / "db").mkdir()
    store = tmp_path / "db" / "store.sqlite"
    make(store)
    before, files = store.read_bytes(), sorted((tmp_path / "db").iterdir())
    config = write_config(tmp_path / "play.toml", server.base_url)
    error = one_line_error(*cli(capsys, "run", config, "--store", store, *mode))
    assert error == f"--store {store}: not a misalign store ({problem})"
    assert store.read_bytes() == before and sorted((tmp_path / "db").iterdir()) == files
    assert server.requests == []


def test_a_new_store_is_stamped_and_an_empty_file_becomes_one(tmp_path, server, capsys):
    """A store is made in a fresh path or an empty file, and stamped ours."""
    config = write_config(tmp_path / "play.toml", server.base_url, rounds=2)
    (tmp_path / "empty.sqlite").touch()
    for store in (tmp_path / "new.sqlite", tmp_path / "empty.sqlite"):
        run_json(capsys, config, store, "--out", tmp_path / "out")
        with contextlib.closing(sqlite3.connect(store)) as db:
            assert db.execute("PRAGMA application_id").fetchone()[0] == store_.APPLICATION_ID
        assert stored(store) > 0


# A store that another process holds locked: no answer paid for is lost

LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
print(time.time(), flush=True)
"""
"""A process that holds a store's write lock for ``argv[2]`` seconds, then says when it
freed it (unix time)."""


@contextlib.contextmanager
def write_locked(path: Path, seconds: float):
    """Another process holds ``path``'s write lock for ``seconds`` (killed on leaving, if it
    still holds it); yields a function that waits for the lock to free and returns when."""
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout.readline() == "locked\n"
        yield lambda: float(locker.stdout.readline())
    finally:
        locker.kill()
        locker.wait()
        locker.stdout.close()


def test_a_store_locked_for_seconds_keeps_every_answer(tmp_path, capsys):
    """A real run whose store another process holds locked for 3 s: the answers given
    meanwhile wait in memory and are written when the lock frees; nothing paid for is lost,
    nothing is asked twice, no play fails."""
    store, given = tmp_path / "s.sqlite", []
    Store(store).close()

    def timed(body: dict, index: int) -> Reply:
        given.append(time.time())
        return GOOD(body, index)

    with FakeServer(timed) as server, write_locked(store, 3.0) as freed:
        config = write_config(tmp_path / "play.toml", server.base_url)
        report = run_json(capsys, config, store, "--out", tmp_path / "out")
        assert min(given) < freed()  # answers were given while the store was locked
        assert stored(store) == len(server.requests) == report["llm"]["requests"] > 0
    assert max(server.count().values()) == 1 and report["llm"]["failed"] == []


def test_a_store_locked_to_the_end_says_how_many_answers_were_not_stored(
    tmp_path, server, capsys, monkeypatch
):
    """A lock that outlasts the run (and the wait on closing, shortened here): one line
    saying how many answers paid for could not be stored, exit 2; no traceback."""
    monkeypatch.setattr(store_, "BUSY_S", 0.5)
    store = tmp_path / "s.sqlite"
    Store(store).close()
    config = write_config(tmp_path / "play.toml", server.base_url, rounds=3)
    with write_locked(store, 600.0):
        error = one_line_error(*cli(capsys, "run", config, "--store", store))
    answers = len(server.requests)
    assert error == (
        f"--store {store}: another process held its lock for over 0.5 s; {answers} answers "
        "paid for could not be stored; a re-run asks for them again"
    )
    assert stored(store) == 0


# What someone else's server or files can make a run send or print


KEY = "sk-QzXwKqZxWvJhQyPzKmGxLrVwQjfz"
"""A fixed key (rare letters, no hex run) whose 4-character fragments occur nowhere else."""


def fragments(text: str, key: str = KEY, shortest: int = 4) -> list[str]:
    """The fragments of ``shortest`` or more characters of the key that ``text`` holds."""
    return [key[i : i + shortest] for i in range(len(key) - 3) if key[i : i + shortest] in text]


@pytest.mark.parametrize(
    ("status_", "echo"),
    [
        (400, f"Incorrect API key provided: {KEY[:8]}**************{KEY[-4:]}."),
        (404, f"The model does not exist or key {KEY[3:12]}... has no access to it"),
        (422, f"Unprocessable: {KEY[10:20]} / {KEY}"),
        (400, f"bad request from {KEY[-6:]}{KEY[:5]}"),
    ],
)
def test_key_fragments_a_server_echoes_are_never_printed_or_stored(
    tmp_path, monkeypatch, capsys, status_, echo
):
    """A server that echoes a prefix, a middle or a suffix of the key in its error: neither
    the message printed nor anything written holds four characters of the key in a row;
    first at a request that stops the run (before any answer), then at one that fails a
    play (after answers), whose reason is printed and stored."""
    monkeypatch.setenv("MISALIGN_TEST_KEY", KEY)
    refusal = Reply(status_, body=error_body(status_, echo))
    for first in (0, 6):
        behaviour = script(*[GOOD] * first, refusal) if first else lambda b, i: refusal
        with FakeServer(behaviour) as server:
            config = write_config(
                tmp_path / "play.toml", server.base_url, 4, api_key_env="MISALIGN_TEST_KEY"
            )
            out = tmp_path / f"out-{first}"
            code, stdout, stderr = cli(
                capsys, "run", config, "--store", tmp_path / f"s{first}.sqlite", "--out", out
            )
            assert server.headers and server.headers[0]["authorization"] == f"Bearer {KEY}"
        assert code in (0, 1, 2) and fragments(stdout + stderr) == [], stdout + stderr
    for path in every_file(tmp_path):
        assert fragments(path.read_text(errors="replace")) == [], path


def test_a_long_bad_answer_is_echoed_short_in_its_correction(tmp_path, capsys):
    """A 1.1 MB answer that does not parse is sent back with its correction cut to a few
    hundred characters: neither a server's nor a store's long answer can make the paid
    requests that follow long. First a run whose server answers only that (no corrections
    allowed: the store keeps the long answers), then a run that reads them from the store
    and corrects them at another server."""
    huge = "x" * 1_100_000
    store = tmp_path / "s.sqlite"
    with FakeServer(lambda body, index: Reply(content=huge)) as server:
        config = write_config(tmp_path / "play.toml", server.base_url, rounds=3, max_retries=0)
        cli(capsys, "run", config, "--store", store)
    for phase, answers in (("store", GOOD), ("server", script(Reply(content=huge), GOOD))):
        with FakeServer(answers) as server:
            config = write_config(tmp_path / "play.toml", server.base_url, rounds=3)
            code, _, err = cli(capsys, "run", config, "--store", store)
            corrections = [r for r in server.requests if len(r["messages"]) > 2]
        assert code == 0, err
        assert corrections, phase
        for request in corrections:
            echoed = request["messages"][2]
            assert echoed["role"] == "assistant" and echoed["content"] == huge[:300], phase
        assert max(len(json.dumps(r)) for r in server.requests) < 10_000, phase
        store.unlink()
        Path(f"{store}-wal").unlink(missing_ok=True)


def test_a_template_that_writes_the_key_is_never_sent(tmp_path, monkeypatch, capsys, server):
    """The second wall: messages that hold the key (a template that writes it as text) are
    refused before the request, one line, exit 2; the server hears nothing."""
    monkeypatch.setenv("MISALIGN_TEST_KEY", KEY)
    template = tmp_path / "leak.j2"
    template.write_text(f"note {KEY}: {{{{ estimate }}}}")
    config = write_config(
        tmp_path / "play.toml",
        server.base_url,
        prompt=str(template),
        api_key_env="MISALIGN_TEST_KEY",
    )
    error = one_line_error(*cli(capsys, "run", config, "--store", tmp_path / "s.sqlite"))
    assert error == (
        "agents.A: refused to send a request whose messages hold the key ($MISALIGN_TEST_KEY): "
        "a template or an example writes it"
    )
    assert server.requests == []


def test_an_answer_that_echoes_the_key_is_stored_without_it(tmp_path, monkeypatch, capsys):
    """A server (trusted with the key) whose answers repeat it: the store, the run directory
    and the output never hold it; the answers still parse."""
    monkeypatch.setenv("MISALIGN_TEST_KEY", KEY)

    def echo(body, index):
        reply = GOOD(body, index)
        return Reply(content=f"your key is {KEY}. {reply.content}")

    with FakeServer(echo) as server:
        config = write_config(
            tmp_path / "play.toml", server.base_url, 4, api_key_env="MISALIGN_TEST_KEY"
        )
        code, out, err = cli(capsys, "run", config, "--store", tmp_path / "s.sqlite")
    assert code == 0, err
    with contextlib.closing(sqlite3.connect(tmp_path / "s.sqlite")) as db:
        raws = [row[0] for row in db.execute("SELECT raw FROM answers")]
    assert raws and all("your key is ***." in raw for raw in raws)
    assert KEY not in out + err
    for path in every_file(tmp_path):
        assert KEY.encode() not in path.read_bytes(), path


ESCAPES = "bad \x1b[31mRED\x1b]8;;http://evil.example\x07LINK\x1b]8;;\x07 \x1b[2K\rall good"


@pytest.mark.parametrize("first", [0, 6])
def test_terminal_escapes_from_a_server_are_printed_as_text(tmp_path, capsys, first):
    """A server whose error message holds ESC sequences and a carriage return (to recolour,
    hide a link, erase the line): what is printed holds no control character, both when the
    error stops the run and when it fails a play after answers."""
    refusal = Reply(400, body=error_body(400, ESCAPES))
    behaviour = script(*[GOOD] * first, refusal) if first else (lambda body, index: refusal)
    with FakeServer(behaviour) as server:
        config = write_config(tmp_path / "play.toml", server.base_url, 4)
        code, out, err = cli(capsys, "run", config, "--store", tmp_path / "s.sqlite")
    assert code in (0, 1, 2) and "\\x1b[31mRED" in out + err
    assert all(ch.isprintable() or ch == "\n" for ch in out + err), repr(out + err)


def test_an_agent_name_with_escapes_is_printed_as_text(tmp_path):
    config = tmp_path / "play.toml"
    agents = {f"A{ESCAPES}": {"n": 2}, "B": {"n": 2}}
    config.write_text(tomli_w.dumps({"d": 2, "rounds": 3, "agents": agents}))
    done = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "run", str(config)], capture_output=True, text=True
    )
    assert done.returncode == 2 and "is not a valid agent name" in done.stderr
    assert all(ch.isprintable() or ch == "\n" for ch in done.stderr), repr(done.stderr)
