"""Benchmark: what a user waits for in ``misalign run CONFIG --seeds N``, end to end, against a
floor measured in the same run.

The end-to-end time is the real command in a child process (start-up, setting up the prompts
and agents, the play, the prediction, the report and the figure, all written to disk). Each
phase is also timed in-process through the Python API. The floor is the least any tool must
do for the same plays: the bare batched matrix-vector loop of the same maps over the same
rounds, nothing recorded, nothing set up.

    python benchmarks/run_bench.py                   # examples/two_agents.toml, 10^4 seeds
    python benchmarks/run_bench.py --seeds 100000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from misalign import load_config
from misalign.api import predict, setup, simulate
from misalign.outputs.batch import batch
from misalign.outputs.plot import plot_batch
from misalign.outputs.report import report, to_json

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "two_agents.toml"


def floor(game, rounds: int) -> np.ndarray:
    """The bare batched loop of the game's turn maps: one matmul and one add per turn."""
    maps = [game.agents[name].affine() for name, _ in game.schedule.turns]
    last = {name: game.start for name in game.schedule.agents}
    for _ in range(rounds):
        for (name, reads), f in zip(game.schedule.turns, maps, strict=True):
            last[name] = (f.A @ last[reads][..., None])[..., 0] + f.c
    return last[game.schedule.agents[-1]]


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=EXAMPLE)
    parser.add_argument("--seeds", type=int, default=10_000)
    args = parser.parse_args(argv)

    config = load_config(args.config)
    seeds = range(config.seed, config.seed + args.seeds)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "misalign.cli", "run", str(args.config)]
        command += ["--seeds", str(args.seeds), "--json", "--out", out]
        end_to_end, done = timed(subprocess.run, command, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
        phases = {}
        phases["setup"], game = timed(setup, config, seeds)
        phases["play"], trajectory = timed(simulate, game)
        phases["predict"], prediction = timed(predict, game)

        def write() -> None:
            result = report(game, prediction, trajectory)
            result["batch"] = batch(game, prediction, trajectory)
            Path(out, "run.json").write_text(to_json(result, indent=1))

        phases["report"], _ = timed(write)
        phases["figure"], _ = timed(plot_batch, game, trajectory, prediction, Path(out, "t.png"))
    t_floor, v_floor = timed(floor, game, config.rounds)
    last = game.schedule.agents[-1]
    finite = trajectory.diverged_at < 0
    assert np.allclose(trajectory.outputs(last)[-1][finite], v_floor[finite], rtol=1e-9, atol=1e-12)

    result = {
        "seeds": args.seeds,
        "rounds": config.rounds,
        "d": config.d,
        "end_to_end_s": end_to_end,
        "floor_s": t_floor,
        "end_to_end_over_floor": end_to_end / t_floor,
        **{f"{name}_s": seconds for name, seconds in phases.items()},
        "play_over_floor": phases["play"] / t_floor,
    }
    print(json.dumps(result, indent=1))
    share = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items())
    print(
        f"misalign run --seeds {args.seeds}: {end_to_end:.1f} s end to end, "
        f"{end_to_end / t_floor:.0f}x the bare batched loop ({t_floor:.2f} s); in-process phases: "
        f"{share}; the play alone is {phases['play'] / t_floor:.2f}x the floor"
    )
    return result


if __name__ == "__main__":
    main()
