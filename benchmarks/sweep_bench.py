"""Benchmark: a sweep of the analytic two-agent play, on one process, on joblib workers over
every core and on a local Ray instance, and its end-to-end cost per play against a bare loop;
then one large batch, setup, play and prediction timed apart, against the bare play.

The sweep zips two axes over ``--points`` points: ``seed`` (10 apart, so no two points share a
play) and B's step scale drawn uniformly. Each point plays ``--seeds`` seeds of ``--rounds``
rounds at dimension ``--d`` through ``misalign.workflows.sweep`` (validation, setup, play,
prediction,
rows written to parquet). Points per second are given per backend and as ratios to the one
process. The bare loop is the least the same plays need: the agents' affine maps applied in
alternation, nothing recorded, for the plays of one point at a time (as the sweep batches
them) and for every play at once; its maps come from the first ``--floor-points`` points.
Every backend's rows are checked equal (``seconds`` aside).

The batch: ``--batch`` plays (seeds 0, 1, ...) of the same two agents at dimension
``--batch-d`` (``n = 2 d``, B rotated), ``--batch-rounds`` rounds, through
``misalign.api``: ``setup``, ``simulate`` (the bare play: every turn recorded) and
``predict``, in microseconds per play, best of ``--repeats`` runs (the first run, which
also faults in fresh memory, is reported apart), with the bare loop over the same maps.

    python benchmarks/sweep_bench.py                       # 10^4 points x 10 seeds x 100 rounds
    python benchmarks/sweep_bench.py --points 500          # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from misalign.api import predict, setup, simulate
from misalign.config import parse_config
from misalign.model.agent import AffineMap
from misalign.workflows.sweep import Sweep, parse_sweep, point_config, read_rows, run_sweep


def sweep(points: int, seeds: int, rounds: int, d: int, chunk: int) -> Sweep:
    """The benchmark's sweep (validated: that cost is timed apart)."""
    base = {
        "d": d,
        "rounds": rounds,
        "agents": {"A": {"n": 2 * d}, "B": {"n": 2 * d, "rotate": True}},
    }
    axes = {
        "seed": [seeds * i for i in range(points)],
        "agents.B.eta": {"uniform": [0.2, 1.0, points], "seed": 1},
    }
    return parse_sweep({"base": base, "seeds": seeds, "mode": "zip", "chunk": chunk, "axes": axes})


def timed_run(spec: Sweep, backend: str, workers: int, root: Path) -> tuple[float, list]:
    """Seconds of one run of ``spec`` into a fresh directory, and its rows without ``seconds``."""
    out = root / f"{backend}-{workers}"
    started = time.perf_counter()
    run_sweep(spec, out, backend=backend, workers=workers)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(out).to_pylist()]
    return seconds, rows


def floor_maps(spec: Sweep, points: int) -> list[tuple[np.ndarray, ...]]:
    """The affine maps ``(A_A, c_A, A_B, c_B)`` of the plays of the first ``points`` points,
    one tuple per point (batch axis: its seeds)."""
    maps = []
    for values in spec.points[:points]:
        config = point_config(spec.base, spec.axes, values)
        game = setup(config, seeds=range(config.seed, config.seed + spec.seeds))
        a, b = game.agents["A"].affine(), game.agents["B"].affine()
        maps.append((a.A, a.c, b.A, b.c))
    return maps


def bare(maps: tuple[np.ndarray, ...], rounds: int) -> np.ndarray:
    """The bare batched loop: ``u = A_A v + c_A``, ``v = A_B u + c_B`` by the play's own
    kernel (``AffineMap``'s product), nothing recorded."""
    A_A, c_A, A_B, c_B = maps
    f_A, f_B = AffineMap(A_A, c_A), AffineMap(A_B, c_B)
    v = np.zeros_like(c_A)
    for _ in range(rounds):
        v = f_B(f_A(v))
    return v


def batch_costs(plays: int, d: int, rounds: int, repeats: int) -> dict:
    """Microseconds per play of ``setup``, ``simulate`` and ``predict`` on one batch of
    ``plays`` plays, and of the bare loop over its maps: the best of ``repeats`` runs, and the
    first run apart."""
    config = parse_config(
        {
            "d": d,
            "rounds": rounds,
            "agents": {"A": {"n": 2 * d}, "B": {"n": 2 * d, "rotate": True}},
        }
    )
    runs = []
    for _ in range(repeats):
        times = {}
        started = time.perf_counter()
        game = setup(config, seeds=range(plays))
        times["setup"] = time.perf_counter() - started
        started = time.perf_counter()
        trajectory = simulate(game)
        times["simulate"] = time.perf_counter() - started
        started = time.perf_counter()
        predict(game)
        times["predict"] = time.perf_counter() - started
        a, b = game.agents["A"].affine(), game.agents["B"].affine()
        started = time.perf_counter()
        bare((a.A, a.c, b.A, b.c), rounds)
        times["bare_loop"] = time.perf_counter() - started
        del game, trajectory
        runs.append({k: v / plays * 1e6 for k, v in times.items()})

    def summary(us: dict) -> dict:
        total = us["setup"] + us["simulate"] + us["predict"]
        return {
            **{f"{k}_us": v for k, v in us.items()},
            "total_us": total,
            "total_over_simulate": total / us["simulate"],
            "total_over_bare_loop": total / us["bare_loop"],
        }

    best = {k: min(run[k] for run in runs) for k in runs[0]}
    return {
        "plays": plays,
        "d": d,
        "rounds": rounds,
        "repeats": repeats,
        **summary(best),
        "first_run": summary(runs[0]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--d", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=100, help="points per chunk")
    parser.add_argument("--floor-points", type=int, default=500)
    parser.add_argument(
        "--backends", default="one,local,ray", help="any of one, local, ray (comma-separated)"
    )
    parser.add_argument("--batch", type=int, default=20_000, help="plays of the large batch")
    parser.add_argument("--batch-d", type=int, default=10)
    parser.add_argument("--batch-rounds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the large batch")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    wanted = args.backends.split(",")

    started = time.perf_counter()
    spec = sweep(args.points, args.seeds, args.rounds, args.d, args.chunk)
    validate_s = time.perf_counter() - started

    seconds: dict[str, float] = {}
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "one" in wanted:
            seconds["one"], rows["one"] = timed_run(spec, "local", 1, root)
        if "local" in wanted:
            seconds["local"], rows["local"] = timed_run(spec, "local", cores, root)
        if "ray" in wanted:
            try:
                import ray
            except ImportError:
                ray = None
            if ray is not None:
                ray.init(num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1")
                try:
                    seconds["ray"], rows["ray"] = timed_run(spec, "ray", cores, root)
                finally:
                    ray.shutdown()
    first = next(iter(rows.values()))
    assert all(r == first for r in rows.values()), "backends disagree"
    assert sum(r["error"] is not None for r in first) == 0

    maps = floor_maps(spec, min(args.floor_points, args.points))
    plays = len(maps) * args.seeds
    t = time.perf_counter()
    for m in maps:
        bare(m, args.rounds)
    per_point_floor = (time.perf_counter() - t) / plays
    stacked = tuple(np.concatenate([m[k] for m in maps]) for k in range(4))
    t = time.perf_counter()
    bare(stacked, args.rounds)
    batched_floor = (time.perf_counter() - t) / plays

    total_plays = args.points * args.seeds
    rate = {name: args.points / s for name, s in seconds.items()}
    per_play = seconds["one"] / total_plays if "one" in seconds else None
    result = {
        "points": args.points,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "d": args.d,
        "chunk": args.chunk,
        "cores": cores,
        "validate_s": validate_s,
        "seconds": seconds,
        "points_per_s": rate,
        "ratio_to_one_process": {n: r / rate["one"] for n, r in rate.items()}
        if "one" in rate
        else None,
        "end_to_end_per_play_s": per_play,
        "bare_loop_per_play_s": {"per_point_batch": per_point_floor, "one_batch": batched_floor},
        "end_to_end_over_bare": {
            "per_point_batch": per_play / per_point_floor,
            "one_batch": per_play / batched_floor,
        }
        if per_play is not None
        else None,
    }
    result["batch"] = batch = batch_costs(args.batch, args.batch_d, args.batch_rounds, args.repeats)
    print(json.dumps(result, indent=1))
    if per_play is not None:
        ratios = ", ".join(f"{n} {r:.2f}x" for n, r in result["ratio_to_one_process"].items())
        print(
            f"{args.points} points ({total_plays} plays): {rate['one']:.0f} points/s on one "
            f"process; {ratios} on {cores} cores; validating took {validate_s:.2g} s. End to "
            f"end {per_play * 1e6:.0f} us per play (one process), "
            f"{result['end_to_end_over_bare']['per_point_batch']:.1f}x the bare loop over "
            f"one point's {args.seeds} plays, "
            f"{result['end_to_end_over_bare']['one_batch']:.0f}x over all plays in one batch"
        )
    print(
        f"A batch of {batch['plays']} plays (d = {batch['d']}, {batch['rounds']} rounds), best of "
        f"{batch['repeats']}: setup {batch['setup_us']:.1f} us, play {batch['simulate_us']:.1f} "
        f"us, prediction {batch['predict_us']:.1f} us per play; setup + play + prediction "
        f"{batch['total_us']:.1f} us, {batch['total_over_simulate']:.2f}x the bare play, "
        f"{batch['total_over_bare_loop']:.2f}x the bare loop ({batch['bare_loop_us']:.1f} us). "
        f"First run: {batch['first_run']['total_us']:.1f} us, "
        f"{batch['first_run']['total_over_simulate']:.2f}x its play"
    )
    return result


if __name__ == "__main__":
    main()
