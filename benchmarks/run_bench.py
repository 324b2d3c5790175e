"""Benchmark: what a user waits for in ``misalign run CONFIG --seeds N``, end to end, against a
floor timed in the same run, with the peak memory.

The end-to-end time is the real command in a child process: start-up, the prompts and
agents, the prediction, the play and its measurements, the report and the figure, all written
to disk; its peak memory is the child's maximum resident set (``wait4``). Each phase is also
timed in-process through the Python API. The floor is the least any tool must do for the same
plays: the bare loop of the same turn maps over the same rounds (``A w + c`` by the play's own
batched product), nothing recorded or measured, nothing set up (the maps are
built outside the timing); timed over the whole batch and in the run's chunks, the faster
taken.

The fixed cost is the same command on ``FEW`` plays with the same ``--record`` (and device):
start-up and imports, the report's own play, the figure, the files; what a run of any size
pays. ``rest_over_floor`` is the rest of the end-to-end time (end to end less the fixed cost)
over the floor: the cost of the batch itself. Whenever the fixed cost exceeds the floor, the
end to end exceeds twice the floor, whatever the batch costs.

    python benchmarks/run_bench.py                # the three sizes below
    python benchmarks/run_bench.py --seeds 100000 --config examples/two_agents.toml
    python benchmarks/run_bench.py --device cuda --seeds 10000000 --config benchmarks/large.toml

With ``--device``, the command runs with ``--device`` (torch, float64) and the floor is the
bare loop of the same maps as torch tensors on that device (``bmm``, the play's product
there), built in the run's chunks and as one batch where it fits, the faster taken.

Sizes by default: 10^4 and 10^5 plays of ``examples/two_agents.toml`` (300 rounds, d = 4) and
10^6 plays of ``benchmarks/large.toml`` (100 rounds, d = 10), each with the record ``run``
chooses by size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from misalign import ConfigError, load_config
from misalign.api import setup
from misalign.outputs.batch import batch_report, measured
from misalign.outputs.plot import plot_measured
from misalign.outputs.report import report, to_json
from misalign.runtime.device import resolve
from misalign.workflows import batch as batch_
from misalign.workflows.batch import choose, stream, threads

ROOT = Path(__file__).resolve().parents[1]
SIZES = [
    (ROOT / "examples" / "two_agents.toml", 10**4),
    (ROOT / "examples" / "two_agents.toml", 10**5),
    (ROOT / "benchmarks" / "large.toml", 10**6),
]
FEW = 2
"""Plays of the fixed-cost run."""


def bare_loop(game, rounds: int) -> float:
    """Seconds of the bare loop of the game's turn maps: one product and one add per turn, by
    the play's own kernel (``AffineMap.__call__``: ``einsum`` up to ``d = 16``, the fastest of
    numpy's batched products there, ``matmul`` above; ``bmm`` on a torch device, waited
    for)."""
    maps = [game.agents[name].affine() for name, _ in game.schedule.turns]
    last = {name: game.start for name in game.schedule.agents}
    _wait(game.start)
    started = time.perf_counter()
    for _ in range(rounds):
        for (name, reads), f in zip(game.schedule.turns, maps, strict=True):
            last[name] = f(last[reads])
    _wait(game.start)
    return time.perf_counter() - started


def _wait(x) -> None:
    """Wait for a GPU's queued work (nothing for numpy or torch on the CPU)."""
    if not isinstance(x, np.ndarray) and x.device.type == "cuda":
        import torch

        torch.cuda.synchronize(x.device)


def floor(config, seeds: range, device=None) -> float:
    """The floor on one thread: the bare loop over the whole batch (when its maps fit in
    1 GiB, 8 GiB on a GPU, and it can be set up at once) and in the run's chunks; the
    faster."""
    size = batch_.chunk_size(device)
    chunked = sum(
        bare_loop(setup(config, seeds=seeds[k : k + size], device=device), config.rounds)
        for k in range(0, len(seeds), size)
    )
    fits = 2**33 if device is not None and device.type == "cuda" else 2**30
    if len(seeds) * len(config.order) * config.d * (config.d + 1) * 8 > fits:
        return chunked
    try:
        whole = setup(config, seeds=seeds, device=device)
    except (ConfigError, MemoryError, RuntimeError):  # the batch does not fit at once
        return chunked
    return min(chunked, bare_loop(whole, config.rounds))


def threaded_floor(config, seeds: range, workers: int) -> float:
    """The floor on the run's threads: the bare loops of ``workers`` chunks at once, wave
    after wave (each wave's maps built outside the timing), wall time."""
    size, total = workers * batch_.CHUNK, 0.0
    with ThreadPoolExecutor(workers) as pool:
        for first in range(0, len(seeds), size):
            games = [
                setup(config, seeds=seeds[k : k + batch_.CHUNK])
                for k in range(first, min(first + size, len(seeds)), batch_.CHUNK)
            ]
            started = time.perf_counter()
            list(pool.map(lambda game: bare_loop(game, config.rounds), games))
            total += time.perf_counter() - started
    return total


def end_to_end(
    config_path: Path, seeds: int, out: str, device=None, record: str | None = None
) -> tuple[float, float]:
    """The real command in a child process (with ``--record`` when given): seconds, and its
    peak resident memory in GiB."""
    command = [sys.executable, "-m", "misalign.cli", "run", str(config_path)]
    command += ["--seeds", str(seeds), "--out", out]
    command += [] if device is None else ["--device", str(device)]
    command += [] if record is None else ["--record", record]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode == 0, child.stderr.read().decode()
    return seconds, usage.ru_maxrss * 1024 / 2**30


def phases(config, seeds: range, out: Path, device=None) -> dict[str, float]:
    """Seconds per phase in-process, as ``run`` does them for this size's record."""
    record = choose(config, len(seeds), streamed=device is not None)
    times: dict[str, float] = {}
    if record.mode == "all":
        from misalign.api import predict, simulate

        clock = time.perf_counter()
        game = setup(config, seeds=seeds)
        times["setup"] = time.perf_counter() - clock
        clock = time.perf_counter()
        trajectory = simulate(game)
        times["play"] = time.perf_counter() - clock
        clock = time.perf_counter()
        prediction = predict(game)
        times["predict"] = time.perf_counter() - clock
        clock = time.perf_counter()
        m = measured(game, prediction, trajectory)
        times["measure"] = time.perf_counter() - clock
        clock = time.perf_counter()
        result = report(game, prediction, trajectory)
    else:
        from misalign.api import simulate

        streamed = stream(config, seeds, record, phases=times, device=device)
        m = streamed.measured
        clock = time.perf_counter()
        result = report(streamed.first, streamed.prediction, simulate(streamed.first))
    result["batch"] = batch_report(m, np.arange(seeds.start, seeds.stop), str(record))
    (out / "run.json").write_text(to_json(result, indent=1))
    times["report"] = time.perf_counter() - clock
    clock = time.perf_counter()
    plot_measured(m, out / "trajectory.png")
    times["figure"] = time.perf_counter() - clock
    times["record"] = str(record)  # type: ignore[assignment]
    return times


def measure_size(config_path: Path, seeds: int, device=None) -> dict:
    config = load_config(config_path)
    span = range(config.seed, config.seed + seeds)
    record = choose(config, seeds, streamed=device is not None)
    chunk = batch_.chunk_size(device)
    workers = 1 if record.mode == "all" else threads(config, seeds, record, chunk)
    with tempfile.TemporaryDirectory() as out:
        seconds, peak = end_to_end(config_path, seeds, out, device)
        fixed, _ = end_to_end(config_path, FEW, str(Path(out) / "few"), device, str(record))
        one_thread = floor(config, span, device)
        threaded = workers > 1 and device is None  # a GPU's loop gains nothing from threads
        t_floor = threaded_floor(config, span, workers) if threaded else one_thread
        inside = phases(config, span, Path(out), device)
    return {
        "device": "numpy" if device is None else str(device),
        "config": config_path.name,
        "seeds": seeds,
        "rounds": config.rounds,
        "d": config.d,
        "record": inside.pop("record"),
        "threads": workers,
        "end_to_end_s": seconds,
        "peak_gib": peak,
        "floor_s": t_floor,
        "end_to_end_over_floor": seconds / t_floor,
        "floor_one_thread_s": one_thread,
        "end_to_end_over_one_thread_floor": seconds / one_thread,
        "fixed_s": fixed,
        "rest_over_floor": (seconds - fixed) / t_floor,
        **{f"{name}_s": value for name, value in inside.items()},
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--device", help="cuda, cuda:K or cpu: run --device, against torch")
    args = parser.parse_args(argv)
    sizes = SIZES if args.seeds is None else [(args.config or SIZES[0][0], args.seeds)]
    device = resolve(args.device)
    results = [measure_size(path, seeds, device) for path, seeds in sizes]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if device is not None and device.type == "cuda":
        import torch

        machine += f", {torch.cuda.get_device_name(device)}"
    print(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"), "runs": results}))
    for r in results:
        share = ", ".join(
            f"{k[:-2]} {v:.2f} s"
            for k, v in r.items()
            if k.endswith("_s")
            and k[:-2] not in ("end_to_end", "floor", "floor_one_thread", "fixed")
        )
        print(
            f"{r['config']} --seeds {r['seeds']} on {r['device']} (record {r['record']}, "
            f"{r['threads']} "
            f"thread(s)): {r['end_to_end_s']:.1f} s end to end, "
            f"{r['end_to_end_over_floor']:.2f}x the bare loop on as many threads "
            f"({r['floor_s']:.2f} s; {r['end_to_end_over_one_thread_floor']:.2f}x the loop on one, "
            f"{r['floor_one_thread_s']:.2f} s), peak {r['peak_gib']:.2f} GiB; fixed cost "
            f"({FEW} plays) {r['fixed_s']:.2f} s, the rest {r['rest_over_floor']:.2f}x the bare "
            f"loop; in-process (thread seconds): {share}"
        )
    return results


if __name__ == "__main__":
    main()
