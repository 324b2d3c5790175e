"""Benchmark: batched simultaneous rounds of a network, through ``misalign.api``
(setup, simulate, predict), against a floor measured in the same run.

The default is a debate of N = 50 agents at d = 10 on a complete graph (each agent reads the
uniform mix of the other 49), 200 plays of 100 rounds. The floor is the bare numpy loop of the
same round with the same maps, nothing recorded: ``X = W S`` (the mixing matrix on the stacked
outputs) and ``S = A X + c`` per agent, batched over plays and agents. The play records every
output of every round (``rounds * N * plays * d`` floats); the memory estimate of
``misalign.api.footprint`` is printed before anything is allocated, and a batch that
cannot fit is refused with one line (``misalign.runtime.sizes``).

    python benchmarks/network_bench.py                         # N = 50, d = 10, 200 x 100
    python benchmarks/network_bench.py --agents 20 --plays 1000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from misalign.api import footprint, predict, setup, simulate
from misalign.config import parse_config
from misalign.model.agent import EINSUM_D


def network(agents: int, d: int, rounds: int) -> dict:
    """The configuration: ``agents`` gradient agents on a complete graph, simultaneous rounds,
    each with its own sampled target (misaligned)."""
    return {
        "seed": 0,
        "d": d,
        "rounds": rounds,
        "schedule": "simultaneous",
        "agents": {
            f"a{k}": {"n": 2 * d, "preconditioner": "lsa-optimal", "eta": 0.8}
            for k in range(agents)
        },
    }


def floor(game, rounds: int) -> np.ndarray:
    """The bare loop of the game's simultaneous round: one mix and one batched product per
    round over every play and agent, nothing recorded. Returns ``(B, N, d)``."""
    names = game.schedule.agents
    position = {name: k for k, name in enumerate(names)}
    W = np.zeros((len(names), len(names)))
    for k, (_, reads) in enumerate(game.schedule.turns):
        for name, a in ((reads, 1.0),) if isinstance(reads, str) else reads:
            W[k, position[name]] += a
    maps = [game.agents[name].affine() for name in names]
    A = np.stack([f.A for f in maps], axis=1)  # (B, N, d, d)
    c = np.stack([f.c for f in maps], axis=1)  # (B, N, d)
    S = np.repeat(game.start[:, None], len(names), axis=1)
    # the play's own kernel (``AffineMap.__call__``): einsum up to EINSUM_D, matmul above
    small = game.start.shape[1] <= EINSUM_D
    for _ in range(rounds):
        read = W @ S
        S = (np.einsum("bnij,bnj->bni", A, read) if small else (A @ read[..., None])[..., 0]) + c
    return S


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--d", type=int, default=10)
    parser.add_argument("--plays", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args(argv)

    config = parse_config(network(args.agents, args.d, args.rounds))
    estimate = footprint(config, args.plays)
    phases = {}
    phases["setup"], game = timed(setup, config, range(args.plays))  # refuses what cannot fit
    phases["play"], trajectory = timed(simulate, game)
    phases["predict"], prediction = timed(predict, game)
    t_floor, S = timed(floor, game, args.rounds)
    names = game.schedule.agents
    last = np.stack([trajectory.outputs(name)[-1] for name in names], axis=1)
    scale = max(1.0, np.abs(S).max())
    assert np.allclose(last, S, rtol=1e-9, atol=1e-12 * scale), np.abs(last - S).max()
    converged = prediction.converges
    fixed = np.stack([prediction.fixed_point[name] for name in names], axis=1)
    if args.rounds * np.log(max(prediction.rho.max(), 1e-3)) < np.log(1e-10):
        assert np.allclose(last[converged], fixed[converged], atol=1e-6 * scale)

    result = {
        "agents": args.agents,
        "d": args.d,
        "plays": args.plays,
        "rounds": args.rounds,
        "estimated_peak_mib": sum(estimate.values()) / 2**20,
        "recorded_mib": trajectory.turns.nbytes / 2**20,
        **{f"{name}_s": seconds for name, seconds in phases.items()},
        "floor_s": t_floor,
        "play_over_floor": phases["play"] / t_floor,
        "rho_median": float(np.median(prediction.rho)),
        "converges": int(converged.sum()),
    }
    print(json.dumps(result, indent=1))
    print(
        f"{args.plays} simultaneous plays of {args.agents} agents (complete graph, d = {args.d}), "
        f"{args.rounds} rounds: play {phases['play']:.2f} s = {phases['play'] / t_floor:.1f}x "
        f"the bare numpy loop ({t_floor:.3f} s, nothing recorded); setup "
        f"{phases['setup']:.2f} s, predict {phases['predict']:.2f} s; "
        f"{result['recorded_mib']:.0f} MiB recorded, estimated peak "
        f"{result['estimated_peak_mib']:.0f} MiB"
    )
    return result


if __name__ == "__main__":
    main()
