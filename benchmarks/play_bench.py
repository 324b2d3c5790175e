"""Benchmark: the batched play against a naive per-play loop and a bare batched loop (the floor).

All three compute the same alternating play of two affine agents
(``u = A_A v + c_A``, ``v = A_B u + c_B``) for ``plays`` independent plays.
The floor is the least any implementation must do: one batched matrix-vector
product and one add per turn, nothing recorded. The naive loop runs one play
at a time in Python on a subset and is scaled up linearly.

    python benchmarks/play_bench.py                 # 10^5 plays x 100 rounds x d = 10
    python benchmarks/play_bench.py --plays 1000    # a quick run
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from misalign.model.agent import AffineMap, GradientAgent
from misalign.model.play import Schedule, play


def prompts(plays: int, d: int, seed: int = 0) -> dict[str, tuple[np.ndarray, ...]]:
    """Per agent, random ``(Gamma, S, X^T y / n)`` with ``Gamma = 0.5 / |S| I``: a contraction."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("A", "B"):
        X = rng.standard_normal((plays, 2 * d, d))
        S = X.transpose(0, 2, 1) @ X / (2 * d)
        gamma = 0.5 / np.linalg.norm(S, 2, axis=(1, 2))[:, None, None] * np.eye(d)
        out[name] = (gamma, S, rng.standard_normal((plays, d)))
    return out


def agents(
    raw: dict[str, tuple[np.ndarray, ...]], plays: slice = slice(None)
) -> dict[str, GradientAgent]:
    """The gradient agents of ``raw``, holding the plays in ``plays``."""
    return {name: GradientAgent(name, *(a[plays] for a in arrays)) for name, arrays in raw.items()}


def floor(maps, rounds: int, start: np.ndarray) -> np.ndarray:
    """The bare batched loop: same arithmetic by the play's own kernel (``AffineMap``'s
    product), nothing else."""
    f_A, f_B = (AffineMap(A, c) for A, c in maps)
    v = start
    for _ in range(rounds):
        v = f_B(f_A(v))
    return v


def naive(maps, rounds: int, start: np.ndarray) -> np.ndarray:
    """One play at a time, in Python."""
    (A_A, c_A), (A_B, c_B) = maps
    out = np.empty_like(start)
    for b in range(start.shape[0]):
        v = start[b]
        for _ in range(rounds):
            u = A_A[b] @ v + c_A[b]
            v = A_B[b] @ u + c_B[b]
        out[b] = v
    return out


def engine_per_play(singles: list[dict[str, GradientAgent]], rounds: int, d: int) -> np.ndarray:
    """The engine itself, one play at a time (what a loop over seeds would do)."""
    schedule = Schedule.build(["A", "B"])
    return np.stack(
        [play(one, schedule, rounds, np.zeros((1, d))).outputs("B")[-1, 0] for one in singles]
    )


def best_of(repeats: int, fn, *args) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t)
    return min(times), result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plays", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--d", type=int, default=10)
    parser.add_argument("--naive-plays", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    raw = prompts(args.plays, args.d)
    game = agents(raw)
    maps = [(game[n].affine().A, game[n].affine().c) for n in ("A", "B")]
    start = np.zeros((args.plays, args.d))
    schedule = Schedule.build(["A", "B"])

    t_floor, v_floor = best_of(args.repeats, floor, maps, args.rounds, start)
    t_play, trajectory = best_of(args.repeats, play, game, schedule, args.rounds, start)
    k = min(args.naive_plays, args.plays)
    t_naive_subset, v_naive = best_of(
        1, naive, [(A[:k], c[:k]) for A, c in maps], args.rounds, start[:k]
    )
    t_naive = t_naive_subset * args.plays / k
    singles = [agents(raw, slice(b, b + 1)) for b in range(k)]
    t_engine_subset, v_engine = best_of(1, engine_per_play, singles, args.rounds, args.d)
    t_engine = t_engine_subset * args.plays / k
    for v in (trajectory.outputs("B")[-1], v_naive, v_engine):
        assert np.allclose(v, v_floor[: len(v)], rtol=1e-10, atol=1e-12)

    result = {
        "plays": args.plays,
        "rounds": args.rounds,
        "d": args.d,
        "play_s": t_play,
        "floor_s": t_floor,
        "naive_s_extrapolated": t_naive,
        "engine_per_play_s_extrapolated": t_engine,
        "speedup_vs_naive": t_naive / t_play,
        "speedup_vs_engine_per_play": t_engine / t_play,
        "play_over_floor": t_play / t_floor,
    }
    print(json.dumps(result, indent=1))
    print(
        f"batched play: {t_naive / t_play:.0f}x faster than a hand-written numpy loop per play, "
        f"{t_engine / t_play:.0f}x faster than the engine run once per play, "
        f"{t_play / t_floor:.2f}x the time of the bare batched loop (floor; "
        f"the hand-written loop is {t_naive / t_floor:.0f}x the floor)"
    )
    return result


if __name__ == "__main__":
    main()
