"""The command-line application and the options its commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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


QuickOpt = Annotated[bool, typer.Option("--quick", help="The small variant (seconds).")]


SeedsOpt = Annotated[int | None, typer.Option(min=1, help="Seeds per point.")]


RunOutOpt = Annotated[
    Path | None,
    typer.Option(show_default="runs/<name>-<config hash>", help="Directory for the run."),
]
