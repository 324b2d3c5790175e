"""``misalign report``: one HTML page over run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from misalign.cli.common import _fail
from misalign.cli.options import app
from misalign.config import ConfigError
from misalign.runtime.text import plural


@app.command("report")
def report_command(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN_DIR...",
            help="Run directories (of reproduce, run, theory, design, attacks, sweep), or "
            "directories of them (e.g. runs/).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The HTML page to write.")] = Path(
        "report.html"
    ),
) -> None:
    """One static HTML page over runs: every claim's verdict (recomputed from its numbers) at
    the top, quick or full, the registry entries with no run; then per run its figure, claims
    or facts, configuration and table. No server, nothing loaded from outside."""
    from misalign.workflows.page import find_runs, load_runs, write

    try:
        runs = load_runs(find_runs(run_dirs))
    except ConfigError as exc:
        _fail(str(exc))
    try:
        write(runs, out)
    except ConfigError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"--out {out}: cannot write ({exc.strerror or type(exc).__name__})")
    passed, total = sum(r.passed for r in runs), sum(len(r.claims) for r in runs)
    passing = "claim passes" if total == 1 else "claims pass"
    claims = f", {passed} of {total} {passing}" if any(r.reproduced for r in runs) else ""
    wrong = sum(c["disagrees"] for r in runs for c in r.claims)
    if wrong:
        says = "says" if wrong == 1 else "say"
        claims += f"; {plural(wrong, 'verdict')} of claims.json {says} otherwise"
    print(f"report: {out} ({plural(len(runs), 'run')}{claims})")
