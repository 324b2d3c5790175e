"""``misalign run``: play, predict, write the report and the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from misalign.cli.common import (
    _artifacts,
    _asking,
    _game,
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
) -> None:
    """Simulate the play and predict its equilibrium; figure, config and report.

    Language-model agents are fitted first (probes) and every answer is recorded in --store:
    a re-run reads it first, --replay never asks the server."""
    from misalign.api import simulate
    from misalign.llm import language_models
    from misalign.outputs.plot import plot_batch, plot_play
    from misalign.outputs.report import batch, report, to_json

    session = _session(store, replay, refresh, fork_at, allow_host, max_requests, max_cost)
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
            result["batch"] = batch(game, prediction, trajectory)
        also = None if fits is None else fits.global_prediction

        def draw(path: Path) -> Path:
            if seeds > 1:
                return plot_batch(game, trajectory, prediction, path)
            return plot_play(game, trajectory, prediction, path, also=also)

        directory, figure = _artifacts(cfg, out, result, "run.json", "trajectory.png", draw)
    if json_out:
        print(to_json(result))
    elif seeds > 1:
        _batch_summary(result, directory, figure)
        _llm_usage(_console(), result["llm"])
    else:
        _summary(result, directory, figure)
    if seeds > 1:
        failed = result["batch"]["observed"]["counts"]["failed"]
    else:
        failed = int(result["observed"]["class"] == "failed")
    if failed == seeds:  # a batch with some plays left is a result: its failures are listed
        _nothing_succeeded(f"every play failed ({plural(seeds, 'play')}; files in {directory})")
