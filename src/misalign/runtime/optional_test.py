"""Tests of the optional dependencies (``misalign.runtime.optional``): without torch, the theory,
the
CLI and every non-trained agent work, and what needs torch says in one line what to install.
torch is hidden from a child process (``sys.modules["torch"] = None`` makes it unimportable)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[3] / "examples"


def without_torch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``misalign ARGS`` in a child process that cannot import torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from misalign.cli import main\n"
        f"main({list(args)!r})\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )


@pytest.mark.parametrize(
    ("args", "who"),
    [
        (["train", str(EXAMPLES / "training" / "lsa_d5.toml")], "misalign train"),
        (["run", str(EXAMPLES / "training" / "lsa_play.toml")], 'agents.A (kind = "lsa")'),
        (["reproduce", "lsa", "--quick"], "reproduce lsa"),
    ],
)
def test_what_needs_torch_says_what_to_install(tmp_path, args, who):
    done = without_torch(tmp_path, *args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0] == (
        f"misalign: error: {who} needs torch, which is not installed: pip install "
        "'misalign[train]' (torch 2.13.0; its CPU build is enough)"
    )


def test_everything_else_runs_without_torch(tmp_path):
    for args in (["run", str(EXAMPLES / "two_agents.toml"), "--json"], ["reproduce", "--list"]):
        done = without_torch(tmp_path, *args)
        assert done.returncode == 0, done.stderr
