"""Tests for the documentation: the repository stands alone, and every function and test that
docs/theory.md ties a statement to exists."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THEORY = (ROOT / "docs" / "theory.md").read_text()


def test_nothing_points_outside_the_repository():
    for path in [ROOT / "README.md", ROOT / "docs" / "theory.md", *ROOT.glob("src/**/*.py")]:
        text = path.read_text()
        assert "../" + "shared" not in text and ("MODEL" + ".md") not in text, path


@pytest.mark.parametrize("cited", sorted(set(re.findall(r"`(src/[\w/]+\.py)::(\w+)`", THEORY))))
def test_every_cited_test_exists(cited):
    path, name = cited
    assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), cited


@pytest.mark.parametrize("cited", sorted(set(re.findall(r"`(misalign(?:\.\w+)+)`", THEORY))))
def test_every_cited_function_exists(cited):
    parts = cited.split(".")
    for split in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return
    pytest.fail(f"{cited} does not import")


def test_the_readme_links_the_theory():
    assert "](docs/theory.md)" in (ROOT / "README.md").read_text()
