"""Tests for what a finished sweep shows, through the real ``misalign sweep``: the summary
table on stdout (per point, or per value of the first axis), ``sweep.csv`` equal to the parquet
rows, ``sweep.png`` (a line, a line per value of the second axis, or a heat map), and all of it
after a stopped sweep is finished with ``--resume``."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import pytest
import tomli_w
from PIL import Image

import misalign.workflows.sweep
from misalign.cli import main
from misalign.workflows.sweep import load_sweep, read_rows

BASE = {
    "seed": 3,
    "d": 3,
    "rounds": 60,
    "agents": {"A": {"n": 6, "target": [1.0, 0.0, 0.0]}, "B": {"n": 6, "eta": 0.5}},
}
ONE_AXIS = {"agents.B.eta": {"linspace": [0.25, 1.0, 4]}}


def steps(n: int) -> list[float]:
    """``n`` step scales from 0.2 to 1.4, as a list (tomli_w writes a range's table after
    every list, which would change the axes' order)."""
    return [0.2 + 1.2 * i / (n - 1) for i in range(n)]


def _sweep(tmp_path: Path, axes: dict, **keys) -> tuple[Path, Path]:
    """A sweep file over ``axes`` (2 seeds a point, chunks of 3) and where its output goes."""
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps({"base": BASE, "seeds": 2, "chunk": 3, "axes": axes} | keys))
    return path, tmp_path / "out"


def _cli(capsys, *args) -> tuple[int, str, str]:
    """``misalign ARGS``, the real CLI in this process: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as caught:
        main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return caught.value.code, captured.out, captured.err


def _table(stdout: str) -> list[list[str]]:
    """The cells of the rich table on stdout, header first."""
    return [
        [cell.strip() for cell in line.strip("┃│ \n").replace("┃", "│").split("│")]
        for line in stdout.splitlines()
        if line.startswith(("┃", "│"))
    ]


def _assert_csv_is_the_parquet(out: Path) -> list[dict]:
    """``sweep.csv`` holds every parquet row, column for column: numbers that read back the
    same, an empty field for a missing value, lists as JSON. Returns the parquet rows."""
    rows = read_rows(out).to_pylist()
    with open(out / "sweep.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == list(rows[0])
        text = list(reader)
    assert len(text) == len(rows)
    for row, line in zip(rows, text, strict=True):
        for key, value in row.items():
            if value is None:
                assert line[key] == "", (key, line[key])
            elif isinstance(value, list):
                assert json.loads(line[key]) == value
            else:
                assert type(value)(line[key]) == value, (key, line[key], value)
    return rows


def _titles(out: Path) -> str:
    image = Image.open(out / "sweep.png")
    assert image.format == "PNG" and image.width > 1000
    return image.text["Description"]


@pytest.mark.parametrize(
    "axes,mode",
    [(ONE_AXIS, "grid"), ({"agents.B.eta": [1.0, 0.25, 0.5], "seed": [1, 2, 3]}, "zip")],
    ids=["one axis", "zip"],
)
def test_a_small_sweep_prints_a_row_per_point_and_writes_the_csv_and_a_line(
    tmp_path, capsys, axes, mode
):
    path, out = _sweep(tmp_path, axes, mode=mode)
    code, stdout, err = _cli(capsys, "sweep", path, "--out", out, "--workers", "1")
    assert code == 0 and err == ""
    rows = _assert_csv_is_the_parquet(out)
    header, *shown = _table(stdout)
    assert header == ["point", *axes, "rho_median", "share_diverged"] + [
        "rounds_to_prediction_median",
        "A.residual_mean",
        "B.residual_mean",
    ]
    assert len(shown) == len(rows)
    for cells, row in zip(shown, rows, strict=True):
        assert cells[0] == str(row["point"]) and cells[1] == format(row["agents.B.eta"], ".4g")
        assert cells[len(axes) + 1] == format(row["rho_median"], ".4g")
    assert f"{len(rows)} points, 2 plays each" in stdout
    last = stdout.splitlines()[-1]
    assert last.endswith(f"; table {out / 'sweep.csv'}, figure {out / 'sweep.png'}")
    titles = _titles(out)
    assert "rho, median over each point's plays" in titles and "share of plays" in titles
    assert "a line per" not in titles and "heat map" not in titles


def test_a_sweep_of_many_points_is_summed_up_per_value_of_the_first_axis(tmp_path, capsys):
    axes = {"agents.B.eta": steps(25), "agents.A.eta": [0.5, 1.0]}
    path, out = _sweep(tmp_path, axes, chunk=10)
    code, stdout, _ = _cli(capsys, "sweep", path, "--out", out, "--workers", "2")
    assert code == 0
    rows = _assert_csv_is_the_parquet(out)
    header, *shown = _table(stdout)
    assert header[:3] == ["agents.B.eta", "points", "rho_median"] and header[-1] == "errors"
    assert len(shown) == 20  # of the 25 values, evenly spread, the first and the last
    assert "per value of agents.B.eta, over its 2 points" in stdout
    assert "20 of the 25 values shown (every row in sweep.csv)" in " ".join(stdout.split())
    etas = sorted({row["agents.B.eta"] for row in rows})
    assert shown[0][0] == format(etas[0], ".4g") and shown[-1][0] == format(etas[-1], ".4g")
    for cells in shown:
        eta = next(e for e in etas if format(e, ".4g") == cells[0])
        same = [row for row in rows if row["agents.B.eta"] == eta]
        assert cells[1] == "2" and cells[-1] == "0"
        median = statistics.median(row["rho_median"] for row in same)
        share = statistics.mean(row["share_diverged"] for row in same)
        assert cells[2:4] == [format(median, ".4g"), format(share, ".4g")]
    assert _titles(out).count("(a line per agents.A.eta)") == 3


def test_two_axes_of_many_values_are_a_heat_map_and_lists_are_json(tmp_path, capsys):
    targets = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    axes = {"agents.A.target": targets, "agents.B.eta": steps(9)}
    path, out = _sweep(tmp_path, axes, chunk=20)
    code, stdout, _ = _cli(capsys, "sweep", path, "--out", out, "--workers", "1")
    assert code == 0
    rows = _assert_csv_is_the_parquet(out)
    assert rows[0]["agents.A.target"] == targets[0]  # a list column in parquet, JSON in CSV
    header, *shown = _table(stdout)
    assert header[:2] == ["agents.A.target", "points"] and len(shown) == 3
    assert [cells[0] for cells in shown] == [json.dumps(t) for t in targets]
    assert _titles(out).count("(heat map, agents.B.eta up)") == 3
    axes["agents.A.n"] = [3, 8]  # a third axis is reduced, named in every title
    path, out = _sweep(tmp_path, axes, chunk=20)
    assert _cli(capsys, "sweep", path, "--out", tmp_path / "three")[0] == 0
    titles = _titles(tmp_path / "three")
    assert "(heat map, agents.B.eta up; mean over agents.A.n)" in titles
    assert titles.count("; median over agents.A.n)") == 2


def test_a_point_that_raises_shows_its_error_in_the_table_and_the_csv(tmp_path, capsys):
    path = tmp_path / "s.toml"
    base = {**BASE, "agents": {"A": {"n": 6, "steps_per_turn": 1000}, "B": {"n": 6}}}
    path.write_text(tomli_w.dumps({"base": base, "axes": {"agents.A.eta": [0.5, 1e30, 0.25]}}))
    code, stdout, _ = _cli(capsys, "sweep", path, "--out", tmp_path / "out")
    assert code == 0 and ", 1 error; " in stdout and _table(stdout)[0][-1] == "error"
    rows = _assert_csv_is_the_parquet(tmp_path / "out")
    assert rows[1]["error"].startswith("ConfigError: agents.A: its turn map overflows")
    code, stdout, _ = _cli(capsys, "sweep", path, "--out", tmp_path / "out", "--json")
    table = json.loads(stdout)["table"]
    assert table["columns"][-1] == "error" and [row[-1] for row in table["rows"]] == [
        None,
        rows[1]["error"],
        None,
    ]


def test_a_stopped_sweep_writes_no_csv_and_resume_writes_the_whole_one(
    tmp_path, capsys, monkeypatch
):
    path, out = _sweep(tmp_path, ONE_AXIS, chunk=1)
    real = misalign.workflows.sweep.run_chunk

    def dies_on_the_third(chunk):
        if chunk.k == 2:
            raise RuntimeError("worker died")
        return real(chunk)

    monkeypatch.setattr(misalign.workflows.sweep, "run_chunk", dies_on_the_third)
    code, stdout, err = _cli(capsys, "sweep", path, "--out", out, "--workers", "1")
    assert code == 1 and stdout == "" and "run it again with --resume" in err
    assert not (out / "sweep.csv").exists() and not (out / "sweep.png").exists()
    monkeypatch.setattr(misalign.workflows.sweep, "run_chunk", real)
    code, stdout, _ = _cli(capsys, "sweep", path, "--out", out, "--workers", "1", "--resume")
    assert code == 0 and "4 points in 4 chunks (2 computed now, " in stdout
    rows = _assert_csv_is_the_parquet(out)
    assert [row["point"] for row in rows] == [0, 1, 2, 3] and len(_table(stdout)) == 5
    (tmp_path / "once").mkdir()
    again, once = _sweep(tmp_path / "once", ONE_AXIS, chunk=1)
    assert _cli(capsys, "sweep", again, "--out", once)[0] == 0
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(rows) == drop(read_rows(once).to_pylist())

    stamp = (out / "sweep.csv").stat().st_mtime_ns  # finished: only what is missing is written
    (out / "sweep.png").unlink()
    code, stdout, _ = _cli(capsys, "sweep", path, "--out", out)
    assert code == 0 and "already finished: 4 points" in stdout and len(_table(stdout)) == 5
    assert (out / "sweep.csv").stat().st_mtime_ns == stamp and (out / "sweep.png").exists()


def test_json_summary_names_the_csv_the_figure_and_holds_the_table(tmp_path, capsys):
    path, out = _sweep(tmp_path, ONE_AXIS)
    code, stdout, _ = _cli(capsys, "sweep", path, "--out", out, "--json")
    summary = json.loads(stdout)  # the JSON alone: no table printed
    assert code == 0 and summary["csv"] == str(out / "sweep.csv")
    assert summary["figure"] == str(out / "sweep.png")
    assert summary["table"]["columns"][:3] == ["point", "agents.B.eta", "rho_median"]
    assert [row[0] for row in summary["table"]["rows"]] == [0, 1, 2, 3]


def test_a_csv_that_cannot_be_written_is_one_line(tmp_path, capsys):
    path, out = _sweep(tmp_path, ONE_AXIS)
    (out / "sweep.csv").mkdir(parents=True)  # a directory in the CSV's place
    code, stdout, err = _cli(capsys, "sweep", path, "--out", out)
    assert code == 2 and stdout == ""
    assert err == f"misalign: error: --out {out}: cannot write sweep.csv (Is a directory)\n"
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["chunk-00000.parquet"] + [
        "chunk-00001.parquet"
    ]


ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "sweeps" / "eta_by_n.toml"


def test_the_readme_loads_the_example_sweep_with_pandas_in_three_lines(
    tmp_path, capsys, monkeypatch
):
    readme = (ROOT / "docs" / "sweeps.md").read_text()
    code = re.search(r"```python\n(import pandas as pd\n.*?)```", readme, re.S).group(1)
    assert len([line for line in code.splitlines() if line]) == 3
    assert f'"runs/sweep-{load_sweep(EXAMPLE).digest}/rows"' in code  # the example's --out
    pd = pytest.importorskip("pandas")  # not a dependency of misalign
    monkeypatch.chdir(tmp_path)
    assert _cli(capsys, "sweep", EXAMPLE)[0] == 0
    exec(code, {})
    printed = capsys.readouterr().out
    rows = read_rows(tmp_path / "runs" / f"sweep-{load_sweep(EXAMPLE).digest}").to_pandas()
    assert printed.splitlines()[0].split() == ["agents.B.eta", "agents.A.n"] + [
        "rho_median",
        "share_diverged",
    ]
    assert len(printed.splitlines()) == len(rows) + 1 and isinstance(rows, pd.DataFrame)
