"""``misalign theory``: the prediction alone."""

from __future__ import annotations

from misalign.cli.common import _artifacts, _game, _nothing_succeeded, _session, _solve
from misalign.cli.options import (
    DEFAULT_MAX_REQUESTS,
    STORE,
    AllowHostOpt,
    ConfigArg,
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
from misalign.cli.summary import _summary, _unfitted


@app.command()
def theory(
    config: ConfigArg,
    json_out: JsonOpt = False,
    out: OutOpt = None,
    set_: SetOpt = None,
    store: StoreOpt = STORE,
    replay: ReplayOpt = False,
    refresh: RefreshOpt = False,
    allow_host: AllowHostOpt = None,
    max_requests: MaxRequestsOpt = DEFAULT_MAX_REQUESTS,
    max_cost: MaxCostOpt = None,
) -> None:
    """Predict the equilibrium, the rate and the residuals without playing.

    Language-model agents are fitted from probes first (recorded in --store).
    Writes config.toml (resolved) and theory.json into --out."""
    from misalign.outputs.report import report, to_json

    session = _session(store, replay, refresh, None, allow_host, max_requests, max_cost)
    cfg, game = _game(config, set_, session=session, rounds=0)
    fits, _, prediction = _solve(game)
    result = report(game, prediction, fits=fits)
    directory, _ = _artifacts(cfg, out, result, "theory.json")
    if json_out:
        print(to_json(result))
    else:
        _summary(result, directory, None)
    if _unfitted(result):
        _nothing_succeeded(f"no prediction: the fit of {', '.join(_unfitted(result))} failed")
