"""Tests of the requests a run plans and its limits (``misalign.llm.budget``): the plan
against the requests a real run sends to a loopback fake server, the cost bound against the
cost it pays, and the real command refusing, before one request, what is over the limits."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from misalign.api import fit, setup, simulate
from misalign.config import load_config, parse_config
from misalign.llm import budget
from misalign.llm.agent import Session
from misalign.llm.fake_server import FakeServer, Reply, affine
from misalign.llm.fit import WARMUP

EXAMPLES = Path(__file__).parents[3] / "examples"
GOOD = affine(0.5 * np.eye(2), np.ones(2))


def agent(base_url: str, **settings) -> dict:
    table = {"kind": "llm", "model": "fake", "base_url": base_url, "api_key_env": "", "n": 3}
    return table | {"max_retries": 0, "timeout_s": 5.0} | settings


def play_config(base_url: str, rounds: int = 4, both: bool = False, **settings) -> dict:
    second = agent(base_url, **settings) if both else {"n": 4}
    return {"d": 2, "rounds": rounds, "agents": {"A": agent(base_url, **settings), "B": second}}


@pytest.fixture
def server():
    with FakeServer(GOOD) as fake:
        yield fake


@pytest.mark.parametrize("case", range(6))
def test_the_plan_counts_what_a_run_asks_for(tmp_path, server, case):
    """Seeded cases: without refits, the requests sent plus those answered from the store
    (repeats) are the plan exactly; with refits (plays that confirm early stop), at most."""
    rng = np.random.default_rng(case)
    settings = {"probes": int(rng.integers(3, 7)), "samples": int(rng.integers(1, 3))}
    settings["refits"] = int(rng.integers(0, 3)) if case % 2 else 0
    rounds, seeds, both = int(rng.integers(1, 6)), int(rng.integers(1, 4)), bool(case % 3)
    config = parse_config(play_config(server.base_url, rounds, both, **settings))
    session = Session(str(tmp_path / "s.sqlite"))
    try:
        game = setup(config, seeds=range(seeds), session=session)
        plan = budget.plan(game, rounds)
        fit(game)
        simulate(game)
    finally:
        session.close()
    asked = session.stats.requests + session.stats.cached
    assert plan.total == sum(plan.requests.values()) and set(plan.requests) == (
        {"A", "B"} if both else {"A"}
    )
    if settings["refits"] == 0:
        assert asked == plan.total
    else:
        assert asked <= plan.total
    assert session.stats.requests == len(server.requests)


def test_the_cost_bound_holds_over_what_the_server_charges(tmp_path, server):
    """The fake server reports tokens as a paid API would; the bound is above what was paid."""
    priced = {"price_in": 0.25, "price_out": 2.0, "request": {"max_completion_tokens": 200}}
    config = parse_config(play_config(server.base_url, 6, True, **priced))
    session = Session(str(tmp_path / "s.sqlite"))
    try:
        game = setup(config, seeds=range(3), session=session)
        plan = budget.plan(game, 6)
        fit(game)
        simulate(game)
    finally:
        session.close()
    assert 0 < session.stats.cost <= plan.total_cost
    assert set(plan.cost) == {"A", "B"}


def run(tmp_path, config: dict, *flags: str):
    path = tmp_path / "play.toml"
    path.write_text(tomli_w.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "misalign.cli", "run", str(path), "--store", "s.sqlite"]
        + ["--out", "out", *flags],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )


def one_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


FITS = 2 * 2 * (1 + 4) + 1 + WARMUP
"""Agent A's most requests per play in the fits: 2 d probes x 1 sample x (1 + 4 refits), the
check after the last refit, and a warm-up of WARMUP rounds (one turn each)."""


@pytest.mark.parametrize(
    ("settings", "flags", "message"),
    [  # a play of 20 rounds: one request per round, and the fits
        (
            {"probes": 3000, "concurrency": 4096},
            (),
            f"--max-requests 1000: the run plans {3000 * 5 + 1 + WARMUP + 20:,}",
        ),
        (
            {"samples": 200},
            (),
            f"--max-requests 1000: the run plans {4 * 200 * 5 + 200 + WARMUP + 20:,} ",
        ),
        ({}, ("--max-requests", "10"), f"--max-requests 10: the run plans {FITS + 20} "),
        ({}, ("--seeds", "40"), f"--max-requests 1000: the run plans {40 * (FITS + 20):,} "),
        ({}, ("--max-requests", "0"), "--max-requests 0: the run plans"),
        ({}, ("--max-cost", "5"), "--max-cost 5: the cost cannot be bounded (no agent has"),
        ({"price_out": 1.0}, ("--max-cost", "5"), "--max-cost 5: the cost cannot be bounded (an"),
        (
            {"price_out": 2.0, "request": {"max_completion_tokens": 10**6}},
            ("--max-cost", "5"),
            f"--max-cost 5: the {FITS + 20} planned requests may cost up to "
            f"${(FITS + 20) * 2.0:.2f}",  # the output alone; the input adds a little
        ),
    ],
)
def test_a_run_over_its_limits_is_refused_before_any_request(
    tmp_path, server, settings, flags, message
):
    """Through the real command: one line with the count or the cost, exit 2, nothing sent."""
    line = one_line(run(tmp_path, play_config(server.base_url, 20, **settings), *flags))
    assert line.startswith(f"misalign: error: {message}"), line
    assert server.requests == [] and not (tmp_path / "out").exists()


def test_a_run_within_its_limits_runs(tmp_path, server):
    priced = {"price_out": 2.0, "request": {"max_completion_tokens": 100}}
    done = run(
        tmp_path, play_config(server.base_url, 20, **priced), "--max-requests", str(FITS + 20)
    )
    assert done.returncode == 0, done.stderr
    done = run(tmp_path, play_config(server.base_url, 20, **priced), "--max-cost", "1")
    assert done.returncode == 0, done.stderr


def test_corrections_stop_at_the_limit(tmp_path):
    """Answers that never parse make corrections the plan does not count: the client stops
    sending at --max-requests exactly, one line, and what was answered stays in the store."""
    with FakeServer(lambda body, index: Reply(content="no numbers here")) as server:
        config = play_config(server.base_url, 20, max_retries=50, concurrency=4)
        limit = FITS + 20  # the plan, exactly
        line = one_line(run(tmp_path, config, "--max-requests", str(limit)))
        assert len(server.requests) == limit
    assert line.startswith(
        f"misalign: error: --max-requests {limit}: reached ({limit} requests sent"
    )
    with contextlib.closing(sqlite3.connect(tmp_path / "s.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM answers").fetchone()[0] == limit


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_the_shipped_examples_fit_under_the_default_limit(tmp_path, monkeypatch, example):
    config = load_config(EXAMPLES / example)
    if not any(a.kind == "llm" for a in config.agents.values()):
        return
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-budget")
    session = Session(str(tmp_path / "s.sqlite"))
    try:
        plan = budget.plan(setup(config, session=session), config.rounds)
    finally:
        session.close()
    assert 0 < plan.total <= 1000
    budget.check(plan, 1000, None)
    if example == "gpt5-mini.toml":  # as its comment says
        assert plan.total == 78 and plan.total_cost is not None


def test_describe_names_each_agent_and_the_bound():
    plan = budget.Plan({"A": 1200, "B": 30}, {"A": 0.5, "B": 0.25})
    line = budget.describe(plan)
    assert "1,230 requests planned (A 1,200, B 30;" in line and "at most $0.7500" in line
    assert "cost not bounded" in budget.describe(budget.Plan({"A": 1}, {"A": None}))
    assert "$" not in budget.describe(budget.Plan({"A": 1}, {}))
    assert os.linesep not in line


@pytest.mark.parametrize("trick", ["template", "settings"])
def test_max_cost_holds_whatever_the_requests_grow_to(tmp_path, server, trick):
    """A template that renders short for the plan and long in the play, or a passed-through
    setting that makes every request long (2 MB of tool descriptions): the client reserves
    each request's most before it sends it, so the run stops at --max-cost, and what the
    server could have charged for the requests it got stays under it."""
    prices = {"price_in": 10.0, "price_out": 10.0}
    settings = {"max_completion_tokens": 50}
    if trick == "template":
        template = tmp_path / "long.j2"
        template.write_text(
            "{% if round == 1000000000 %}{{ estimate }}{% else %}"
            '{{ "padding " * 100000 }} {{ estimate }}{% endif %}'
        )
        extra = {"prompt": str(template)}
    else:
        settings["metadata"] = {"note": "x" * 2_000_000}
        extra = {}
    config = play_config(server.base_url, 20, **prices, **extra, request=settings, concurrency=8)
    line = one_line(run(tmp_path, config, "--max-cost", "0.5"))
    assert line.startswith("misalign: error: --max-cost 0.5: ")
    assert "reached" in line or "may cost up to" in line
    charged = sum(
        (len(json.dumps(body["messages"])) // 4 + 1) * 10.0 / 1e6 + 50 * 10.0 / 1e6
        for body in server.requests
    )
    assert charged <= 0.5
