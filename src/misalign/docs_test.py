"""Tests for the documentation (the README, docs/*.md, CONTRIBUTING.md and CHANGELOG.md): the
repository stands alone, every function and test a page ties a statement to exists, every
relative link and anchor resolves, every page is reachable from the README and the site's nav,
and what the README repeats from elsewhere (the registry table, the example) is the same."""

import importlib
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]
README = (ROOT / "README.md").read_text()


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _cited(pattern: str) -> list[tuple[str, ...]]:
    """``(page, *groups)`` for every match of ``pattern`` in every page, each once per page."""
    found = set()
    for page in PAGES:
        for match in re.findall(pattern, page.read_text()):
            found.add((_name(page), *(match if isinstance(match, tuple) else (match,))))
    return sorted(found)


def test_nothing_points_outside_the_repository():
    for path in [*PAGES, *ROOT.glob("src/**/*.py")]:
        text = path.read_text()
        assert "../" + "shared" not in text and ("MODEL" + ".md") not in text, path


def test_every_page_is_checked():
    """The pages these tests read: the README, every docs page (theory.md among them) and the
    two files beside the README."""
    assert {"theory.md", "json.md", "architecture.md", "api.md"} <= {p.name for p in DOCS}
    assert all(page.exists() for page in PAGES)


def test_no_paragraph_is_written_twice():
    """A long paragraph (a table included) appears once per page: a merge once left
    docs/llm.md's local-throughput paragraph, table and conclusion there twice."""
    for page in PAGES:
        paragraphs = [p.strip() for p in page.read_text().split("\n\n") if len(p.strip()) >= 200]
        twice = {p[:60] for p in paragraphs if paragraphs.count(p) > 1}
        assert not twice, (_name(page), twice)


def test_the_llm_claim_says_which_prediction_is_confirmed():
    """The ``llm`` entry's claim counts plays whose *reported* prediction is not confirmed;
    for an affine server that is the global fit's (docs/llm.md), so neither the README's
    registry row nor the experiment's docstring may call it a local prediction."""
    from misalign.experiments import llm

    row = next(line for line in README.splitlines() if line.startswith("| `llm` |"))
    for text in (row, " ".join(llm.__doc__.split())):
        assert "local prediction" not in text, text
        assert re.search(r"the prediction each play reports (is|must be) confirmed", text), text


CITED_TESTS = _cited(r"`((?:src|benchmarks)/[\w/]+\.py)::(\w+)`")


@pytest.mark.parametrize("cited", CITED_TESTS, ids=["::".join(c) for c in CITED_TESTS])
def test_every_cited_test_exists(cited):
    page, path, name = cited
    assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), cited


def test_the_theory_cites_tests():
    assert sum(page == "docs/theory.md" for page, *_ in CITED_TESTS) > 20


CITED_NAMES = _cited(r"`(misalign(?:\.\w+)+)`")


@pytest.mark.parametrize("cited", CITED_NAMES, ids=["::".join(c) for c in CITED_NAMES])
def test_every_cited_function_exists(cited):
    page, name = cited
    parts = name.split(".")
    for split in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return
    pytest.fail(f"{name} ({page}) does not import")


def test_the_readme_links_the_theory():
    assert "](docs/theory.md)" in README


def test_the_readme_links_every_page():
    """Every moved section is reachable from the README: it links each docs page."""
    for page in DOCS:
        assert f"](docs/{page.name}" in README, page.name


def test_the_site_lists_every_page():
    """mkdocs.yml's nav names every docs page (mkdocs build --strict would refuse a page
    left out of it, in CI; this says so in the test suite)."""
    site = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r"^\s*- (?:[^\n]*: )?([\w-]+\.md)\s*$", site, re.M))
    assert listed == {p.name for p in DOCS}
    assert re.search(r"^docs_dir: docs$", site, re.M)


def _without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked out."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slugs(page: Path) -> tuple[set[str], set[str]]:
    """The anchors of a page's headings as GitHub writes them and as the site does (Python
    Markdown's toc)."""
    github, site = set(), set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", _without_fences(page.read_text()), re.M):
        text = re.sub(r"`([^`]*)`", r"\1", heading)
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
        github.add(re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-"))
        plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        site.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", plain).strip().lower()))
    return github, site


def _without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


LINKS = [
    (_name(page), target)
    for page in PAGES
    for target in sorted(set(re.findall(r"\]\(([^)\s]+)\)", _without_code(page.read_text()))))
    if not re.match(r"[a-z]+:", target)
]


@pytest.mark.parametrize("link", LINKS, ids=["->".join(link) for link in LINKS])
def test_every_relative_link_resolves(link):
    """A relative link names a file of the repository that exists, and an anchor names a
    heading of that page, the same on GitHub and on the site."""
    page, target = link
    path, _, anchor = target.partition("#")
    found = (ROOT / page).parent / path if path else ROOT / page
    assert found.resolve().is_relative_to(ROOT), f"{page}: {target} leaves the repository"
    assert found.exists(), f"{page}: {target} does not exist"
    if page.startswith("docs/"):  # the site is built from docs/ alone
        assert found.resolve().is_relative_to(ROOT / "docs"), f"{page}: {target} is not in docs/"
    if anchor:
        assert found.suffix == ".md", f"{page}: {target}: an anchor in a file that is not a page"
        github, site = _slugs(found)
        assert anchor in github and anchor in site, f"{page}: {target}: no such heading"


def test_the_links_are_found():
    assert len(LINKS) > 100
    assert ("README.md", "docs/cli.md#run-and-theory") in LINKS


def _table(text: str, header: str) -> list[str]:
    start = text.index(header)
    return text[start:].split("\n\n")[0].splitlines()


def test_the_readme_registry_table_is_the_reproduce_page_s():
    """The README repeats the registry table of docs/reproduce.md, links made relative to the
    repository's root."""
    header = "| experiment | claim | claims | full run | figure |"
    page = _table((ROOT / "docs" / "reproduce.md").read_text(), header)
    readme = [row.replace("](docs/", "](") for row in _table(README, header)]
    assert readme == page
    assert len(page) == 2 + len(importlib.import_module("misalign.experiments").REGISTRY)


def test_the_readme_example_is_the_file_and_its_output(tmp_path):
    """The README's example shows examples/two_agents.toml as it is, and what `misalign run`
    prints for it."""
    example = (ROOT / "examples" / "two_agents.toml").read_text()
    assert f"```toml\n{example}```" in README
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "two_agents.toml", tmp_path / "examples")
    path = [str(Path(importlib.import_module("misalign").__file__).parents[1])]  # this misalign
    path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    result = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "run", "examples/two_agents.toml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "100", "PYTHONPATH": os.pathsep.join(path)},
    )
    assert result.returncode == 0, result.stderr
    printed = README.split("`misalign run examples/two_agents.toml` prints:\n\n```\n")[1]
    assert printed.split("```")[0] == result.stdout
