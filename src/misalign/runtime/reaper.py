"""Nothing outlives a killed sweep: a watchdog process that ends what the sweep started.

A local Ray instance started by ``misalign sweep --backend ray`` is a tree of processes
(GCS, raylet, workers, and agents that the raylet starts). When the sweep is killed with
SIGKILL, Ray's own fate-sharing stops the raylet, but its DashboardAgent and RuntimeEnvAgent
live on. So the sweep starts this watchdog (``Reaper``): a small child process that, while
the sweep lives, notes every process below it (``/proc``, each with its start time, so a
reused PID is never taken for it), and when the sweep dies (its end of a pipe closes without
the word ``done``) sends SIGTERM, then SIGKILL, to each of them still alive. Linux only
(``/proc``); elsewhere the watchdog is not started.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
"""How often the watchdog notes the sweep's processes and checks that it lives."""
GRACE_S = 2.0
"""Seconds between SIGTERM and SIGKILL."""
DONE = b"done\n"


class Reaper:
    """The watchdog of this process's children: start it, and call ``done`` at a clean end
    (it then exits without ending anything)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        if Path("/proc/self/stat").exists():
            self._process = subprocess.Popen(
                [sys.executable, "-m", "misalign.runtime.reaper", str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def done(self) -> None:
        """A clean end: the watchdog exits and ends nothing."""
        if self._process is None:
            return
        with contextlib.suppress(OSError):  # it is gone already
            self._process.stdin.write(DONE)
            self._process.stdin.close()
        self._process.wait()


def descendants(pid: int) -> dict[int, str]:
    """Every living process below ``pid``, with its start time (``/proc/PID/stat`` field 22)."""
    parents: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        child = int(stat.parent.name)
        parents.setdefault(int(fields[1]), []).append(child)
        started[child] = fields[19]
    found, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found[child] = started[child]
            todo.append(child)
    return found


def same_process(pid: int, start: str) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` (and has not exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


def _end(noted: dict[int, str]) -> None:
    """SIGTERM every noted process still alive, then SIGKILL those that outlive ``GRACE_S``."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        alive = [pid for pid, start in noted.items() if same_process(pid, start)]
        for pid in alive:
            with contextlib.suppress(OSError):  # gone meanwhile
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (
            wait and time.monotonic() < deadline and any(same_process(p, noted[p]) for p in alive)
        ):
            time.sleep(0.05)


def watch(parent: int) -> None:
    """Note ``parent``'s processes until its pipe (our stdin) closes; end them unless it said
    ``done``."""
    # the sweep's to handle (misalign.runtime.terminate):
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # sent to its process group, they spare the watchdog
    me, noted, said = os.getpid(), {}, b""
    while True:
        noted.update(descendants(parent))
        noted.pop(me, None)
        ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 64)
            said += chunk
            if not chunk:  # the parent is gone, or closed the pipe
                break
    if said != DONE:
        _end(noted)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
