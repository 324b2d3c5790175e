"""Progress bars on stderr, so that ``--json`` stdout stays clean."""

from __future__ import annotations

from rich.progress import Progress


def progress_bar(total: int, description: str) -> Progress:
    """A started, transient progress bar with one task; call ``advance(bar.task_ids[0])``
    per step and ``stop()`` at the end."""
    from rich.console import Console

    bar = Progress(console=Console(stderr=True), transient=True)
    bar.add_task(description, total=total)
    bar.start()
    return bar
