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
ideal speed-up between two concurrencies is the ratio of their floors.

    python benchmarks/llm_bench.py                        # 32 plays, 3 rounds, 0.2 s, 1 vs 32
    python benchmarks/llm_bench.py --concurrency 1 8 32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from misalign.config import PlayConfig
from misalign.experiment import fit, predict, setup, simulate
from misalign.llm.agent import Session
from misalign.llm.fake_server import FakeServer, affine
from misalign.report import report, to_json

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


def measure(plays: int, rounds: int, latency: float, concurrency: int) -> dict:
    """One end-to-end run of ``plays`` plays on a fresh server and a fresh store."""
    phases: dict[str, float] = {}
    requests: dict[str, int] = {}
    with served(latency) as (base_url, received):
        cfg = config(base_url, rounds, concurrency)
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
    assert not failed, f"failed plays: {failed[:3]}"
    assert stats.requests == received(), (stats.requests, received())
    assert np.isfinite(state["play"].outputs("A")[-1]).all()
    waves = math.ceil(stats.requests / concurrency)
    return {
        "concurrency": concurrency,
        "requests": stats.requests,
        "cached": stats.cached,
        "stored": stored,
        "fit_requests": requests["fit"],
        "play_requests": requests["play"],
        "wall_s": wall,
        "floor_s": waves * latency,
        "plays_per_s": plays / wall,
        **{f"{name}_s": phases[name] for name in PHASES},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plays", type=int, default=32, help="plays in the batch (seeds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args(argv)

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
