"""Tests of the watchdog that ends what a killed sweep started (``misalign.runtime.reaper``): a
parent killed with SIGKILL leaves an orphan that the watchdog ends within seconds; a parent
that says ``done`` leaves its children alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from misalign.runtime.reaper import descendants, same_process

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="/proc (Linux)")

PARENT = """
import subprocess, sys, time
from misalign.runtime.reaper import Reaper
reaper = Reaper()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(child.pid, flush=True)
if sys.argv[1] == "done":
    reaper.done()
    print("done", flush=True)
time.sleep(300)
"""


def parent(how: str) -> tuple[subprocess.Popen, int]:
    """A process that starts the watchdog and a long-lived child; the child's PID."""
    process = subprocess.Popen(
        [sys.executable, "-c", PARENT, how], stdout=subprocess.PIPE, text=True
    )
    child = int(process.stdout.readline())
    if how == "done":
        assert process.stdout.readline() == "done\n"
    return process, child


def test_a_killed_parents_orphan_is_ended():
    process, child = parent("kill")
    start = descendants(process.pid)[child]
    time.sleep(1.5)  # the watchdog notes it (every 0.5 s)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while same_process(child, start):
        assert time.monotonic() < deadline, "the orphan lived on"
        time.sleep(0.1)


def test_a_clean_end_leaves_the_children_alone():
    process, child = parent("done")
    start = descendants(process.pid)[child]
    time.sleep(1.0)
    try:
        assert same_process(child, start)
    finally:
        os.kill(child, signal.SIGKILL)
        process.kill()
        process.wait()
