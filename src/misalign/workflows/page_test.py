"""Tests for misalign.workflows.page and ``misalign report``: the page over real quick runs, its
escaping, bad input as one line, and (marked ``browser``) the page loaded in headless
Chromium through the DevTools protocol: every image decodes, no console error, a screenshot."""

import base64
import contextlib
import html
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from misalign.cli import app, main
from misalign.config import ConfigError
from misalign.experiments import REGISTRY
from misalign.workflows.page import build_page, find_runs, write_page
from misalign.workflows.page_read import PNG_MAGIC, ROWS

runner = CliRunner()
NAMES = ["single-agent", "stability"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``runs/single-agent`` and ``runs/stability``: real quick runs (about a second each)."""
    root = tmp_path_factory.mktemp("runs")
    for name in NAMES:
        REGISTRY[name].run(True, None, root / name)
    return root


def _claims(run: Path) -> list[dict]:
    return json.loads((run / "claims.json").read_text())


def _summary(page: str) -> str:
    """The contents table at the top of the page (one row per run)."""
    return page.split('<table class="summary">', 1)[1].split("</table>", 1)[0]


def _rows(table: str) -> list[str]:
    return table.split("<tr")[2:]  # after the header row


def _copy(runs: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs / name, tmp_path / name))


def test_contents_has_one_row_per_run_with_its_count_and_verdict(runs):
    page = build_page([runs / name for name in NAMES])
    rows = _rows(_summary(page))
    assert len(rows) == len(NAMES)
    for i, (row, name) in enumerate(zip(rows, NAMES, strict=True)):  # in the order given
        n = len(_claims(runs / name))
        assert f'<a href="#run-{i + 1}">{name}</a>' in row
        assert html.escape(REGISTRY[name].claim) in row
        assert f">{n} of {n} pass<" in row and ">pass<" in row and "FAIL" not in row
    total = sum(len(_claims(runs / name)) for name in NAMES)
    assert f"{total} of {total} claims pass" in page and "Failing claims" not in page
    assert page.index(f"{total} of {total} claims pass") < page.index("<section")
    for name in NAMES:  # every claim once, in its run's section
        for claim in _claims(runs / name):
            assert page.count(f"<td>{html.escape(claim['name'])}</td>") == 1


def test_one_section_per_run_in_the_order_given(runs):
    page = build_page([runs / "stability", runs / "single-agent"])
    sections = page.split("<section")[1:]
    assert [re.search(r"<h2>(.*?)</h2>", s).group(1) for s in sections] == [
        "stability",
        "single-agent",
    ]
    for section, name in zip(sections, ["stability", "single-agent"], strict=True):
        assert html.escape(REGISTRY[name].claim) in section
        assert "<details>" in section and f'"experiment": "{name}"' in html.unescape(section)
        for claim in _claims(runs / name):
            assert html.escape(claim["name"]) in section
        version = json.loads((runs / name / "version.json").read_text())["version"]
        assert f"misalign {version}" in section
    assert "Generated " in page and "misalign " in page.split("<table", 1)[0]


def test_images_are_base64_pngs_that_decode(runs):
    page = build_page([runs / name for name in NAMES])
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', page)
    assert len(images) == len(NAMES) == page.count("<img ")
    for (data, alt), name in zip(images, NAMES, strict=True):
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        assert alt.startswith(name)
        assert base64.b64decode(data) == (runs / name / "figure.png").read_bytes()


def test_nothing_is_loaded_from_outside_the_page(runs):
    page = build_page([runs / name for name in NAMES])
    references = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page)
    assert references and all(r.startswith(("data:", "#")) for r in references), references
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page and "<script" not in page


def test_table_shows_the_first_rows_and_embeds_the_whole_csv(runs, tmp_path):
    run = _copy(runs, "stability", tmp_path)
    rows = ["eta,seed,note"] + [f"{i / 7},{i},<b>{i}</b>" for i in range(120)]
    (run / "table.csv").write_text("\n".join(rows) + "\n")
    page = build_page([runs / "single-agent", run])
    single = len((runs / "single-agent" / "table.csv").read_text().splitlines()) - 1
    assert f"showing {single} of {single} rows" in page
    assert f"showing {ROWS} of 120 rows" in page
    section = page.split("<section")[2]
    data = section.split('<table class="data">', 1)[1].split("</table>", 1)[0]
    assert len(_rows(data)) == ROWS
    assert "&lt;b&gt;0&lt;/b&gt;" in data and "<b>" not in data
    assert ">0.142857<" in data  # 1/7 to 6 significant digits
    link = re.search(r'href="data:text/csv;base64,([^"]+)" download="stability-table.csv"', page)
    assert base64.b64decode(link.group(1)) == (run / "table.csv").read_bytes()


def test_a_table_too_large_to_embed_is_named_by_its_path(runs, tmp_path, monkeypatch):
    import misalign.workflows.page_read

    run = _copy(runs, "single-agent", tmp_path)
    rows = ["i,note"] + [f'{i},"two\nlines"' for i in range(5000)]  # quoted newlines
    (run / "table.csv").write_text("\n".join(rows) + "\n")
    size = (run / "table.csv").stat().st_size
    monkeypatch.setattr(misalign.workflows.page_read, "EMBED_BYTES", size - 1)
    page = build_page([run])
    assert "data:text/csv" not in page and f"showing {ROWS} of 5000 rows" in page
    assert f"too large to embed ({size / 2**20:.1f} MB; it is {run / 'table.csv'})" in page
    monkeypatch.setattr(misalign.workflows.page_read, "EMBED_BYTES", size)
    assert "data:text/csv" in build_page([run])


@pytest.mark.parametrize(
    "content,why",
    [
        (b"a,b\n1," + b"x" * 200_000 + b"\n", "field larger than field limit (131072)"),
        (b"a,b\n1,\xff\n", "not UTF-8"),
        (b"", "table.csv is empty"),
    ],
)
def test_an_unreadable_table_is_one_line_in_its_section(runs, tmp_path, content, why):
    run = _copy(runs, "single-agent", tmp_path)
    (run / "table.csv").write_bytes(content)
    page = build_page([run])
    note = re.search(r"no table \((.*?)\)</p>", page).group(1)
    assert why in html.unescape(note) and "\n" not in note


def test_everything_is_escaped(runs, tmp_path):
    run = _copy(runs, "single-agent", tmp_path)
    (run / "config.json").write_text(json.dumps({"experiment": "<script>alert(1)</script>"}))
    claims = _claims(run)
    claims[0]["name"] = 'a <img src=x onerror="alert(2)"> & b'
    (run / "claims.json").write_text(json.dumps(claims))
    page = build_page([run])
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &lt;img src=x onerror=&#34;alert(2)&#34;&gt; &amp; b" in page


def test_non_ascii_names_and_extra_keys(runs, tmp_path):
    run = Path(shutil.copytree(runs / "single-agent", tmp_path / "rün ü"))
    (run / "config.json").unlink()
    claims = _claims(run)
    claims[0] |= {"name": "|e| ≤ 1e-8 — ü", "unit": "rounds", "extra": {"x": [1]}}
    (run / "claims.json").write_text(json.dumps(claims, ensure_ascii=False), encoding="utf-8")
    page = build_page([run])
    assert "<h2>rün ü</h2>" in page and 'download="rün ü-table.csv"' in page
    assert page.count("<td>|e| ≤ 1e-8 — ü</td>") == 1
    assert "rounds" not in page.split("<h2>", 1)[1].split("<details>", 1)[0]  # not shown


def test_a_run_without_figure_still_renders(runs, tmp_path):
    run = _copy(runs, "stability", tmp_path)
    (run / "figure.png").unlink()
    page = build_page([runs / "single-agent", run])
    section = page.split("<section")[2]
    assert "no figure" in section and "<img" not in section
    assert page.count("<img ") == 1
    (run / "figure.png").write_text("not a png")
    assert "figure.png is not a PNG" in build_page([run])


def test_fallbacks_for_missing_config_version_and_table(runs, tmp_path):
    run = _copy(runs, "stability", tmp_path)
    run = run.rename(tmp_path / "my-run")
    for name in ("config.json", "version.json", "table.csv"):
        (run / name).unlink()
    page = build_page([run])
    assert "<h2>my-run</h2>" in page and "version unknown" in page
    assert "no table (table.csv is missing)" in page
    assert '<p class="claim">' not in page  # not a registry experiment


def test_a_failing_claim_shows_fail_at_the_top(runs, tmp_path):
    run = _copy(runs, "stability", tmp_path)
    claims = _claims(run)
    claims[1] |= {"measured": 3, "passed": False}
    claims[2] |= {"measured": None, "passed": False}  # non-finite, as write_run writes it
    (run / "claims.json").write_text(json.dumps(claims))
    page = build_page([runs / "single-agent", run])
    total = len(claims) + len(_claims(runs / "single-agent"))
    assert f"{total - 2} of {total} claims pass" in page
    top = page.split("<section", 1)[0]
    failures = top.split('<table class="failures">', 1)[1].split("</table>", 1)[0]
    failed = _rows(failures)
    assert [html.unescape(re.findall(r"<td>(.*?)</td>", r)[1]) for r in failed] == [
        claims[1]["name"],
        claims[2]["name"],
    ]
    assert all('class="failed"' in row and ">stability</a>" in row for row in failed)
    assert ">3<" in failed[0] and ">not finite<" in failed[1]
    single, stability = _rows(_summary(page))
    assert ">pass<" in single and 'class="failed"' not in single
    n = len(claims)
    assert f">{n - 2} of {n} pass<" in stability and ">FAIL<" in stability
    assert 'class="failed"' in stability
    assert top.index("Failing claims") < top.index('<table class="summary">')


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda d: d / "nope", "nope: no such run directory"),
        (lambda d: d, "no run here (none of claims.json, run.json, "),
        (lambda d: (d / "claims.json").write_text("[") and d, "claims.json: not valid JSON"),
        (lambda d: (d / "claims.json").write_text("{}") and d, "expected a list of claims"),
        (lambda d: (d / "claims.json").write_text('[{"x": 1}]') and d, "claim 0 lacks a name"),
        (
            lambda d: (d / "claims.json").write_text('[{"name": "x", "passed": "yes"}]') and d,
            "claim 0: passed must be true or false (got 'yes')",
        ),
    ],
)
def test_bad_run_dir_is_one_line_naming_it(tmp_path, make, expect):
    bad = make(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(expect)) as caught:
        build_page([bad])
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)
    out = tmp_path / "out" / "report.html"
    result = runner.invoke(app, ["report", str(bad), "--out", str(out)])
    assert result.exit_code == 2 and result.stdout == "" and not out.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("misalign: error: ")
    assert str(bad) in lines[0] and expect in lines[0]


def test_find_runs_takes_a_directory_of_runs_in_registry_order(runs, tmp_path):
    assert find_runs([runs]) == [runs / name for name in NAMES]
    mixed = tmp_path / "mixed"
    shutil.copytree(runs / "stability", mixed / "a-stability")
    shutil.copytree(runs / "single-agent", mixed / "b-single")
    shutil.copytree(runs / "stability", mixed / "c-mine")
    (mixed / "c-mine" / "config.json").unlink()  # no experiment: after the registry's
    shutil.copytree(runs / "single-agent", mixed / "b-mine")
    (mixed / "b-mine" / "config.json").write_text('{"experiment": "mine"}')
    (mixed / "notes").mkdir()  # not a run
    assert [p.name for p in find_runs([mixed])] == ["b-single", "a-stability", "b-mine", "c-mine"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: no run here"):
        find_runs([tmp_path / "empty"])


def test_a_run_named_twice_appears_once_where_first_named(runs, monkeypatch):
    monkeypatch.chdir(runs)
    again = [Path("stability"), runs, runs / "stability", Path("./single-agent")]
    assert find_runs(again) == [Path("stability"), runs / "single-agent"]
    page = build_page(again)
    assert [re.search(r"<h2>(.*?)</h2>", s).group(1) for s in page.split("<section")[1:]] == [
        "stability",
        "single-agent",
    ]
    total = sum(len(_claims(runs / name)) for name in NAMES)
    assert f"{total} of {total} claims pass" in page


def test_cli_writes_the_page_and_prints_the_summary_line(runs, tmp_path, monkeypatch):
    out = tmp_path / "site" / "page.html"  # --out's directory is created
    result = runner.invoke(app, ["report", str(runs / "stability"), str(runs), "--out", str(out)])
    total = sum(len(_claims(runs / name)) for name in NAMES)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"report: {out} (2 runs, {total} of {total} claims pass)\n"
    page = out.read_text()
    assert [re.search(r"<h2>(.*?)</h2>", s).group(1) for s in page.split("<section")[1:]] == [
        "stability",
        "single-agent",
    ]
    monkeypatch.chdir(tmp_path)  # the default --out: report.html here
    result = runner.invoke(app, ["report", str(runs)])
    assert result.exit_code == 0 and result.stdout.startswith("report: report.html (2 runs, ")
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "RUN_DIR..." in runner.invoke(app, ["report", "--help"]).stdout


def test_cli_unwritable_out_is_one_line(runs, tmp_path):
    (tmp_path / "taken").mkdir()
    result = runner.invoke(app, ["report", str(runs), "--out", str(tmp_path / "taken")])
    assert result.exit_code == 2 and result.stderr.startswith("misalign: error: --out ")
    assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file" / "report.html", tmp_path / "file" / "a" / "report.html"):
        result = runner.invoke(app, ["report", str(runs), "--out", str(out)])
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr == (
            f"misalign: error: --out {out}: cannot write ({tmp_path / 'file'} is a file, not a"
            " directory)\n"
        )
    assert (tmp_path / "file").read_text() == ""


# --- verdicts recomputed from the numbers, quick or full, the registry entries not run ------


def _report(*args) -> tuple[str, str]:
    """``misalign report ARGS --out <first arg's parent>/report.html`` through the real CLI:
    its stdout line and the page."""
    out = Path(args[0]).parent / "report.html"
    result = runner.invoke(app, ["report", *map(str, args), "--out", str(out)])
    assert result.exit_code == 0 and result.stderr == "", result.output
    return result.stdout, out.read_text()


def _section(page: str, name: str) -> str:
    return next(s for s in page.split("<section")[1:] if f"<h2>{html.escape(name)}</h2>" in s)


@pytest.mark.parametrize(
    "measured,tolerance,text",
    [
        (5.0, 1e-8, ">5<"),  # the tampered claim: 5 is not below 1e-8
        ("NaN", 1e-3, ">not finite<"),  # Python's json writes and reads NaN
        (None, 1e-3, ">not finite<"),  # how write_run records a value that is not finite
        ("a lot", 1e-3, ">a lot<"),
        (1e-9, None, ">not finite<"),
    ],
    ids=["5 against 1e-8", "NaN", "null", "text", "no tolerance"],
)
def test_a_stored_pass_the_numbers_contradict_fails_and_is_shown_as_such(
    runs, tmp_path, measured, tolerance, text
):
    """Issue 21: the page trusted ``passed`` (a tampered 5.0 against 1e-8 showed "pass", a NaN
    showed "not finite ... pass")."""
    run = _copy(runs, "stability", tmp_path)
    claims = _claims(run)
    claims[0] |= {"measured": measured, "tolerance": tolerance, "passed": True}
    raw = json.dumps(claims).replace('"NaN"', "NaN")
    (run / "claims.json").write_text(raw)
    stdout, page = _report(run)
    n = len(claims)
    assert stdout.endswith(
        f"(1 run, {n - 1} of {n} claims pass; 1 verdict of claims.json says otherwise)\n"
    )
    assert f">{n - 1} of {n} claims pass<" in page
    top = page.split("<section", 1)[0]
    wrong = _rows(top.split('<table class="disagreements">', 1)[1].split("</table>", 1)[0])
    assert len(wrong) == 1 and html.escape(claims[0]["name"]) in wrong[0] and text in wrong[0]
    assert '<td class="disagree">pass</td>' in wrong[0] and '<td class="fail">FAIL</td>' in wrong[0]
    assert html.escape(claims[0]["name"]) in top.split('<table class="failures">', 1)[1]
    assert ">FAIL<" in _rows(_summary(page))[0]
    row = _rows(_section(page, "stability").split('<table class="claims">', 1)[1])[0]
    assert ">FAIL<" in row and '<td class="disagree">claims.json says pass</td>' in row
    assert ">pass<" not in row


def test_a_stored_fail_the_numbers_pass_passes_and_is_shown_as_such(runs, tmp_path):
    run = _copy(runs, "stability", tmp_path)
    claims = _claims(run)
    claims[0]["passed"] = False  # its numbers pass
    (run / "claims.json").write_text(json.dumps(claims))
    stdout, page = _report(run)
    n = len(claims)
    assert f"{n} of {n} claims pass; 1 verdict of claims.json says otherwise" in stdout
    assert "Failing claims" not in page and '<table class="disagreements">' in page
    row = _rows(_section(page, "stability").split('<table class="claims">', 1)[1])[0]
    assert ">pass<" in row and '<td class="disagree">claims.json says FAIL</td>' in row


def test_quick_and_full_runs_are_told_apart(runs, tmp_path):
    root = tmp_path / "runs"
    for name, args in {"a-full": ["--seeds", "2"], "b-quick": ["--quick", "--seeds", "3"]}.items():
        result = runner.invoke(app, ["reproduce", "single-agent", *args, "--out", str(root / name)])
        assert result.exit_code == 0, result.output
    shutil.copytree(runs / "stability", root / "stability")
    config = root / "stability" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"etas": [0.5]}))
    _, page = _report(root)
    mode = 'reproduce, <span class="mode">{}</span>'
    neither = "neither quick nor full (a configuration this version&#39;s registry does not write)"
    assert [re.findall(r"<td>(.*?)</td>", row)[1] for row in _rows(_summary(page))] == [
        mode.format("full, --seeds 2"),
        mode.format("quick (--quick), --seeds 3"),
        mode.format(neither),
    ]
    _, page = _report(runs / "stability")
    assert mode.format("quick (--quick)") in page and "Quick runs (--quick" in page
    assert '<a href="#run-1">stability</a>.' in page.split("Quick runs", 1)[1]


def test_the_registry_entries_with_no_run_are_listed(runs, tmp_path):
    _, page = _report(runs)
    others = [name for name in REGISTRY if name not in NAMES]
    line = re.search(r'<p class="missing">(.*?)</p>', page).group(1)
    assert line == (
        f"Registry entries with no run here ({len(others)} of {len(REGISTRY)}): "
        f"{', '.join(others)}."
    )
    assert page.index('class="missing"') < page.index('<table class="summary">')
    full = tmp_path / "all"
    for name in REGISTRY:  # one run per entry (copies of a real one, renamed)
        run = shutil.copytree(runs / "stability", full / name)
        (run / "config.json").write_text(json.dumps({"experiment": name}))
    _, page = _report(full)
    assert '<p class="missing">Every registry entry has a run here.</p>' in page


def test_write_page_is_the_built_page(runs, tmp_path):
    out = write_page([runs / "single-agent"], tmp_path / "report.html")
    assert out == tmp_path / "report.html"
    strip = re.compile(r"Generated [^f]*from")
    assert strip.sub("", out.read_text()) == strip.sub("", build_page([runs / "single-agent"]))
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary left


# --- run directories from someone else: only regular files really inside them are read ---

SECRET = "misalign-secret-5f3a9c"
READ = ("claims.json", "config.json", "version.json", "figure.png", "table.csv")
"""Every file of a run directory that the page reads."""


def _secrets(tmp_path: Path) -> Path:
    """A folder outside every run holding, under each name the page reads, a valid file of its
    kind that carries ``SECRET``: a page that followed a link there would show it."""
    folder = tmp_path / "secret"
    folder.mkdir()
    (folder / "claims.json").write_text(json.dumps([{"name": SECRET, "passed": True}]))
    (folder / "config.json").write_text(json.dumps({"experiment": SECRET}))
    (folder / "version.json").write_text(json.dumps({"version": SECRET}))
    (folder / "figure.png").write_bytes(PNG_MAGIC + SECRET.encode())
    (folder / "table.csv").write_text(f"a,b\n{SECRET},1\n")
    return folder


def _shared(runs: Path, tmp_path: Path) -> Path:
    """A directory of runs as a shared tarball unpacks it: ``good`` (stability) and ``victim``
    (single-agent), the one a test spoils."""
    shared = tmp_path / "shared"
    shutil.copytree(runs / "stability", shared / "good")
    shutil.copytree(runs / "single-agent", shared / "victim")
    return shared


def _swap(path: Path, make) -> Path:
    """Remove what is at ``path`` (a file or a directory), put ``make(path)`` there instead."""
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    make(path)
    return path


def _sparse(path: Path, size: int) -> None:
    """A file of ``size`` bytes that takes no room on disk (nothing is read before its size
    is checked, or the test would take minutes)."""
    path.write_bytes(b"")
    os.truncate(path, size)


def _link_in_subfolder(victim: Path, secret: Path) -> Path:
    """``table.csv -> sub/t.csv``, itself a link out: the second hop is the one out."""
    (victim / "sub").mkdir()
    (victim / "sub" / "t.csv").symlink_to(secret / "table.csv")
    return _swap(victim / "table.csv", lambda p: p.symlink_to("sub/t.csv"))


PAYLOADS = {
    **{
        f"{name} links out": lambda victim, secret, name=name: _swap(
            victim / name, lambda p: p.symlink_to(secret / name)
        )
        for name in READ
    },
    "table.csv links to a directory": lambda victim, secret: _swap(
        victim / "table.csv", lambda p: p.symlink_to(secret)
    ),
    "figure.png links up and out, relative": lambda victim, secret: _swap(
        victim / "figure.png", lambda p: p.symlink_to(Path("..", "..", "secret", "figure.png"))
    ),
    "table.csv links into a subfolder that links out": _link_in_subfolder,
    "config.json is a directory": lambda victim, secret: _swap(
        victim / "config.json", lambda p: p.mkdir()
    ),
    "the run directory links out": lambda victim, secret: _swap(
        victim, lambda p: p.symlink_to(secret)
    ),
    "figure.png is 6 GB (sparse)": lambda victim, secret: _swap(
        victim / "figure.png", lambda p: _sparse(p, 6 * 2**30)
    ),
    "claims.json is 17 MB (sparse)": lambda victim, secret: _swap(
        victim / "claims.json", lambda p: _sparse(p, 17 * 2**20)
    ),
}
"""Ways a run directory from someone else points the page at a file outside it; each returns
the path the page must name and leave out."""


def _report_main(*args) -> tuple[int, str, str]:
    """``misalign report ARGS``, the real CLI in this process: exit code, stdout, stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        pytest.raises(SystemExit) as exit_,
    ):
        main(["report", *map(str, args)])
    return exit_.value.code, stdout.getvalue(), stderr.getvalue()


def _assert_secret_nowhere(page: str) -> None:
    """Neither the page's text nor any of its base64 data links holds ``SECRET``."""
    assert SECRET not in page and SECRET not in html.unescape(page)
    links = re.findall(r"base64,([A-Za-z0-9+/=]+)", page)
    assert links  # the good run's figure and table at least
    assert not any(SECRET.encode() in base64.b64decode(data) for data in links)


def _sections(page: str) -> list[str]:
    return [re.search(r"<h2>(.*?)</h2>", s).group(1) for s in page.split("<section")[1:]]


@pytest.mark.parametrize("named", ["each run", "the directory of runs"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_report_leaves_out_what_is_not_a_regular_file_inside_the_run(
    runs, tmp_path, payload, named
):
    shared, secret = _shared(runs, tmp_path), _secrets(tmp_path)
    left_out = PAYLOADS[payload](shared / "victim", secret)
    whole = left_out.name in ("victim", "claims.json")  # no claims to show: the run goes
    args = [shared] if named == "the directory of runs" else [shared / "good", shared / "victim"]
    out = tmp_path / "report.html"
    code, stdout, stderr = _report_main(*args, "--out", out)
    assert code == 0, stderr
    assert stdout.startswith(f"report: {out} ({'1 run' if whole else '2 runs'}, ")
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"misalign: warning: {left_out}: ")
    assert lines[0].endswith("left out of the page") and SECRET not in stderr
    page = out.read_text()
    _assert_secret_nowhere(page)
    sections = _sections(page)  # without its config.json, a run is named by its directory
    assert "stability" in sections and len(sections) == 2 - whole
    if not whole:
        assert f"{left_out.name} left out: " in page


def _report_process(*args, env=None) -> subprocess.CompletedProcess:
    """``misalign report ARGS`` in its own process (a test that would hang gets killed)."""
    return subprocess.run(
        [sys.executable, "-m", "misalign.cli", "report", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize(
    "names", [("figure.png", "table.csv", "config.json", "version.json"), ("claims.json",)]
)
def test_report_of_fifos_does_not_hang(runs, tmp_path, names):
    shared = _shared(runs, tmp_path)
    for name in names:
        _swap(shared / "victim" / name, os.mkfifo)
    out = tmp_path / "report.html"
    done = _report_process(shared, "--out", out)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == len(names)
    for line, name in zip(sorted(lines), sorted(names), strict=True):
        assert line.startswith(f"misalign: warning: {shared / 'victim' / name}: a FIFO; ")
    assert len(_sections(out.read_text())) == (1 if names == ("claims.json",) else 2)


def test_report_does_not_embed_proc_self_environ(runs, tmp_path):
    shared = _shared(runs, tmp_path)
    for name in ("table.csv", "config.json"):
        _swap(shared / "victim" / name, lambda p: p.symlink_to("/proc/self/environ"))
    out = tmp_path / "report.html"
    done = _report_process(shared, "--out", out, env=os.environ | {"MISALIGN_SECRET": SECRET})
    assert done.returncode == 0, done.stderr
    lines = sorted(done.stderr.splitlines())
    assert [line.split(": a symbolic link")[0] for line in lines] == [
        f"misalign: warning: {shared / 'victim' / name}" for name in ("config.json", "table.csv")
    ]
    _assert_secret_nowhere(out.read_text())


def test_report_refuses_to_write_through_a_symlinked_out(runs, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "page.html").write_text("theirs")
    out = tmp_path / "report.html"
    out.symlink_to(theirs / "page.html")
    code, stdout, stderr = _report_main(runs, "--out", out)
    assert code == 2 and stdout == ""
    assert stderr == (
        f"misalign: error: --out {out}: {out} is a symbolic link; refusing to write through it\n"
    )
    assert [p.name for p in theirs.iterdir()] == ["page.html"]
    assert (theirs / "page.html").read_text() == "theirs" and out.is_symlink()
    (tmp_path / "mine").symlink_to(theirs)  # a link higher up is the user's own path
    code, _, stderr = _report_main(runs, "--out", tmp_path / "mine" / "report.html")
    assert code == 0 and stderr == "" and (theirs / "report.html").exists()


def test_help_does_not_import_jinja2():
    code = "import sys; from misalign.cli import main; print('jinja2' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# --- headless Chromium over the DevTools protocol ------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str | None:
    return next(filter(None, map(shutil.which, BROWSERS)), None)


class DevTools:
    """A minimal Chrome DevTools Protocol client over the browser's websocket: commands go
    to one page target (a flat session); events are kept for the test to read."""

    def __init__(self, socket):
        self.socket = socket
        self.next_id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def wait_for(self, method: str, since: int = 0, timeout: float = 30) -> dict:
        """The first event ``method`` from ``self.events[since:]`` on, waiting for it."""
        for event in self.events[since:]:
            if event["method"] == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("method") == method:
                return reply

    def _receive(self, deadline: float, waiting_for: str) -> dict:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"DevTools: no answer to {waiting_for}")
        reply = json.loads(self.socket.recv(timeout=left))
        if "method" in reply:
            self.events.append(reply)
        return reply


@contextlib.contextmanager
def _chromium(binary: str, profile: Path):
    """Start headless Chromium on 127.0.0.1 with a random DevTools port; yield the browser's
    websocket URL; stop the browser (and its child processes) however the test ends."""
    log = profile.parent / "chromium.log"
    command = [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the teardown stops its children too
    )
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # read stderr to the end so that the pipe never fills
        with open(log, "w") as handle:
            for line in process.stderr:
                handle.write(line)
                handle.flush()
                match = re.search(r"DevTools listening on (ws://127\.0\.0\.1:\d+/\S+)", line)
                if match and not ready.is_set():
                    found.append(match.group(1))
                    ready.set()
        ready.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if not ready.wait(60) or not found:
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"{binary} gave no DevTools URL (exit {process.poll()}):\n{tail}")
        yield found[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        reader.join(10)


CHECK_PAGE = """JSON.stringify({
  ready: document.readyState,
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
                                                  width: i.naturalWidth})),
  references: Array.from(document.querySelectorAll('[src],[href]'))
    .map(e => e.getAttribute('src') || e.getAttribute('href')),
  verdicts: Array.from(document.querySelectorAll('table.summary td.pass, table.summary td.fail'))
    .map(td => [td.textContent, getComputedStyle(td).backgroundColor]),
  count: (document.querySelector('.count') || {}).textContent || null,
})"""


def in_chromium(page: Path, shot: Path) -> tuple[dict, list[dict]]:
    """Load ``page`` in headless Chromium (skipped without one, failed in CI): what
    ``CHECK_PAGE`` finds, and every DevTools event; a full-page screenshot into ``shot``."""
    binary = _browser()
    if binary is None:
        why = f"no headless Chromium: none of {', '.join(BROWSERS)} is on PATH"
        if os.environ.get("MISALIGN_REQUIRE_BROWSER"):  # CI, after installing one
            pytest.fail(why)
        pytest.skip(why)
    from websockets.sync.client import connect

    profile = shot.parent / "profile"
    profile.mkdir()
    with (
        _chromium(binary, profile) as url,
        connect(url, max_size=None, open_timeout=30) as socket,
    ):
        tools = DevTools(socket)
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        tools.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.send(f"{domain}.enable")
        tools.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        since = len(tools.events)  # not about:blank's load
        tools.send("Page.navigate", {"url": page.resolve().as_uri()})
        tools.wait_for("Page.loadEventFired", since, timeout=60)
        found = json.loads(
            tools.send("Runtime.evaluate", {"expression": CHECK_PAGE, "returnByValue": True})[
                "result"
            ]["value"]
        )
        size = tools.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        picture = tools.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": clip},
            timeout=60,
        )
        shot.write_bytes(base64.b64decode(picture["data"]))
    return found, tools.events


def browser_errors(events: list[dict]) -> list[dict]:
    """The console errors, exceptions and error log entries among DevTools ``events``."""
    return [
        e["params"]
        for e in events
        if (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or e["method"] == "Runtime.exceptionThrown"
        or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]


def requested(events: list[dict]) -> list[str]:
    """The URLs the page asked for (``Network.requestWillBeSent``)."""
    return [
        e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"
    ]


@pytest.mark.browser
def test_the_page_in_headless_chromium(runs, tmp_path):
    page = write_page([runs / name for name in NAMES], tmp_path / "report.html")
    shot = tmp_path / "report.png"
    started = time.monotonic()
    found, events = in_chromium(page, shot)
    seconds = time.monotonic() - started

    assert found["ready"] == "complete"
    assert len(found["images"]) == len(NAMES)
    for image in found["images"]:  # every figure decodes in the browser
        assert image["complete"] and image["width"] > 0 and image["alt"], image
    assert found["references"] and all(r.startswith(("data:", "#")) for r in found["references"])
    total = sum(len(_claims(runs / name)) for name in NAMES)
    assert found["count"] == f"{total} of {total} claims pass"
    assert len(found["verdicts"]) == len(NAMES)  # one per run in the contents
    assert {tuple(v) for v in found["verdicts"]} == {("pass", "rgb(218, 251, 225)")}  # coloured

    assert browser_errors(events) == []
    urls = requested(events)
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls

    image = Image.open(shot)
    image.load()
    assert image.format == "PNG" and image.width >= 1000 and image.height > 1500
    colours = image.convert("RGB").getcolors(maxcolors=1 << 24)
    assert len(colours) > 50  # text, tables, verdict colours and the figures: not blank
    if os.environ.get("MISALIGN_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MISALIGN_SCREENSHOT"])
    print(f"chromium: page checked and captured in {seconds:.1f} s")


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"experiment": ' + "9" * 5000 + "}"],
    ids=["nested 100,000 deep", "a 5,000-digit integer"],
)
@pytest.mark.parametrize("name", ["config.json", "claims.json"])
def test_report_of_json_no_run_writes_is_one_line(runs, tmp_path, text, name):
    shared = _shared(runs, tmp_path)
    (shared / "victim" / name).write_text(text)
    done = _report_process(shared, "--out", tmp_path / "report.html")
    assert "Traceback" not in done.stderr and done.returncode in (0, 2), done.stderr
    assert f"{name}: not JSON a run writes (too deep, or a huge number)" in done.stderr


def test_a_boundary_claim_is_judged_at_least_as_claims_json_says():
    """A boundary claim (``at_least``: measured >= tolerance) was judged ``<=`` and shown as
    failing where claims.json said pass; only a JSON ``true`` makes a claim ``at_least``."""
    from misalign.workflows.page import verdict

    assert verdict("edge", 8, 2, True) and not verdict("edge", 1, 2, True)
    assert not verdict("edge", 8, 2) and not verdict("edge", 8, 2, "true")
    assert not verdict("edge", None, 0, True)
