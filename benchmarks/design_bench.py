"""Benchmark: ``misalign design`` (``misalign.workflows.design.advise``) on networks of N agents,
against a
floor measured in the same run.

The network is a debate like ``examples/debate.toml``, built as ``network_test.py`` builds its
random networks: N gradient agents ``a0 ... a<N-1>`` (d = 3, prompts of ``d - 1`` to ``3 d + 4``
rows, random spectra and rotations, ``lsa-optimal`` or ``newton`` steps, each its own target)
answering, at once, the uniform mix of every other agent (simultaneous rounds, a complete
graph); the advice is for ``a0``. The floor is one theory prediction of the present play
(``misalign.api.predict``, best of 5): the advice searches every agent's step scale, so
its cost in floors grows with N; ``advise_over_floor`` is that ratio. Each stage's time is
reported too (``stages``: from its start to the next one's).

    python benchmarks/design_bench.py                   # N = 10, 20 and 50
    python benchmarks/design_bench.py --agents 20
    OPENBLAS_NUM_THREADS=1 python benchmarks/design_bench.py   # the README's numbers

On cores other jobs keep busy, OpenBLAS's threads wait on each other in every eigenvalue
problem of the 150 x 150 round map: the same run took from 1.6 to 8.5 times as long there.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from misalign.api import predict, setup
from misalign.config import parse_config
from misalign.workflows.design import advise


def network(agents: int, d: int = 3, seed: int = 0) -> dict:
    """The configuration: ``agents`` random gradient agents on a complete graph, simultaneous
    rounds, each with its own target (misaligned); the same for a given ``seed``."""
    rng = np.random.default_rng([seed, agents, d])
    table = {}
    for k in range(agents):
        kind = str(rng.choice(["lsa-optimal", "newton"]))
        table[f"a{k}"] = {
            "n": int(rng.integers(d - 1, 3 * d + 5)),
            "spectrum": rng.uniform(0.2, 3.0, d).round(3).tolist(),
            "rotate": bool(rng.integers(2)),
            "preconditioner": kind,
            "eta": float(rng.uniform(0.1, 0.9)),
            "target": rng.standard_normal(d).round(3).tolist(),
        }
    return {"seed": seed, "d": d, "rounds": 200, "schedule": "simultaneous", "agents": table}


def floor(config, repeats: int = 5) -> float:
    """The least time of one theory prediction of the present play."""
    game = setup(config)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(game)
        times.append(time.perf_counter() - started)
    return min(times)


def run(agents: int, d: int = 3) -> dict:
    """Advise ``a0`` on the network of ``agents`` agents; its time, stages and floor."""
    config = parse_config(network(agents, d))
    marks = [("setup", time.perf_counter())]

    def mark(what: str, *_) -> None:
        marks.append(("checks" if "checking" in what else what.split(":")[0], time.perf_counter()))

    result = advise(config, "a0", progress=mark)
    marks.append(("end", time.perf_counter()))
    total = marks[-1][1] - marks[0][1]
    t_floor = floor(config)
    stages: dict[str, float] = {}
    for (stage, at), (_, end) in zip(marks[:-1], marks[1:], strict=True):
        stages[stage] = round(stages.get(stage, 0.0) + end - at, 3)
    return {
        "agents": agents,
        "d": d,
        "advise_s": total,
        "floor_s": t_floor,
        "advise_over_floor": total / t_floor,
        "stages": stages,
        "rho": result["baseline"]["rho"],
        "verified": all(row.get("verified", True) for row in result["stability"].values()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--d", type=int, default=3)
    args = parser.parse_args(argv)
    results = []
    for agents in args.agents:
        result = run(agents, args.d)
        results.append(result)
        print(json.dumps(result))
        print(
            f"design on {agents} agents (complete graph, d = {args.d}): "
            f"{result['advise_s']:.2f} s = {result['advise_over_floor']:.0f}x one prediction of "
            f"the play ({result['floor_s'] * 1e3:.2f} ms)",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
