"""What the commands share: loading a configuration, the language-model session and
its budget, fitting and predicting, one-line errors, and writing a run directory."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from misalign.cli.options import STORE
from misalign.config import ConfigError, PlayConfig, load_config
from misalign.runtime.files import atomic_write, reason, refuse_symlinks
from misalign.runtime.progress import stage
from misalign.runtime.text import plural


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
    from misalign.api import setup

    config = _load(path, overrides)
    _check_flags(config, session or {})
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


def _check_flags(config: PlayConfig, session: dict[str, Any]) -> None:
    """Refuse, before the store is opened, the language-model flags that cannot apply:
    ``--replay``, ``--refresh`` or ``--fork-at`` on a configuration without a language-model
    agent, and ``--fork-at K`` past the play's rounds (K from 1 to ``rounds``: the rounds
    before K, counted from 0, come from the store, the rest are asked). One line, exit 2.

    Args:
        config: the play's configuration.
        session: the ``Session`` keyword arguments from the flags (``_session``).
    """
    mode, fork_at = session.get("mode", "live"), session.get("fork_at")
    flag = "--fork-at" if fork_at is not None else f"--{mode}" if mode != "live" else None
    if flag and not any(a.kind == "llm" for a in config.agents.values()):
        _fail(f"{flag}: applies to language-model agents (kind = 'llm'); this play has none")
    if fork_at is not None and fork_at > config.rounds:
        _fail(
            f"--fork-at {fork_at}: must be from 1 to rounds = {config.rounds} (the play's rounds "
            f"before K come from the store; K = {config.rounds} takes all of them)"
        )


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
    from misalign.llm import language_models

    agents = language_models(game)
    if not agents or not _tty():
        yield
        return
    from misalign.runtime.progress import progress_bar

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
    from misalign.llm import language_models

    agents = language_models(game)
    if agents:
        next(iter(agents.values())).session.close()


def _fit(game):
    """Fit the black-box agents' maps, with a bar of the language models' answers."""
    from misalign.api import fit
    from misalign.model.agent import black_boxes

    if not black_boxes(game.agents):
        return None
    from misalign.llm.fit import most_answers

    with _asking(game, most_answers(game), "fitting"):
        return fit(game)


def _tty() -> bool:
    """Progress goes to stderr, and only where someone watches it."""
    return sys.stderr.isatty()


def _fail(message: str) -> None:
    """One line on stderr (control characters from outside written as escapes), exit 2."""
    from misalign.runtime.text import printable

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
        _fail(f"--out {out}: cannot write {exc.filename} ({reason(exc)})")


def _config_toml(config: Any) -> str:
    import tomli_w

    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def _publish(
    out: Path, config: Any, stem: str, result: dict[str, Any], plot, json_out: bool
) -> Path | None:
    """Write the run directory ``out`` whole (``_written``): ``config.toml``, ``stem.json`` and
    the figure ``stem.png`` (drawn by ``plot(path)``); print the JSON when asked. Returns the
    figure's path, or ``None`` once the JSON is printed."""
    from misalign.outputs.report import to_json

    texts = {"config.toml": _config_toml(config), f"{stem}.json": to_json(result, indent=1)}
    figure = _written(out, texts, f"{stem}.png", plot)
    if json_out:
        print(to_json(result))
        return None
    return figure


def _artifacts(
    config: PlayConfig,
    out: Path | None,
    report: dict[str, Any],
    name: str,
    figure: str | None = None,
    draw=None,
) -> tuple[Path, Path | None]:
    """Write the resolved config, the JSON report ``name`` and the figure ``figure`` (drawn by
    ``draw(path)``, when given) into ``out`` or ``runs/<config hash>``, whole (``_written``).

    Returns:
        The run directory, and the figure's path in it (``None`` without one).
    """
    from misalign.outputs.report import to_json

    out = Path("runs") / config.digest() if out is None else out
    texts = {"config.toml": _config_toml(config), name: to_json(report, indent=1)}
    return out, _written(out, texts, figure, draw)


def _written(out: Path, texts: dict[str, str], figure: str | None = None, draw=None) -> Path | None:
    """Write the run directory ``out`` whole or not at all
    (``misalign.runtime.files.write_directory``:
    in a temporary directory, then renamed into place): each ``name: text`` of ``texts``, and
    the figure ``figure`` drawn by ``draw(path)``. A symbolic link at or in ``out``, or a disk
    error (a full disk, a read-only file system, no permission), is one line naming the path,
    exit 2, and leaves ``out`` as it was.

    Returns:
        The figure's path in ``out`` (``None`` without one).
    """
    from misalign.runtime.files import write_directory

    files = {name: lambda path, text=text: path.write_text(text) for name, text in texts.items()}
    if figure is not None:
        files[figure] = draw
    try:
        write_directory(out, files)
    except ConfigError as exc:
        _fail(str(exc))
    return None if figure is None else out / figure


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
    from misalign.api import predict

    size = len(game.schedule.agents) * game.start.shape[1]
    plays = len(game.configs)
    what = f"predicting: {size} x {size} round map" + (f" of {plays} plays" if plays > 1 else "")
    with stage(what, _tty()):
        return predict(game)


def _nothing_succeeded(why: str) -> None:
    """Exit 1 with one line on stderr: the command ran, but nothing it was asked for succeeded
    (the files it wrote stay)."""
    print(f"misalign: {why}", file=sys.stderr)
    raise typer.Exit(1)


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
