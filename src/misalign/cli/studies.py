"""``misalign helper-study`` and ``misalign lsa-study``: thin aliases of the registry
entries ``helper`` and ``lsa`` with their own tables."""

from __future__ import annotations

from misalign.cli.options import JsonOpt, QuickOpt, RunOutOpt, SeedsOpt, app
from misalign.cli.reproduce import _reproduce


@app.command("helper-study")
def helper_study(
    quick: QuickOpt = False,
    seeds: SeedsOpt = None,
    out: RunOutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Alias of `misalign reproduce helper`: rounds to target with and without a Newton helper."""
    _reproduce("helper", quick, seeds, out, json_out)


@app.command("lsa-study")
def lsa_study(
    quick: QuickOpt = False,
    seeds: SeedsOpt = None,
    out: RunOutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Alias of `misalign reproduce lsa`: trained-LSA plays against the theory."""
    _reproduce("lsa", quick, seeds, out, json_out)
