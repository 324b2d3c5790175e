"""``misalign attacks``: every attack against every defence over many seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from misalign.cli.common import _fail, _load, _publish, _tty
from misalign.cli.options import ConfigArg, JsonOpt, OutOpt, SetOpt, app
from misalign.cli.summary import _console
from misalign.config import ConfigError
from misalign.runtime.text import plural


@app.command()
def attacks(
    config: ConfigArg,
    seeds: Annotated[int, typer.Option(min=2, help="Plays per attack and defence.")] = 200,
    json_out: JsonOpt = False,
    out: OutOpt = None,
    set_: SetOpt = None,
) -> None:
    """Every attack against every defence over many seeds: table, figure, ROC."""
    from misalign.experiments.attack_study import plot_study, run_study, summary

    cfg = _load(config, set_)
    if len(cfg.agents) != 2:
        got = plural(len(cfg.agents), "agent")
        _fail(f"agents: the attack study needs a two-agent play (got {got})")
    kinds = {a.kind for a in cfg.agents.values()}
    if kinds != {"gd"}:
        _fail(f"agents: the attack study needs two gd agents (got {', '.join(sorted(kinds))})")
    try:
        cells, skipped = run_study(cfg, seeds=seeds, progress=_tty())
    except ConfigError as exc:  # sizes that cannot fit
        _fail(str(exc))
    result = summary(cells, skipped) | {"seeds": seeds, "config_hash": cfg.digest()}
    out = Path("runs") / cfg.digest() if out is None else out
    figure = _publish(
        out, cfg, "attacks", result, lambda path: plot_study(cells, cfg, path), json_out
    )
    if figure is None:
        return
    from rich.table import Table

    console = _console()
    table = Table(
        *ATTACK_COLUMNS,
        title=f"{seeds} seeds; distances are final distances to each agent's own target",
    )
    for row in result["rows"]:
        flagged = row.get("detection_rate", row.get("false_alarm_rate"))
        table.add_row(
            row["attack"],
            row["defence"],
            "diverged"
            if row["victim_distance_mean"] is None
            else f"{row['victim_distance_mean']:.3g} ± {row['victim_distance_std']:.2g}",
            "-"
            if row["attacker_distance_mean"] is None
            else f"{row['attacker_distance_mean']:.3g}",
            f"{row['attacker_exact_rate']:.0%}",
            "-" if flagged is None else f"{flagged:.1%}",
            "-"
            if row.get("rounds_to_detection_median") is None
            else f"{row['rounds_to_detection_median']:.0f}",
            "-" if "refusal_rate" not in row else f"{row['refusal_rate']:.0%}",
        )
    console.print(table)
    for attack, auc in result["roc_auc"].items():
        console.print(f"monitor ROC AUC, {attack} vs honest: {auc:.3f}")
    for attack, why in skipped.items():
        console.print(f"skipped {attack}: {why}")
    console.print(f"artifacts: {out} (figure {figure.name})")


ATTACK_COLUMNS = (
    *("attack", "defence", "victim distance (mean ± std)", "attacker distance"),
    *("attacker exact", "flagged", "median round flagged", "victim stopped reading"),
)
"""The columns of the ``attacks`` table (docs/attacks.md shows the same)."""
