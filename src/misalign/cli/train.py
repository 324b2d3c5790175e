"""``misalign train``: train an agent (a linear self-attention layer) on in-context
regression, with checkpoints and ``--resume``."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from misalign.cli.common import _config_toml, _fail, _save
from misalign.cli.options import ConfigArg, JsonOpt, SetOpt, app
from misalign.config import ConfigError
from misalign.runtime.text import plural


class Model(StrEnum):
    """The models ``misalign train`` trains."""

    lsa = "lsa"
    transformer = "transformer"


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
    model: Annotated[
        Model | None,
        typer.Option(help="The model to train (the configuration's model; default lsa)."),
    ] = None,
) -> None:
    """Train an in-context regression model (model = "lsa" or "transformer").

    Checkpointed atomically and resumable (--resume); writes config.toml and
    checkpoint.pt into --out."""
    from misalign.config import load_train_config

    try:
        overrides = [*(set_ or ()), *([f'model="{model.value}"'] if model else [])]
        cfg = load_train_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    from misalign.runtime.optional import require_torch

    try:
        require_torch("misalign train")
    except ConfigError as exc:
        _fail(str(exc))
    from misalign.agents.train import check_memory, pick_device, train  # torch: a valid config only

    try:  # before anything is written: a refused run leaves no directory behind
        check_memory(cfg, pick_device(cfg.device))
    except ConfigError as exc:
        _fail(str(exc))
    out = Path("runs") / f"train-{cfg.digest()}" if out is None else out
    _save(out, {"config.toml": _config_toml(cfg)})

    def report(e) -> None:
        if not json_out and e.curve is not None:
            print(f"step {e.step}: {_against_baselines(e.__dict__, cfg.n)}", file=sys.stderr)
        elif not json_out:
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
        print(_trained(cfg.steps, summary, cfg.n))
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


def _against_baselines(evaluation: dict[str, Any], n: int) -> str:
    """A transformer's held-out loss at ``n`` examples beside Garg et al.'s baselines'."""
    ratio = evaluation["loss"] / evaluation["reference_loss"]
    averaging = evaluation["curve"]["averaging"][n]
    return (
        f"held-out ICL loss at n = {n} {evaluation['loss']:.4f}: {ratio:.2f}x least squares "
        f"({evaluation['reference_loss']:.4f}; ridge {evaluation['optimal_loss']:.4f}, "
        f"averaging {averaging:.4f}, on the same prompts)"
    )


def _trained(steps: int, summary: dict[str, Any], n: int) -> str:
    """The closing line of ``misalign train``."""
    final = summary["final"]
    line = (
        f"trained {plural(steps, 'step')} ({summary['steps_run']} this run, "
        f"{summary['seconds']:.1f} s, {summary['steps_per_second']:.0f} step/s): "
    )
    if final["curve"] is not None:
        return line + f"{_against_baselines(final, n)}; checkpoint {summary['checkpoint']}"
    line += (
        f"held-out ICL loss {final['loss']:.4f} "
        f"(Gamma* on the same tasks {final['reference_loss']:.4f})"
    )
    if final["gamma_loss"] is not None:
        excess = final["gamma_loss"] / final["optimal_loss"] - 1
        line += (
            f", exact loss of the learned Gamma {final['gamma_loss']:.5f} against the optimum "
            f"{final['optimal_loss']:.5f} ({excess:+.3%})"
        )
    return line + f"; checkpoint {summary['checkpoint']}"
