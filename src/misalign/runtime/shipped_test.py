"""Tests of ``misalign.runtime.shipped``: the files a registry entry reads ship in the package,
identical to ``examples/``; a missing one is one line naming it; and the wheel, installed in
a fresh virtual environment, runs ``misalign reproduce`` from a folder outside the checkout."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from typer.testing import CliRunner

from misalign.cli import app
from misalign.experiments import REGISTRY
from misalign.runtime.shipped import RECORDED, shipped

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
in_checkout = pytest.mark.skipif(
    not (ROOT / "pyproject.toml").exists(), reason="run from outside the checkout"
)
runner = CliRunner()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@in_checkout
def test_the_shipped_files_are_the_examples_byte_for_byte():
    """One recorded run: what ``reproduce llm`` replays is what ``examples/`` gives users."""
    with shipped(*RECORDED) as paths:
        for name, path in zip(RECORDED, paths, strict=True):
            assert _sha256(path) == _sha256(EXAMPLES / name), f"{name}: the copies differ"


def test_a_missing_shipped_file_is_one_line_naming_it(tmp_path, monkeypatch):
    """Issue 21: the missing recorded run read 'cannot write (None)'."""
    monkeypatch.setattr(resources, "files", lambda package: tmp_path)  # an install without it
    out = tmp_path / "out"
    result = runner.invoke(app, ["reproduce", "llm", "--quick", "--out", str(out)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr == (
        f"misalign: error: {tmp_path / 'data' / RECORDED[0]}: shipped with misalign, missing "
        "from this installation (reinstall it)\n"
    )


def test_a_run_directory_that_cannot_be_written_is_named_with_the_reason(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a directory")
    result = runner.invoke(app, ["reproduce", "single-agent", "--quick", "--out", str(taken)])
    assert result.exit_code == 2
    assert result.stderr == f"misalign: error: --out {taken}: cannot write {taken} (File exists)\n"


def _wheel(tmp_path: Path) -> Path:
    """The project's wheel, built offline from a copy of the checkout (nothing is written
    into the checkout) with the setuptools this environment has."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(
        ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    build += ["--no-index", "-w", str(tmp_path / "dist"), str(source)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("misalign-*.whl")
    return wheel


def _venv(tmp_path: Path, wheel: Path) -> Path:
    """A fresh virtual environment with ``wheel`` installed in it, offline: its dependencies
    come from this environment's site-packages (a ``.pth`` line, after the venv's own, and
    no ``.pth`` of this environment is run, so no editable install of misalign is seen).
    ``--ignore-installed``: where this environment holds a regular (not editable) install of
    misalign of the wheel's version, as CI's does, pip would otherwise find it through the
    ``.pth`` and skip the wheel ("already installed with the same version"); with it pip
    installs the wheel into the venv and uninstalls nothing outside it.

    Returns:
        The venv's ``bin`` folder.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    install += ["--ignore-installed", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    return venv / "bin"


@pytest.mark.slow
@in_checkout
def test_the_installed_wheel_reproduces_from_outside_the_checkout(tmp_path):
    """Issue 21: after `pip install .`, `misalign reproduce llm` looked for examples/ inside
    the venv. The wheel holds the shipped files; installed in a fresh venv, `reproduce
    --list` and `reproduce llm --quick` run from a folder that is not the checkout."""
    wheel = _wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"misalign/data/{name}" for name in RECORDED} <= names
    assert {
        "misalign/llm/templates/gd-step.j2",
        "misalign/workflows/templates/report.html.j2",
    } <= names
    bin_ = _venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )

    where = run(str(bin_ / "python"), "-c", "import misalign; print(misalign.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where
    listed = run(str(bin_ / "misalign"), "reproduce", "--list")
    assert listed.returncode == 0 and listed.stdout.startswith("single-agent"), listed.stderr
    assert "\nllm " in listed.stdout
    done = run(str(bin_ / "misalign"), "reproduce", "llm", "--quick")
    assert done.returncode == 0, done.stderr
    claims = len(REGISTRY["llm"].compares) - REGISTRY["llm"].full_only
    assert "FAIL" not in done.stdout and done.stdout.count("pass  ") == claims
    (out,) = (elsewhere / "runs").iterdir()
    assert out.name.startswith("llm-") and (out / "claims.json").exists()
