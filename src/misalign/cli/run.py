"""``misalign run``: play, predict, write the report and the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from misalign.cli.common import (
    _artifacts,
    _asking,
    _check_flags,
    _fail,
    _game,
    _load,
    _nothing_succeeded,
    _session,
    _solve,
    _tty,
)
from misalign.cli.options import (
    DEFAULT_MAX_REQUESTS,
    STORE,
    AllowHostOpt,
    ConfigArg,
    ForkOpt,
    JsonOpt,
    MaxCostOpt,
    MaxRequestsOpt,
    OutOpt,
    RefreshOpt,
    ReplayOpt,
    SetOpt,
    StoreOpt,
    app,
)
from misalign.cli.summary import _batch_summary, _console, _llm_usage, _summary
from misalign.runtime.errors import ConfigError
from misalign.runtime.progress import stage
from misalign.runtime.text import plural


@app.command()
def run(
    config: ConfigArg,
    seeds: Annotated[
        int,
        typer.Option(
            min=1, help="Play seeds seed .. seed+N-1 as one batch: quantiles, rho spread, figure."
        ),
    ] = 1,
    json_out: JsonOpt = False,
    out: OutOpt = None,
    set_: SetOpt = None,
    store: StoreOpt = STORE,
    replay: ReplayOpt = False,
    refresh: RefreshOpt = False,
    fork_at: ForkOpt = None,
    allow_host: AllowHostOpt = None,
    max_requests: MaxRequestsOpt = DEFAULT_MAX_REQUESTS,
    max_cost: MaxCostOpt = None,
    record: Annotated[
        str | None,
        typer.Option(
            help="With --seeds: keep every output ('all'), only the measurements with each "
            "agent's distance every K rounds ('every K'), or none per round ('last').",
            show_default="by size",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Threads for a batch kept as measurements (--record 'every K' or last): "
            "chunks of plays at once.",
            show_default="all cores the memory holds",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="With --seeds: set up, play and measure the batch with torch on this device "
            "(cuda, cuda:K, or cpu), in float64, equal to numpy's within rounding; needs "
            "the train extra.",
            show_default="numpy on the CPU",
        ),
    ] = None,
) -> None:
    """Simulate the play and predict its equilibrium; figure, config and report.

    Language-model agents are fitted first (probes) and every answer is recorded in --store:
    a re-run reads it first, --replay never asks the server."""
    from misalign.runtime.device import resolve
    from misalign.workflows.batch import Record, choose, streamable

    session = _session(store, replay, refresh, fork_at, allow_host, max_requests, max_cost)
    try:
        asked = None if record is None else Record.parse(record)
        if seeds > 1:
            cfg = _load(config, set_)
            chosen = choose(cfg, seeds, asked, streamed=device is not None)
        elif asked is not None or device is not None:
            flag = "--record" if asked is not None else "--device"
            raise ConfigError(f"{flag} applies to a batch (--seeds N with N > 1)")
        streamed = seeds > 1 and chosen.mode != "all"
        if device is not None and not streamed:
            why = streamable(cfg)
            raise ConfigError(
                f"--device: {why}; such plays are recorded whole, on numpy"
                if why
                else "--device applies to a batch kept as measurements (--record 'every K' "
                "or last); this run records every output"
            )
        where = resolve(device)
        if workers is not None and not streamed:
            raise ConfigError(
                "--workers applies to a batch kept as measurements (--seeds N with --record "
                "'every K' or last); this run records every output"
            )
    except ConfigError as exc:
        _fail(str(exc))
    if streamed:
        return _streamed(cfg, seeds, chosen, workers, where, json_out, out, session)
    _recorded(config, set_, seeds, json_out, out, session)


def _recorded(config, set_, seeds, json_out, out, session) -> None:
    """``run`` with every output recorded: fit, play the batch at once, predict, report."""
    from misalign.api import simulate
    from misalign.llm import language_models
    from misalign.model.agent import black_boxes
    from misalign.outputs.batch import batch_report, measured
    from misalign.outputs.plot import plot_measured, plot_play
    from misalign.outputs.report import report

    cfg, game = _game(config, set_, seeds, session)

    def played(fits):
        long = cfg.rounds * len(cfg.agents) * seeds > 2e4
        asked = cfg.rounds * seeds * sum(cfg.order.count(n) for n in language_models(game))
        with _asking(game, asked, "playing"):
            return simulate(game, progress=_tty() and long and not fits)

    # the prediction after the play is of the regime each agent ended in
    fits, trajectory, prediction = _solve(game, played)
    with stage("writing the report and the figure", _tty()):
        result = report(game, prediction, trajectory, fits=fits)
        if seeds > 1:
            m = measured(game, prediction, trajectory)
            result["batch"] = batch_report(m, game.seeds, "all")
        also = None if fits is None else fits.global_prediction

        def draw(path: Path) -> Path:
            if seeds > 1:
                return plot_measured(m, path, fitted=bool(black_boxes(game.agents)))
            return plot_play(game, trajectory, prediction, path, also=also)

        directory, figure = _artifacts(cfg, out, result, "run.json", "trajectory.png", draw)
    _told(result, seeds, json_out, directory, figure)


def _streamed(cfg, seeds, record, workers, device, json_out, out, session) -> None:
    """``run --seeds`` keeping only the measurements (``misalign.workflows.batch.stream``):
    the report's play is the first seed's, played alone."""
    from misalign.api import simulate
    from misalign.outputs.batch import batch_report
    from misalign.outputs.plot import plot_measured
    from misalign.outputs.report import report
    from misalign.workflows.batch import stream

    _check_flags(cfg, session)
    seeds_ = range(cfg.seed, cfg.seed + seeds)
    try:
        streamed = stream(cfg, seeds_, record, progress=_tty(), workers=workers, device=device)
    except ConfigError as exc:
        _fail(str(exc))
    with stage("writing the report and the figure", _tty()):
        result = report(streamed.first, streamed.prediction, simulate(streamed.first))
        result["batch"] = batch_report(
            streamed.measured, streamed.seeds, str(record), streamed.device
        )

        def draw(path: Path) -> Path:
            return plot_measured(streamed.measured, path)

        directory, figure = _artifacts(cfg, out, result, "run.json", "trajectory.png", draw)
    _told(result, seeds, json_out, directory, figure, streamed.workers, streamed.device)


def _told(
    result,
    seeds: int,
    json_out: bool,
    directory: Path,
    figure: Path | None,
    threads: int | None = None,
    device: str = "numpy",
) -> None:
    """Print the report (``--json``) or its summary; exit 1 when every play failed."""
    from misalign.outputs.report import to_json

    if json_out:
        print(to_json(result))
    elif seeds > 1:
        _batch_summary(result, directory, figure, threads, device)
        _llm_usage(_console(), result["llm"])
    else:
        _summary(result, directory, figure)
    if seeds > 1:
        failed = result["batch"]["observed"]["counts"]["failed"]
    else:
        failed = int(result["observed"]["class"] == "failed")
    if failed == seeds:  # a batch with some plays left is a result: its failures are listed
        _nothing_succeeded(f"every play failed ({plural(seeds, 'play')}; files in {directory})")
