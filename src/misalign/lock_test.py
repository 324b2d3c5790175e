"""Tests of the dependency ranges and the lock file: every runtime dependency has a tested
range with an upper bound (``>=tested,<next major``), ``requirements.lock`` pins a version
inside every range, and the environment the suite runs in is the locked one (CI installs
with ``-c requirements.lock``)."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parents[2]
PYPROJECT, LOCK = ROOT / "pyproject.toml", ROOT / "requirements.lock"
pytestmark = pytest.mark.skipif(
    not (PYPROJECT.exists() and LOCK.exists()), reason="run from outside the checkout"
)


def requirements() -> list[Requirement]:
    """Every requirement of the project, its extras' included."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    named = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        named += extra
    return [Requirement(r) for r in named]


def locked() -> dict[str, Version]:
    """The lock's pins: name -> version."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, _, pinned = line.strip().partition("==")
            pins[canonicalize_name(name)] = Version(pinned)
    return pins


def test_every_dependency_has_an_upper_bound_or_a_pin():
    for requirement in requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert "==" in operators or {">=", "<"} <= operators, requirement


def test_the_lock_pins_a_version_inside_every_range():
    pins = locked()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock (run .ci/lock)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name} {pins[name]}, outside {requirement.specifier}"
        )


def test_the_suite_runs_on_the_locked_versions():
    """What is installed of the lock is the locked version (local build labels aside: the
    lock's torch 2.13.0 is the CPU build 2.13.0+cpu here)."""
    pins, checked = locked(), 0
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        try:
            installed = Version(version(name))
        except PackageNotFoundError:  # an extra not installed (local, ray)
            continue
        assert Version(installed.public) == pins[name], f"{name} {installed} is not the lock's"
        checked += 1
    assert checked >= 12
