"""``misalign sweep``: a grid or zip of configurations, in chunks, on joblib or Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from misalign.cli.common import _fail, _tty
from misalign.cli.options import JsonOpt, app
from misalign.cli.summary import _console
from misalign.config import ConfigError


@app.command("sweep")
def sweep_command(
    path: Annotated[
        Path, typer.Argument(metavar="SWEEP", help="Sweep TOML (see examples/sweeps/).")
    ],
    backend: Annotated[str, typer.Option(help="local (joblib worker processes) or ray.")] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray: join the running cluster at this address.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, show_default="all cores", help="Worker processes.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Finish a killed sweep: skip finished chunks.")
    ] = False,
    json_out: JsonOpt = False,
    out: Annotated[
        Path | None,
        typer.Option(
            show_default="runs/sweep-<hash>",
            help="Directory of the parquet rows, sweep.csv and sweep.png.",
        ),
    ] = None,
) -> None:
    """One batched play and its prediction per point of a grid of configuration overrides.

    Rows stream to a parquet dataset, one file per finished chunk of points; --resume
    finishes a killed sweep without recomputing finished chunks. At the end: a summary
    table, sweep.csv (every row) and sweep.png (rho, divergence, rounds over the axes)."""
    from misalign.workflows.sweep import (
        SweepStopped,
        check_backend,
        load_sweep,
        run_sweep,
        summary_line,
    )
    from misalign.workflows.sweep_view import write_views

    try:
        check_backend(backend, address)
        spec = load_sweep(path)
        out = Path("runs") / f"sweep-{spec.digest}" if out is None else out
        summary = run_sweep(spec, out, backend, workers, address, resume, progress=_tty())
        summary |= write_views(spec, Path(out), again=bool(summary["computed"]))
    except ConfigError as exc:
        _fail(str(exc))
    except SweepStopped as exc:  # not bad input: exit 1
        print(f"misalign: error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    if json_out:
        print(json.dumps(summary))
        return
    from rich.table import Table

    from misalign.workflows.sweep_view import cell

    shown = summary["table"]
    table = Table(*shown["columns"], title=shown["title"])
    for row in shown["rows"]:
        table.add_row(*map(cell, row))
    _console().print(table)
    print(summary_line(summary))
