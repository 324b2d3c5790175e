"""``misalign design``: changes computed from the theory, each re-simulated."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from misalign.cli.common import _fail, _load, _publish, _tty
from misalign.cli.options import ConfigArg, JsonOpt, SetOpt, app
from misalign.cli.summary import _console
from misalign.config import ConfigError


@app.command("design")
def design_command(
    config: ConfigArg,
    agent: Annotated[str, typer.Option("--agent", help="The agent to advise.")],
    examples: Annotated[
        int, typer.Option("--examples", min=1, max=100, help="K: in-context examples to add.")
    ] = 3,
    norm: Annotated[
        float | None,
        typer.Option("--norm", show_default="sqrt(tr Lambda_A)", help="The added examples' norm."),
    ] = None,
    seeds: Annotated[
        int, typer.Option(min=2, max=1000, help="Seeds of the random-example baseline.")
    ] = 20,
    json_out: JsonOpt = False,
    out: Annotated[
        Path | None,
        typer.Option(
            show_default="runs/design-<hash of config and options>",
            help="Directory for the artifacts.",
        ),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Advice from the theory for one agent, each item verified by re-simulating the change:
    the step scales that keep the play stable, the step scale of least residual, and the K
    examples that most reduce the agent's residual and its exposure to a decoy attack."""
    from misalign.runtime.progress import progress_bar
    from misalign.workflows.design import COLUMNS, advise, check, plot_design, table_rows

    if norm is not None and not (math.isfinite(norm) and norm > 0):
        _fail(f"--norm: must be a positive finite number (got {norm:g})")
    cfg = _load(config, set_)
    try:
        check(cfg, agent)
    except ConfigError as exc:
        _fail(str(exc))
    bar = progress_bar(1, "design: the configuration") if _tty() else None

    def stage_(what: str, done: int, total: int) -> None:
        if bar is not None:
            task, description = bar.task_ids[0], f"design: {what}"
            bar.update(task, description=description, completed=done, total=total, refresh=True)

    try:
        result = advise(cfg, agent, examples, norm, seeds, progress=stage_)
    except ConfigError as exc:
        _fail(str(exc))
    finally:
        if bar is not None:
            bar.stop()
    if out is None:  # named by everything that changes the advice
        import hashlib

        options = json.dumps([cfg.digest(), agent, examples, norm, seeds])
        out = Path("runs") / f"design-{hashlib.sha256(options.encode()).hexdigest()[:12]}"
    figure = _publish(out, cfg, "design", result, lambda path: plot_design(result, path), json_out)
    if figure is None:
        return
    from rich.table import Table

    console = _console()
    table = Table(*COLUMNS, title=f"advice for {agent}: predicted and simulated {agent} distance")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    console.print(f"artifacts: {out} (figure {figure.name})")
