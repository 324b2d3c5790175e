"""Progress bars on stderr, so that ``--json`` stdout stays clean."""

from __future__ import annotations

from collections.abc import Sequence
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
    from rich.console import Console

    extra = [TextColumn(template) for template in columns]
    bar = Progress(
        *Progress.get_default_columns(), *extra, console=Console(stderr=True), transient=True
    )
    bar.add_task(description, total=total, completed=done, **fields)
    bar.start()
    return bar
