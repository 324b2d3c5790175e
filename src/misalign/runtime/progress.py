"""Progress bars on stderr, so that ``--json`` stdout stays clean."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

from rich.progress import Progress, TextColumn


def progress_bar(
    total: int, description: str, done: int = 0, columns: Sequence[str] = (), **fields: Any
) -> Progress:
    """A started, transient progress bar with one task; call ``advance(bar.task_ids[0])``
    (or ``update`` with new ``fields``) per step and ``stop()`` at the end.

    Args:
        total: steps in all.
        description: the task's label.
        done: steps already taken (a resumed run).
        columns: extra text columns after the default ones, as rich templates such as
            ``"loss {task.fields[loss]:.4f}"``.
        fields: the initial values of the fields those templates read.
    """
    extra = [TextColumn(template) for template in columns]
    bar = Progress(*Progress.get_default_columns(), *extra, console=_stderr(), transient=True)
    bar.add_task(description, total=total, completed=done, **fields)
    bar.start()
    return bar


@contextmanager
def stage(description: str, show: bool = True) -> Iterator[None]:
    """A transient spinner on stderr, naming a step of unknown length while it runs."""
    if not show:
        yield
        return
    with _stderr().status(description):
        yield


@cache
def _stderr():
    """The one stderr console every bar and spinner shares, so that they nest (a bar inside a
    spinner shows below it) instead of drawing over each other."""
    from rich.console import Console

    return Console(stderr=True)
