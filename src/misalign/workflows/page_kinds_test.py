"""Tests for the report page over every kind of run directory the CLI writes besides
``reproduce``'s (``misalign.workflows.page_kinds``), each made by the real command and reported by
the
real ``misalign report``: a play, a batch, a prediction, a design, an attack study and a sweep
(finished and not); what is not what misalign writes is one line; files that are not regular
files inside the run are left out; everything is escaped; the page in headless Chromium."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from misalign.workflows.design import COLUMNS, table_rows
from misalign.workflows.page_test import _report_main, browser_errors, in_chromium, requested

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
SWEEP = {
    "base": str(EXAMPLES / "two_agents.toml"),
    "seeds": 2,
    "chunk": 2,
    "axes": {"agents.B.eta": [0.25, 0.5, 0.75], "agents.A.n": [3, 8]},
}
COMMANDS = {
    "play": ["run", EXAMPLES / "two_agents.toml"],
    "batch": ["run", EXAMPLES / "two_agents.toml", "--seeds", "4"],
    "theory": ["theory", EXAMPLES / "two_agents.toml"],
    "design": ["design", EXAMPLES / "design.toml", "--agent", "A", "--seeds", "2"],
    "attacks": ["attacks", EXAMPLES / "attack.toml", "--seeds", "2", "--set", "rounds=20"],
    "sweep": ["sweep", "{sweep}", "--workers", "1"],
}
"""Each kind of run directory, by the command (and options) that writes it."""


def _main(*args) -> tuple[int, str, str]:
    """The real CLI in this process (``misalign ARGS``): exit code, stdout, stderr."""
    import contextlib
    import io

    from misalign.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        pytest.raises(SystemExit) as exit_,
    ):
        main([str(arg) for arg in args])
    return exit_.value.code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``runs/<kind>`` for every kind of ``COMMANDS``, each written by its command (seconds)."""
    import tomli_w

    root = tmp_path_factory.mktemp("runs")
    sweep = root.parent / "sweep.toml"
    sweep.write_text(tomli_w.dumps(SWEEP))
    for kind, args in COMMANDS.items():
        args = [str(a).format(sweep=sweep) for a in args]
        code, _, err = _main(*args, "--out", root / kind)
        assert code == 0, (kind, err)
    return root


def _page(tmp_path: Path, *dirs) -> tuple[str, str]:
    """``misalign report DIRS``: the stdout line and the page."""
    out = tmp_path / "report.html"
    code, stdout, stderr = _report_main(*dirs, "--out", out)
    assert code == 0 and stderr == "", stderr
    return stdout, out.read_text()


def _section(page: str, name: str) -> str:
    return next(s for s in page.split("<section")[1:] if f"<h2>{name}</h2>" in s)


def _facts(section: str) -> list[str]:
    block = section.split('<ul class="facts">', 1)[1].split("</ul>", 1)[0]
    return [html.unescape(f) for f in re.findall(r"<li>(.*?)</li>", block)]


def _grid(section: str, n: int = 0) -> list[list[str]]:
    """The cells of the ``n``-th small table of a section, header first."""
    table = section.split('<table class="grid">')[n + 1].split("</table>", 1)[0]
    return [
        [html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
        for row in table.split("<tr")[1:]
    ]


def _image(section: str) -> bytes:
    data = re.search(r'<img src="data:image/png;base64,([^"]+)"', section).group(1)
    return base64.b64decode(data, validate=True)


def _contents(page: str) -> dict[str, list[str]]:
    """The contents table: per run, its cells after the name."""
    table = page.split('<table class="summary">', 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in table.split("<tr")[2:]:
        cells = [
            html.unescape(re.sub("<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)
        ]
        rows[cells[0]] = cells[1:]
    return rows


def test_every_kind_is_read_in_name_order_with_its_kind_and_headline(runs, tmp_path):
    stdout, page = _page(tmp_path, runs)
    assert stdout == f"report: {tmp_path / 'report.html'} (6 runs)\n"  # no claims to count
    contents = _contents(page)
    assert list(contents) == sorted(COMMANDS)
    kinds = {name: cells[0] for name, cells in contents.items()}
    assert kinds == {
        "attacks": "attack study",
        "batch": "batch of 4 plays",
        "design": "design",
        "play": "play",
        "sweep": "sweep",
        "theory": "prediction (theory)",
    }
    assert all(cells[2:] == ["-", "-"] for cells in contents.values())  # no claims, no verdict
    assert "claims pass" not in page and "Registry entries" not in page  # not about claims
    assert "Generated " in page and " from misalign" not in page  # these runs name no version


def test_a_play_shows_what_it_did_its_prediction_and_its_figure(runs, tmp_path):
    _, page = _page(tmp_path, runs / "play")
    data = json.loads((runs / "play" / "run.json").read_text())
    p = data["prediction"]
    assert _contents(page)["play"][1] == (
        f"observed: fixed point; predicted: converges (rho = {p['rho']:.4g})"
    )
    section = _section(page, "play")
    tail = data["observed"]["tail"]
    assert _facts(section) == [
        "observed: a fixed point (every output unchanged to 1e-6 over rounds "
        f"{tail[0]}..{tail[1]})",
        f"predicted: converges (rho = {p['rho']:.4g} per round; about {p['rounds_to_tol']} rounds "
        "to shrink the error by 1e-8)",
        f"measured: every output within 1e-8 of its prediction from round "
        f"{data['rounds_to_prediction']}",
        f"{data['rounds_played']} rounds played",
    ]
    header, *rows = _grid(section)
    assert header == ["agent", "|target|", "predicted distance", "final distance"]
    assert rows == [
        [name, "1", f"{p['distance'][name]:.4g}", f"{data['distance'][name]:.4g}"]
        for name in data["agents"]
    ]
    assert _image(section) == (runs / "play" / "trajectory.png").read_bytes()
    assert 'alt="play: trajectory.png"' in section
    assert "Configuration (config.toml)" in section
    assert (runs / "play" / "config.toml").read_text() in html.unescape(section)
    assert "<h3>Table</h3>" not in section  # a play writes no CSV


def test_a_batch_shows_its_plays_classes_and_bands(runs, tmp_path):
    _, page = _page(tmp_path, runs / "batch")
    batch = json.loads((runs / "batch" / "run.json").read_text())["batch"]
    section = _section(page, "batch")
    rho = batch["rho"]
    facts = _facts(section)
    assert facts[0] == (
        f"4 plays (seeds 3..6): {batch['converging']} predicted to converge; rho median "
        f"{rho['median']:.4g}, range {rho['min']:.4g} .. {rho['max']:.4g}"
    )
    assert facts[1] == "observed: 4 at a fixed point (each play judged from its outputs)"
    assert facts[2].startswith("measured: every output within 1e-8 of its prediction from round ")
    header, *rows = _grid(section)
    assert header[:3] == ["agent", "predicted distance", "final distance"]
    a = batch["distance"]["A"]
    assert rows[0][1] == (
        f"{a['predicted_median']:.4g} [{a['predicted_q10']:.4g}, {a['predicted_q90']:.4g}]"
    )
    assert _image(section) == (runs / "batch" / "trajectory.png").read_bytes()


def test_a_prediction_has_no_figure_and_says_nothing_is_missing(runs, tmp_path):
    _, page = _page(tmp_path, runs / "theory")
    section = _section(page, "theory")
    data = json.loads((runs / "theory" / "theory.json").read_text())
    assert _facts(section)[0].startswith(
        f"predicted: converges (rho = {data['prediction']['rho']:.4g}"
    )
    assert "<img" not in section and "no figure" not in section
    assert _grid(section)[0] == ["agent", "|target|", "predicted distance"]


def test_a_design_shows_its_advice_table(runs, tmp_path):
    _, page = _page(tmp_path, runs / "design")
    section = _section(page, "design")
    data = json.loads((runs / "design" / "design.json").read_text())
    header, *rows = _grid(section)
    assert header == list(COLUMNS) and rows == [list(row) for row in table_rows(data)]
    assert _image(section) == (runs / "design" / "design.png").read_bytes()
    assert _contents(page)["design"][1] == "advice for A"


def test_an_attack_study_shows_every_row(runs, tmp_path):
    _, page = _page(tmp_path, runs / "attacks")
    section = _section(page, "attacks")
    data = json.loads((runs / "attacks" / "attacks.json").read_text())
    header, *rows = _grid(section)
    assert header[:2] == ["attack", "defence"] and len(rows) == len(data["rows"])
    assert [row[:2] for row in rows] == [[r["attack"], r["defence"]] for r in data["rows"]]
    assert _facts(section)[0].startswith("monitor ROC AUC against honest: decoy ")
    assert _image(section) == (runs / "attacks" / "attacks.png").read_bytes()


def test_a_sweep_shows_its_chunks_axes_figure_and_csv(runs, tmp_path):
    _, page = _page(tmp_path, runs / "sweep")
    section = _section(page, "sweep")
    manifest = json.loads((runs / "sweep" / "manifest.json").read_text())
    assert _facts(section) == [
        f"sweep {manifest['sweep']}: 6 points in 3 chunks; 3 of 3 finished",
        "2 plays per point; axes: agents.B.eta (3 values), agents.A.n (2 values)",
        "0 points raised (the error column of sweep.csv)",
    ]
    assert _contents(page)["sweep"][1] == "6 points, 0 errors"
    assert _image(section) == (runs / "sweep" / "sweep.png").read_bytes()
    link = re.search(r'href="data:text/csv;base64,([^"]+)" download="sweep-sweep.csv"', section)
    assert base64.b64decode(link.group(1)) == (runs / "sweep" / "sweep.csv").read_bytes()
    assert "sweep.csv: 6 rows" in section and "Configuration (sweep.toml)" in section


def test_an_unfinished_sweep_says_what_is_missing(runs, tmp_path):
    sweep = Path(shutil.copytree(runs / "sweep", tmp_path / "sweep"))
    for name in ("rows/chunk-00002.parquet", "sweep.csv", "sweep.png"):
        (sweep / name).unlink()
    _, page = _page(tmp_path, sweep)
    section = _section(page, "sweep")
    assert _facts(section)[0].endswith(
        "; 2 of 3 finished (run it again with --resume to finish it)"
    )
    assert "no figure (sweep.png is missing)" in section
    assert (
        "no table (sweep.csv is missing (an unfinished sweep, or an older one: run it again to "
        "write it))" in section
    )


@pytest.mark.parametrize(
    "kind,name,content,says",
    [
        ("play", "run.json", "[1, 2]", "not the play misalign writes (got a list)"),
        ("play", "run.json", '{"prediction": {}}', "not the play misalign writes (KeyError: "),
        ("design", "design.json", '{"agent": "A"}', "not the design misalign writes (KeyError: "),
        ("sweep", "manifest.json", "{", "not valid JSON (line 1)"),
        ("theory", "theory.json", "7", "not the prediction misalign writes (got a number)"),
    ],
)
def test_a_main_file_misalign_did_not_write_is_one_line(runs, tmp_path, kind, name, content, says):
    run = Path(shutil.copytree(runs / kind, tmp_path / kind))
    (run / name).write_text(content)
    out = tmp_path / "report.html"
    code, stdout, stderr = _report_main(run, "--out", out)
    assert code == 2 and stdout == "" and not out.exists()
    assert stderr.startswith(f"misalign: error: {run / name}: {says}")
    assert stderr.count("\n") == 1


SECRET = "misalign-secret-kinds-7c1e"


@pytest.mark.parametrize(
    "kind,name,whole",
    [
        ("play", "trajectory.png", False),
        ("play", "config.toml", False),
        ("play", "run.json", True),
        ("design", "design.png", False),
        ("sweep", "sweep.csv", False),
        ("sweep", "sweep.toml", False),
        ("sweep", "manifest.json", True),
    ],
)
def test_a_file_that_links_out_is_left_out_in_one_line(runs, tmp_path, kind, name, whole):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / name).write_bytes(b"\x89PNG\r\n\x1a\n" + SECRET.encode())
    shared = tmp_path / "shared"
    run = Path(shutil.copytree(runs / kind, shared / kind))
    shutil.copytree(runs / "theory", shared / "theory")  # a good run beside it
    (run / name).unlink()
    (run / name).symlink_to(secret / name)
    out = tmp_path / "report.html"
    code, stdout, stderr = _report_main(shared, "--out", out)
    assert code == 0 and stdout.startswith(f"report: {out} ({'1 run' if whole else '2 runs'})")
    assert stderr.startswith(f"misalign: warning: {run / name}: a symbolic link; ")
    assert stderr.count("\n") == 1 and SECRET not in stderr
    page = out.read_text()
    assert SECRET not in page
    assert not any(
        SECRET.encode() in base64.b64decode(d) for d in re.findall(r"base64,([^\"]+)", page)
    )
    if not whole:
        assert f"{name} left out: a symbolic link" in page


def test_a_fifo_is_not_waited_on(runs, tmp_path):
    run = Path(shutil.copytree(runs / "play", tmp_path / "play"))
    (run / "config.toml").unlink()
    os.mkfifo(run / "config.toml")
    code, _, stderr = _report_main(run, "--out", tmp_path / "report.html")
    assert code == 0 and stderr.startswith(f"misalign: warning: {run / 'config.toml'}: a FIFO; ")


def test_what_a_run_holds_is_escaped(runs, tmp_path):
    run = Path(shutil.copytree(runs / "play", tmp_path / "play"))
    data = json.loads((run / "run.json").read_text())
    bad = '<script>alert("x")</script>'
    data["agents"] = {bad: data["agents"]["A"]}
    data["observed"]["class"] = "<img src=x onerror=alert(1)>"
    (run / "run.json").write_text(json.dumps(data))
    (run / "config.toml").write_text('seed = 1 # </pre><script>alert("y")</script>\n')
    _, page = _page(tmp_path, run)
    assert "<script>" not in page and "<img src=x" not in page
    assert bad in html.unescape(page) and "observed: &lt;img src=x onerror=alert(1)&gt;" in page


def test_reproduce_runs_and_other_runs_on_one_page(runs, tmp_path):
    from misalign.experiments import REGISTRY

    mixed = Path(shutil.copytree(runs, tmp_path / "runs"))
    REGISTRY["single-agent"].run(True, None, mixed / "single-agent")
    stdout, page = _page(tmp_path, mixed)
    n = len(json.loads((mixed / "single-agent" / "claims.json").read_text()))
    assert stdout.endswith(f"(7 runs, {n} of {n} claims pass)\n")
    assert list(_contents(page)) == ["single-agent", *sorted(COMMANDS)]  # the registry's first
    assert f"Registry entries with no run here ({len(REGISTRY) - 1} of {len(REGISTRY)})" in page
    assert page.count("<section") == 7


@pytest.mark.browser
def test_a_page_of_every_kind_in_headless_chromium(runs, tmp_path):
    from misalign.workflows.page import write_page

    page = write_page([runs], tmp_path / "report.html")
    found, events = in_chromium(page, tmp_path / "report.png")
    assert found["ready"] == "complete" and found["count"] is None  # no claims on this page
    assert len(found["images"]) == 5  # every kind but the prediction draws a figure
    for image in found["images"]:
        assert image["complete"] and image["width"] > 0, image
    assert browser_errors(events) == []
    urls = requested(events)
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
    shot = Image.open(tmp_path / "report.png")
    assert shot.width >= 1000 and shot.height > 3000
