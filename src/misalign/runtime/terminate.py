"""SIGTERM stops a command as Ctrl-C does.

Python's default SIGTERM ends the process at once: no ``finally`` runs, so a sweep's worker
processes are left to notice their parent is gone, loky's resource tracker removes joblib's
memory-mapping folders in ``/dev/shm`` with a "leaked folder objects" warning on stderr, and
a local Ray instance stops without its shutdown. The command line (``misalign.cli.main``) runs
every command under ``sigterm_as_interrupt``: there SIGTERM raises ``Terminated`` (a
``KeyboardInterrupt``) in the main thread, so the cleanup of Ctrl-C runs: the workers are shut
down, a sweep's finished chunks are kept, temporary files and directories are removed. The
command exits with ``EXIT`` (143: 128 + 15, what a shell reports of a process SIGTERM ended;
130 after Ctrl-C, 128 + 2). A second SIGTERM during that cleanup ends the process at once.
A sweep stopped so shuts joblib's executor down while loky's manager thread may still be
handing out work; what that thread then raises is dropped (``quiet_manager_thread``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT = 128 + signal.SIGTERM
"""The exit code of a command that SIGTERM stopped."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread where Ctrl-C raises ``KeyboardInterrupt``."""


class _Handler:
    """The SIGTERM handler (and Ctrl-C's, within ``deferred``): whether it is installed, has
    fired, and the signal it holds back until the end of a ``deferred`` block."""

    def __init__(self) -> None:
        self.active = False
        self.received = False
        self.deferred = False
        self.pending: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.deferred:
            self.pending = signal.SIGTERM if signum == signal.SIGTERM else self.pending or signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise terminated()


_HANDLER = _Handler()


def terminated() -> Terminated:
    """Note that SIGTERM stops the command (for ``exit_code``; a second SIGTERM then ends the
    process at once), also where another handler took it (Ray's, while it starts).

    Returns:
        The ``Terminated`` to raise.
    """
    _HANDLER.received = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread (nothing changes in
    another thread, where no handler can be set); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _HANDLER)
    _HANDLER.active, _HANDLER.received = True, False
    try:
        yield
    finally:
        _HANDLER.active = False
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block, SIGTERM and Ctrl-C wait: they stop the command as the block ends
    (``Terminated``, ``KeyboardInterrupt``), not inside it. For code that an exception at an
    arbitrary point would leave half done: a library starting worker processes and threads
    (joblib's executor, whose shutdown then fails on a thread not started yet). Only within
    ``sigterm_as_interrupt``, in the main thread; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or not _HANDLER.active:
        yield
        return
    previous = signal.signal(signal.SIGINT, _HANDLER)
    _HANDLER.deferred = True
    try:
        yield
    finally:
        _HANDLER.deferred = False
        signal.signal(signal.SIGINT, previous)
        pending, _HANDLER.pending = _HANDLER.pending, None
        if pending == signal.SIGTERM:
            raise terminated()
        if pending == signal.SIGINT:
            raise KeyboardInterrupt


def reclaim() -> None:
    """Take SIGTERM back after a library set its own handler (``ray.init`` sets one that
    exits with 15, and one that prints a stack trace), within ``sigterm_as_interrupt`` and
    until the first SIGTERM; elsewhere nothing."""
    main = threading.current_thread() is threading.main_thread()
    if main and _HANDLER.active and not _HANDLER.received:
        signal.signal(signal.SIGTERM, _HANDLER)


def exit_code(code: int) -> int:
    """The exit code of a command: ``EXIT`` where SIGTERM stopped it (the command line
    reports an interrupt as 130), else ``code``.

    Args:
        code: the code the command ended with.

    Returns:
        The code to exit with.
    """
    return EXIT if code == 130 and _HANDLER.received else code


MANAGER_THREAD = "ExecutorManagerThread"
"""The name of loky's executor manager thread (``_ExecutorManagerThread`` in joblib's
``externals/loky/process_executor.py``)."""


class _QuietManagerThread:
    """A ``threading.excepthook``: drops an exception raised in a thread named
    ``MANAGER_THREAD``, passes every other thread's to ``previous``."""

    def __init__(self, previous) -> None:
        self.previous = previous

    def __call__(self, args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name == MANAGER_THREAD:
            return
        self.previous(args)


def quiet_manager_thread() -> None:
    """From now on, drop what loky's executor manager thread raises, and only that: every
    other thread's exception goes to the ``threading.excepthook`` that was in place. For a
    sweep that an interrupt stops: closing joblib's generator shuts the executor down while
    the manager thread may still be handing out work, and it can then raise (a race in loky:
    ``KeyError`` in ``add_call_item_to_queue``) and print its traceback on stderr as the
    process exits. The hook stays in place (the thread may raise until the process ends);
    a second call changes nothing."""
    if not isinstance(threading.excepthook, _QuietManagerThread):
        threading.excepthook = _QuietManagerThread(threading.excepthook)
