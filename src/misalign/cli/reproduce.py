"""``misalign reproduce``: one registry entry, its figure, table and claims."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from misalign.cli.common import _fail, _os_problem, _refuse_symlinks
from misalign.cli.options import JsonOpt, QuickOpt, RunOutOpt, SeedsOpt, app
from misalign.config import ConfigError
from misalign.runtime.text import plural


@app.command("reproduce")
def reproduce(
    name: Annotated[
        str | None, typer.Argument(metavar="NAME", help="An experiment (see --list).")
    ] = None,
    list_: Annotated[
        bool,
        typer.Option(
            "--list", help="Each experiment, its claims and what each compares (measured/theory)."
        ),
    ] = False,
    quick: QuickOpt = False,
    seeds: SeedsOpt = None,
    out: RunOutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Reproduce one claim of docs/theory.md: run its experiment, write the figure, table,
    configuration, version and claims.json, and check every claim (exit 1 when one fails)."""
    from misalign.experiments import REGISTRY

    if list_:
        _list(REGISTRY.values(), json_out)
        return
    if name is None:
        _fail(f"name an experiment or give --list; known: {', '.join(REGISTRY)}")
    if name not in REGISTRY:
        _fail(f"unknown experiment {name!r}; known: {', '.join(REGISTRY)}")
    _reproduce(name, quick, seeds, out, json_out)


def _list(entries, json_out: bool) -> None:
    """Per entry: its name, full-run time, claim count and what each claim compares (one JSON
    object with ``--json``)."""
    entries = list(entries)
    if json_out:
        from misalign.outputs.report import to_json

        print(to_json({"experiments": [e.describe() for e in entries]}))
        return
    width = max(len(e.name) for e in entries)
    for entry in entries:
        count = plural(len(entry.compares), "claim")
        print(f"{entry.name:<{width}}  {entry.typical:>6}  {count:>9}  {entry.claim}")
        for k, what in enumerate(entry.compares, 1):
            only = "  (full run only)" if k > len(entry.compares) - entry.full_only else ""
            print(f"    {k:>2}. {what}{only}")


def _reproduce(name: str, quick: bool, seeds: int | None, out: Path | None, json_out: bool) -> None:
    """Run the registry entry ``name``, print its claims (or JSON), exit 1 when one fails."""
    from misalign.experiments import REGISTRY, default_out

    entry = REGISTRY[name]
    out = default_out(entry, quick, seeds) if out is None else out
    _refuse_symlinks(out)
    try:
        result = entry.run(quick, seeds, out)
    except OSError as exc:
        _fail(_os_problem(exc, out))
    except ConfigError as exc:  # an optional dependency missing
        _fail(str(exc))
    claims = [c.as_dict() for c in result.claims]
    if json_out:
        from misalign.outputs.report import to_json

        print(
            to_json(
                {"experiment": name, "out": str(out), "passed": result.passed, "claims": claims}
            )
        )
    else:
        for c in claims:
            verdict = "pass" if c["passed"] else "FAIL"
            bound = "at least" if c["at_least"] else "tolerance"
            print(f"{verdict}  {c['name']}: {c['measured']:.3g} ({bound} {c['tolerance']:.3g})")
        print(f"artifacts: {out}")
    if not result.passed:
        raise typer.Exit(1)
