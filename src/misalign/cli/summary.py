"""The console summaries: what a play, a batch and the language-model agents did, as
text (``--json`` prints the report instead)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from misalign.model.observe import COUNTED
from misalign.runtime.text import plural

R2 = ("r2", "r2_loo", "r2_play")
"""A fit's scores in the summary's table: in-sample, held out, on the play."""


def _summary(result: dict[str, Any], directory: Path, figure: Path | None) -> None:
    """A readable account of one play: verdict, rate, and per agent its predicted and final
    distance to its own target; numbers that are not finite print as such."""
    from rich.table import Table

    console = _console()
    p = result["prediction"]
    observed = result.get("observed")
    if observed is not None:
        console.print(_observed_line(result))
    black_box = bool(result["fit"])
    said = "predicted: " if observed is not None or black_box else ""
    if black_box:
        said = f"predicted from the {_which_fit(result)} fitted maps ({_confidence(result)}): "
    if p["converges"]:
        rounds = p["rounds_to_tol"]
        console.print(
            f"{said}converges (rho = {_num(p['rho'])} per round; about {rounds} "
            f"round{'s' if rounds != 1 else ''} to shrink the error by 1e-8)"
        )
    elif _unfitted(result):
        console.print(
            _alert(
                "no prediction",
                f": the fit of {', '.join(_unfitted(result))} failed "
                "(too few of its probes were answered)",
            )
        )
    elif black_box or (observed is not None and observed["class"] != "growing"):
        # a fitted map's rho, or a play that did not grow: the outputs are the verdict
        console.print(f"{said}no equilibrium it converges to (rho = {_num(p['rho'])} >= 1)")
    else:
        console.print(_alert(f"{said}diverges", f" (rho = {_num(p['rho'])})"))
    if p["depends_on_start"]:
        console.print(
            "the limit depends on start: some directions no prompt sees keep their start value"
        )
    if p["scope"]:
        console.print(f"the prediction {p['scope']}")
    agreement = result.get("agreement") or {}
    if agreement.get("holds") is False:
        worst = _farthest(agreement["gap"])
        console.print(
            _alert(
                "the play does not end at the prediction",
                f" ({worst}: {_num(agreement['gap'][worst], '.3g')} from it after "
                f"{plural(result['rounds_played'], 'round')}): no verdict on who reaches its "
                "target",
            )
        )
    played = "outputs" in result
    if played and p["converges"]:
        measured = result["rounds_to_prediction"]
        console.print(
            "measured: every output within 1e-8 of its prediction "
            + ("by the last round: no" if measured is None else f"from round {measured}")
        )
    if p["covariance"]:
        spread = ", ".join(
            f"{name} {_num(sum(row[i] for i, row in enumerate(sigma)) ** 0.5, '.3g')}"
            for name, sigma in p["covariance"].items()
        )
        console.print(f"sampled agents: stationary RMS spread of each output around it: {spread}")
    names = list(result["agents"])
    network = result["network"] if _is_network(result) else None
    pooled = network["distance"] if network and network["distance"] else None
    table = Table(
        "agent",
        "|target|",
        "predicted distance",
        *(["final distance"] * played),
        *(["limit to pooled LS"] * bool(pooled)),
    )
    for name in names:
        final = (result.get("distance") or {}).get(name)
        table.add_row(
            name,
            _norm(result["agents"][name]["target"]),
            "-" if p["distance"][name] is None else _num(p["distance"][name]),
            *(["-" if final is None else _num(final)] * played),
            *([_num(pooled.get(name))] if pooled else []),
        )
    console.print(table)
    if network:
        line = f"network: the outputs that feed back are {', '.join(network['feeds_back'])}"
        if network["spread"] is not None:
            line += (
                f"; the limits lie up to {_num(network['spread'], '.3g')} from their mean "
                "(0 at consensus); pooled LS = the least-squares solution of all prompts"
            )
        console.print(line)
    verdict = any(exact is not None for exact in p["on_target"].values())  # report decides
    if verdict and len(names) > 1:
        if p["one_sided"] is not None:
            console.print(
                f"one-sided: {p['one_sided']} ends exactly on target, the others are biased"
            )
        elif not any(p["on_target"].values()):
            finite = {n: x for n, x in p["distance"].items() if x is not None}
            if finite:
                best = min(finite, key=finite.get)
                console.print(f"biased equilibrium: {best} ends closest to its own target")
        for name, reason in p["why"].items():
            console.print(f"  {name} on target: {reason}")
    _llm_summary(console, result)
    if result["attack"] is not None:
        a = result["attack"]
        probes = f" after {a['probe_turns']} probe turns" if a.get("probe_turns") else ""
        console.print(f"attack: {a['agent']} attacks the agent it reads{probes}")
    if result["defence"] is not None:
        d = result["defence"]
        line = f"defence: {result['config']['defence']['method']}"
        if d["score"] is not None:
            flagged = "never" if d["flagged_at"] is None else f"at round {d['flagged_at']}"
            line += f"; partner flagged {flagged} (score {d['score']:.3g})"
        if d["refused_at"] is not None:
            line += f"; stopped reading it at round {d['refused_at']}"
        console.print(line)
    console.print(f"artifacts: {directory}" + (f" (figure {figure.name})" if figure else ""))


def _observed_line(result: dict[str, Any]):
    """The headline of a play: what its outputs did (``observed``, ``misalign.model.observe``),
    rounds counted from 0 as in the JSON."""
    observed = result["observed"]
    kind, tail = observed["class"], observed["tail"]
    span = "" if tail is None else f"rounds {tail[0]}..{tail[1]}"
    spread = ", ".join(
        f"{name} {_num(row['spread'], '.3g')}"
        for name, row in observed["agents"].items()
        if row["spread"] is not None
    )
    if kind == "fixed point":
        return f"observed: a fixed point (every output unchanged to 1e-6 over {span})"
    if kind == "cycle":
        return (
            f"observed: a cycle of period {observed['period']} ({span}; RMS spread of each "
            f"output around its mean: {spread})"
        )
    if kind == "bounded":
        return f"observed: bounded, not settled ({span}; RMS spread around the mean: {spread})"
    if kind == "failed":
        stop = result.get("failed_at")
        seed = result["config"]["seed"]
        failed = [
            f["agent"]
            for f in (result["llm"] or {}).get("failed", [])
            if f["seed"] == seed and f["kind"] == "play"
        ]
        who = f": {failed[0]} gave no answer" if failed else ""
        return _alert("observed: failed", f" at round {stop}{who}")
    stop = result.get("diverged_at")
    where = f" (outputs overflowed at round {stop})" if stop is not None else ""
    return _alert("observed: growing", where or " (|outputs| grew more than tenfold)")


def _which_fit(result: dict[str, Any]) -> str:
    """``local`` when some agent's prediction comes from its local fit, else ``global``."""
    return "local" if any(row["local"] for row in result["fit"].values()) else "global"


def _confidence(result: dict[str, Any]) -> str:
    """How far the fitted prediction can be trusted, per agent: was the model's answer at
    the predicted equilibrium checked, and the fit's held-out ``r2``."""
    parts = []
    for name, row in result["fit"].items():
        fit = row["local"] or row["global"]
        held = "-" if not _finite(fit["r2_loo"]) else _num(fit["r2_loo"], ".2f")
        parts.append(f"{name} {_verdict(row)}, held-out r2 {held}")
    return "; ".join(parts)


def _verdict(row: dict[str, Any]) -> str:
    """``confirmed``, ``not confirmed`` or ``not checked`` (``refits = 0``, or a reported
    prediction that names no equilibrium: no tolerance was set for it)."""
    if row["confirmed"] is None or not _finite(row["tolerance"]):
        return "not checked"
    return "confirmed" if row["confirmed"] else "not confirmed"


def _farthest(gap: dict[str, float | None]) -> str:
    """The agent whose final output lies farthest from its predicted limit.

    Args:
        gap: per agent, the distance (``None``, ``nan`` or ``inf``: not finite, the farthest).

    Returns:
        Its name (a gap of exactly 0 is the nearest, not the farthest).
    """
    return max(gap, key=lambda name: gap[name] if _finite(gap[name]) else math.inf)


def _is_network(result: dict[str, Any]) -> bool:
    """Three or more agents, simultaneous rounds or a weighted read: the summary then says
    who feeds back and how far each limit is from the pooled least-squares solution."""
    config = result["config"]
    weighted = any(isinstance(a.get("reads"), dict) for a in config["agents"].values())
    return len(config["agents"]) > 2 or config.get("schedule") == "simultaneous" or weighted


def _unfitted(result: dict[str, Any]) -> list[str]:
    """The language-model agents of the play whose global fit failed (no map)."""
    return [
        name
        for name, row in (result["fit"] or {}).items()
        if row["global"] is not None and not all(_finite(x) for x in row["global"]["c"])
    ]


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _llm_summary(console, result: dict[str, Any]) -> None:
    """Language-model agents: each fitted map (global and local) and the equilibrium it
    predicts against the observed play; what the requests cost; the plays that failed."""
    _fit_summary(console, result)
    _llm_usage(console, result["llm"])


def _fit_summary(console, result: dict[str, Any], title: str | None = None) -> None:
    """Each black-box agent's fitted maps (global and local) of the report's play: ``r2``
    in-sample, held out and on the play, the equilibrium they predict against the observed
    play, and whether the reported prediction was confirmed."""
    from rich.table import Table

    if result["fit"]:
        table = Table(
            "agent",
            "fit",
            "r2 in-sample",
            "r2 held out",
            "r2 on the play",
            "residual rms",
            "answers",
            "|equilibrium|",
            "gap",
            title=title,
        )
        for name, row in result["fit"].items():
            for key in ("global", "local"):
                fit = row[key]
                if fit is None:
                    continue
                label = key
                if key == "local":
                    label += f" ({plural(fit['iterations'], 'refit')})"
                table.add_row(
                    name,
                    label,
                    *(_num(fit[k], ".3f") if _finite(fit[k]) else "-" for k in R2),
                    "-" if not _finite(fit["rms"]) else _num(fit["rms"], ".3g"),
                    str(fit["probes"]),
                    _norm(fit["equilibrium"]),
                    "-" if fit["gap"] is None else _num(fit["gap"], ".3g"),
                )
        console.print(table)
        console.print(
            "r2 held out: each probe predicted by the fit to the others; on the play: the "
            "fit scored on the play's own inputs and answers; gap: |the play's mean output "
            "over its judged tail - the equilibrium that fit predicts|"
        )
        for name, row in result["fit"].items():
            if row["confirmed"] is None:
                continue
            if not _finite(row["tolerance"]):
                why = (
                    "the model was not asked at the input it names"
                    if result["prediction"]["converges"]
                    else "it names no equilibrium to ask the model at"
                )
                console.print(f"{name}: the reported prediction is not checked: {why}")
                continue
            verdict = "confirmed" if row["confirmed"] else "not confirmed"
            line = (
                f"{name}: the reported prediction is {verdict}: the model's answer at the input "
                f"it names is {_num(row['miss'], '.3g')} from the output it names "
                f"(tolerance {_num(row['tolerance'], '.3g')})"
            )
            if row["noise_allowed"] is False:
                line += (
                    "; one sample per probe at a temperature that is not 0: noise not allowed for"
                )
            console.print(line)


def _llm_usage(console, llm: dict[str, Any] | None) -> None:
    """What the language models' requests cost, and the plays that failed."""
    if llm:
        retries = ", ".join(f"{n} {k}" for k, n in sorted(llm["retries"].items())) or "none"
        cost = "" if llm["cost"] is None else f", ${llm['cost']:.4f}"
        console.print(
            f"language models: {plural(llm['requests'], 'request')}, "
            f"{plural(llm['cached'], 'answer')} from the "
            f"store, retries: {retries}; {llm['tokens_in']} + {llm['tokens_out']} tokens paid{cost}"
        )
        for failure in llm["failed"]:
            console.print(
                _alert(
                    "failed",
                    f": agent {failure['agent']}, seed {failure['seed']}, "
                    f"{failure['kind']} round {failure['round']}: {failure['why']}",
                )
            )


def _batch_summary(
    result: dict[str, Any],
    directory: Path,
    figure: Path,
    threads: int | None = None,
    device: str = "numpy",
) -> None:
    """A readable account of ``run --seeds``: one story over the batch, told as its figure
    draws it (converging plays by median and 10-90% quantiles; diverging ones named).

    With black-box agents (language models, transformers) the headline is what the plays
    did, judged from their outputs; the fitted maps' verdict follows as a prediction, and
    the fits of play 0 (the report's ``fit``) are shown with their ``r2`` and check."""
    from rich.table import Table

    console = _console()
    batch = result["batch"]
    black_box = bool(result["fit"])
    plays, good, seeds = batch["plays"], batch["converging"], batch["seeds"]
    rho = batch["rho"]
    counts, periods = batch["observed"]["counts"], batch["observed"]["periods"]
    seen = [f"{n} {COUNTED[kind]}" for kind, n in counts.items() if n]
    if periods:
        each = ", ".join(f"period {p}: {n}" for p, n in periods.items())
        seen = [f"{x} ({each})" if x.endswith(" cycling") else x for x in seen]
    observed = f"observed: {', '.join(seen)} (each play judged from its outputs)"
    rate = f"median {_num(rho['median'])}, range {_num(rho['min'])} .. {_num(rho['max'])}"
    span = f"{plays} plays (seeds {seeds[0]}..{seeds[-1]})"
    if black_box:
        console.print(f"{span}, {observed}")
        console.print(
            f"predicted from the fitted maps (a prediction, not an observation): {good} of "
            f"{plays} converge; fitted rho: {rate}"
        )
    else:
        console.print(f"{span}: {good} predicted to converge; rho: {rate}")
        console.print(observed)
    bad = batch["diverging_seeds"]
    if len(bad):
        shown = ", ".join(map(str, bad[:10])) + (
            f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        )
        console.print(
            f"{len(bad)} without a predicted limit (rho >= 1, or outputs that overflowed): "
            f"seeds {shown}"
        )
    if good:
        table = Table(
            "agent",
            "predicted distance",
            "final distance",
            "final, mean ± std",
            "max |final - predicted|",
            title=f"distance to own target over the {good} "
            + ("plays predicted to converge" if black_box else "converging plays")
            + ": median [10%, 90%]",
        )
        for name, row in batch["distance"].items():
            table.add_row(
                name,
                _band(row, "predicted"),
                _band(row, "simulated"),
                f"{_num(row['simulated_mean'])} ± {_num(row['simulated_std'], '.2g')}",
                _num(row["max_abs_error"], ".2g"),
            )
        console.print(table)
        measured = batch["rounds_to_prediction"]
        never = f"; never in {plural(measured['never'], 'play')}" if measured["never"] else ""
        if measured["median"] is not None:
            console.print(
                "measured: every output within 1e-8 of its prediction from round "
                f"{measured['median']:.0f} (median; max {measured['max']:.0f}){never}"
            )
        elif never:
            console.print(f"measured: no converging play gets within 1e-8 of its prediction{never}")
    for name, row in (batch["spread"] or {}).items():
        console.print(
            f"{name}: RMS distance of the final output from its predicted limit "
            f"{_num(row['observed'], '.3g')} observed, {_num(row['predicted'], '.3g')} predicted "
            "(stationary spread)"
        )
    if black_box:
        seed = result["config"]["seed"]
        _fit_summary(
            console,
            result,
            title=f"fitted maps of play 0 (seed {seed}; the report's fit is this play's)",
        )
        console.print(
            f"the fits and checks above are play 0's (seed {seed}); every play is fitted and "
            "checked on its own"
        )
    kept = batch.get("record")
    if kept and kept != "all":
        what = "no round" if kept == "last" else f"each agent's distance {kept} rounds"
        on = f" on {plural(threads, 'thread')}" if threads else ""
        on += f" with torch on {device}" if device != "numpy" else ""
        console.print(
            f"record {kept}: the plays ran in chunks{on}, measured as they played; kept {what}"
        )
    console.print(f"artifacts: {directory} (figure {figure.name})")


def _band(row: dict[str, Any], key: str) -> str:
    return f"{_num(row[f'{key}_median'])} [{_num(row[f'{key}_q10'])}, {_num(row[f'{key}_q90'])}]"


def _num(value: float | None, fmt: str = ".4g") -> str:
    """A number for the summary; ``None`` or NaN (``null`` in the JSON) prints as such."""
    return "not finite" if value is None or math.isnan(value) else format(value, fmt)


def _console():
    """A rich console on stdout, wide enough for the tables when stdout is not a terminal.

    It reads no markup and no emoji codes: every string it prints (model answers, agent
    names, paths, table cells and titles) appears as written, ``[/bold]`` and ``:smile:``
    included; styles come only from ``_alert``.
    """
    from rich.console import Console

    width = None if sys.stdout.isatty() else 160
    return Console(width=width, markup=False, emoji=False)


def _alert(label: str, rest: str):
    """A line that starts with ``label`` in bold red, followed by ``rest`` as plain text.

    Args:
        label: the warning (``diverges``, ``failed``).
        rest: the remainder of the line, which may hold text from outside (printed literally).

    Returns:
        The line as a ``rich.text.Text``.
    """
    from rich.text import Text

    return Text.assemble((label, "bold red"), rest)


def _norm(vector: list[float | None] | None) -> str:
    if vector is None:
        return "-"
    return _num(math.hypot(*vector) if None not in vector else None)
