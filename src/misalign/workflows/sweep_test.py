"""Tests for sweeps: axes, validation before any point runs, the rows against the batch report,
refusals of a changed or partial output, backends giving the same rows, and a real process
killed with SIGKILL at several moments then resumed with nothing lost or recomputed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import misalign.runtime.sizes
import misalign.workflows.sweep
from misalign.api import predict, setup, simulate
from misalign.cli import main
from misalign.config import ConfigError, parse_config
from misalign.config_test import refused
from misalign.outputs.batch import batch
from misalign.runtime.reaper import descendants, same_process
from misalign.workflows.sweep import (
    SweepConfig,
    SweepStopped,
    axis_values,
    check_grid,
    chunk_path,
    load_sweep,
    parse_sweep,
    read_rows,
    run_point,
    run_sweep,
)

ROOT = Path(__file__).resolve().parents[3]
SWEEP = ROOT / "examples" / "sweeps" / "eta_by_n.toml"
BASE = {
    "seed": 3,
    "d": 3,
    "rounds": 200,
    "agents": {"A": {"n": 6, "target": [1.0, 0.0, 0.0]}, "B": {"n": 6, "eta": 0.5}},
}


def small(**changes) -> dict:
    """A small sweep as data: 3 x 2 points, 3 seeds each, chunks of 2."""
    data = {
        "base": BASE,
        "seeds": 3,
        "chunk": 2,
        "axes": {"agents.B.eta": {"linspace": [0.25, 1.0, 3]}, "agents.A.n": [3, 8]},
    }
    return data | changes


def without_seconds(table) -> list[dict]:
    """The rows, ``seconds`` left out (it is the only column that differs between runs)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in table.to_pylist()]


def test_axis_values_lists_and_ranges():
    assert axis_values("a", [1, "x", [1, 2]]) == [1, "x", [1, 2]]
    assert axis_values("a", {"linspace": [0, 1, 3]}) == [0.0, 0.5, 1.0]
    assert np.allclose(axis_values("a", {"logspace": [0.01, 1, 3]}), [0.01, 0.1, 1.0])
    draws = axis_values("a", {"uniform": [2, 3, 5], "seed": 7})
    assert draws == axis_values("a", {"uniform": [2, 3, 5], "seed": 7}) and len(draws) == 5
    assert all(2 <= x <= 3 for x in draws)
    assert draws != axis_values("a", {"uniform": [2, 3, 5], "seed": 8})


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ([], "at least one value"),
        ({"linspace": [0, 1]}, "linspace needs [start, stop, count]"),
        ({"linspace": [0, 1, 2.5]}, "linspace needs"),
        ({"logspace": [0, 1, 3]}, "positive ends"),
        ({"uniform": [0, 1, 3]}, "its own seed"),
        ({"range": [0, 1, 3]}, "expected a list of values"),
        ({"linspace": [0, 1, 3], "logspace": [1, 2, 3]}, "expected a list of values"),
    ],
)
def test_bad_axis_is_one_line_naming_it(spec, says):
    with pytest.raises(ConfigError) as caught:
        axis_values("agents.B.eta", spec)
    assert str(caught.value).startswith("axis agents.B.eta: ") and says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_grid_and_zip():
    grid = parse_sweep(small())
    assert grid.points == ((0.25, 3), (0.25, 8), (0.625, 3), (0.625, 8), (1.0, 3), (1.0, 8))
    assert grid.chunks == 3 and grid.agents == ("A", "B")
    zipped = parse_sweep(small(mode="zip", axes={"agents.B.eta": [0.5, 1.0], "seed": [1, 2]}))
    assert zipped.points == ((0.5, 1), (1.0, 2))
    with pytest.raises(ConfigError, match=r"^axes: zip mode needs axes of one length"):
        parse_sweep(small(mode="zip"))


@pytest.mark.parametrize(
    ("axes", "says"),
    [
        ({"agents.B.etaa": [0.5]}, "axis agents.B.etaa = 0.5: unknown key"),
        ({"agents.B.eta": [0.5, "fast"]}, 'axis agents.B.eta = "fast": input should be'),
        ({"agents.B.eta": [0.5, -1.0]}, "axis agents.B.eta = -1.0: input should be greater"),
        ({"d": {"linspace": [2, 4, 3]}}, "axis d = 2.0: input should be a valid integer"),
        ({"agents.C.eta": [0.5]}, "axis agents.C.eta = 0.5: no agent 'C'"),
        ({"seeds": [1]}, "axis seeds = 1: unknown key"),
    ],
)
def test_an_axis_giving_a_bad_configuration_names_it_before_any_point_runs(axes, says):
    with pytest.raises(ConfigError) as caught:
        parse_sweep(small(axes=axes))
    assert str(caught.value).startswith(says) and "\n" not in str(caught.value)


def test_a_bad_combination_names_every_axis_of_the_point():
    base = {**BASE, "agents": {"A": {"n": 6}, "B": {"n": 6}}}  # no length fixed by d
    axes = {"d": [3, 4], "agents.B.spectrum": [[1.0, 2.0, 3.0]]}
    with pytest.raises(ConfigError) as caught:
        parse_sweep(small(base=base, axes=axes))
    assert str(caught.value) == (
        "axes d = 4, agents.B.spectrum = [1.0, 2.0, 3.0]: "
        "agents.B.spectrum: must have length d = 4 (got 3)"
    )


def test_sweep_keys_and_base_are_checked():
    with pytest.raises(ConfigError, match=r"^seeds: input should be greater"):
        parse_sweep(small(seeds=0))
    with pytest.raises(ConfigError, match=r"^grid: unknown key"):
        parse_sweep(small(grid=True))
    with pytest.raises(ConfigError, match=r"^base: d: is required"):
        parse_sweep(small(base={"rounds": 3, "agents": {"A": {"n": 2}}}))
    with pytest.raises(ConfigError, match=r"^base: .*nowhere.toml: no such file"):
        parse_sweep(small(base="nowhere.toml"))
    llm = {**BASE, "agents": {**BASE["agents"], "C": {"kind": "llm", "n": 2, "model": "m"}}}
    with pytest.raises(ConfigError, match=r"a sweep plays no black-box agents \(llm\)"):
        parse_sweep(small(base=llm))


def test_base_path_is_read_beside_the_sweep_and_the_resolved_sweep_has_the_same_hash(tmp_path):
    sweep = load_sweep(SWEEP)
    assert sweep.base["agents"]["A"]["spectrum"] == [1.0, 0.5, 2.0, 1.0]
    assert len(sweep.points) == 32
    run_sweep(parse_sweep(small()), tmp_path / "out", workers=1)
    assert load_sweep(tmp_path / "out" / "sweep.toml").digest == parse_sweep(small()).digest


def test_a_point_row_is_the_batch_report_of_its_configuration():
    row = run_point(BASE, ["agents.B.eta"], [0.75], seeds=5)
    config = parse_config({**BASE, "agents": {**BASE["agents"], "B": {"n": 6, "eta": 0.75}}})
    game = setup(config, seeds=range(3, 8))
    trajectory = simulate(game)
    prediction = predict(game)
    report = batch(game, prediction, trajectory)
    assert row["error"] is None and row["share_diverged"] == 0.0
    assert row["rho_median"] == pytest.approx(report["rho"]["median"], rel=1e-12)
    assert row["rounds_to_prediction_median"] == report["rounds_to_prediction"]["median"]
    for name in ("A", "B"):
        distance = report["distance"][name]
        assert row[f"{name}.residual_mean"] == pytest.approx(distance["simulated_mean"], rel=1e-12)
        assert row[f"{name}.residual_std"] == pytest.approx(distance["simulated_std"], rel=1e-12)
        assert row[f"{name}.predicted_residual"] == pytest.approx(
            distance["predicted_mean"], rel=1e-12
        )


def test_a_diverging_point_has_no_residual_and_share_one():
    row = run_point({**BASE, "rounds": 3000}, ["agents.B.eta"], [30.0], seeds=2)
    assert row["error"] is None and row["share_diverged"] == 1.0 and row["rho_median"] > 1
    assert row["B.residual_mean"] is None and row["B.predicted_residual"] is None


def test_a_point_that_raises_is_a_row_with_its_error_and_the_sweep_goes_on(tmp_path):
    base = {**BASE, "agents": {"A": {"n": 6, "steps_per_turn": 1000}, "B": {"n": 6}}}
    sweep = parse_sweep({"base": base, "axes": {"agents.A.eta": [0.5, 1e30, 0.25]}})
    summary = run_sweep(sweep, tmp_path, workers=1)
    rows = read_rows(tmp_path).to_pylist()
    assert summary["errors"] == 1 and [r["point"] for r in rows] == [0, 1, 2]
    assert rows[1]["error"].startswith("ConfigError: agents.A: its turn map overflows")
    assert rows[1]["A.residual_mean"] is None and rows[1]["seconds"] > 0
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert math.isfinite(rows[2]["A.residual_mean"])


def test_one_worker_and_two_give_the_same_rows_and_a_finished_sweep_is_a_no_op(tmp_path):
    sweep = parse_sweep(small())
    one = run_sweep(sweep, tmp_path / "one", workers=1)
    two = run_sweep(sweep, tmp_path / "two", workers=2)
    assert one["computed"] == two["computed"] == 3 and not one["finished_before"]
    rows = read_rows(tmp_path / "one")
    assert rows.column("point").to_pylist() == list(range(6))
    assert without_seconds(rows) == without_seconds(read_rows(tmp_path / "two"))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*")}
    again = run_sweep(sweep, tmp_path / "one", workers=1)
    assert again["finished_before"] and again["computed"] == 0 and again["points"] == 6
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "one").rglob("*")} == stamps
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["sweep"] == sweep.digest and manifest["chunks"] == 3


def test_a_changed_sweep_or_a_partial_one_without_resume_is_refused(tmp_path):
    sweep = parse_sweep(small())
    run_sweep(sweep, tmp_path, workers=1)
    changed = parse_sweep(small(seeds=4))
    with pytest.raises(ConfigError, match=rf"holds sweep {sweep.digest}, not this sweep file"):
        run_sweep(changed, tmp_path, workers=1)
    chunk_path(tmp_path, 1).unlink()
    with pytest.raises(ConfigError, match=r"this sweep has 2 of 3 chunks done; pass --resume"):
        run_sweep(sweep, tmp_path, workers=1)
    kept = chunk_path(tmp_path, 0).stat().st_mtime_ns
    resumed = run_sweep(sweep, tmp_path, workers=1, resume=True)
    assert resumed["computed"] == 1 and chunk_path(tmp_path, 0).stat().st_mtime_ns == kept
    assert read_rows(tmp_path).column("point").to_pylist() == list(range(6))


def test_a_backend_failure_keeps_the_finished_chunks_and_says_to_resume(monkeypatch, tmp_path):
    sweep = parse_sweep(small())
    real = misalign.workflows.sweep.run_chunk

    def dies_on_the_second(chunk):
        if chunk.k == 1:
            raise RuntimeError("worker died\nand more")
        return real(chunk)

    monkeypatch.setattr(misalign.workflows.sweep, "run_chunk", dies_on_the_second)
    with pytest.raises(SweepStopped) as caught:
        run_sweep(sweep, tmp_path, workers=1)
    assert str(caught.value) == (
        "the sweep stopped after 1 new chunk (RuntimeError: worker died); the finished "
        "chunks are kept: run it again with --resume"
    )
    assert [p.name for p in (tmp_path / "rows").iterdir()] == ["chunk-00000.parquet"]
    monkeypatch.setattr(misalign.workflows.sweep, "run_chunk", real)
    assert run_sweep(sweep, tmp_path, workers=1, resume=True)["computed"] == 2
    assert read_rows(tmp_path).column("point").to_pylist() == list(range(6))


def test_without_ray_the_ray_backend_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(SystemExit) as caught:
        main(["sweep", str(SWEEP), "--backend", "ray", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1
    assert "pip install '.[ray]'" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--backend", "dask"], "--backend: expected local or ray (got 'dask')"),
        (["--address", "127.0.0.1:1"], "--address: needs --backend ray"),
    ],
)
def test_cli_refuses_bad_options_in_one_line(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as caught:
        main(["sweep", str(SWEEP), "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err == f"misalign: error: {says}\n"


def test_cli_bad_axis_exits_2_before_any_point_runs(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(
        'base = "{}"\n[axes]\n"agents.B.etaa" = [0.5]\n'.format(ROOT / "examples/two_agents.toml")
    )
    with pytest.raises(SystemExit) as caught:
        main(["sweep", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert err == "misalign: error: axis agents.B.etaa = 0.5: unknown key\n"
    assert not (tmp_path / "out").exists()


def _write_sweep(path: Path, axes: str, base: str | None = None) -> Path:
    """A sweep file of the two-agent example (or ``base``, TOML) over ``axes`` (TOML lines)."""
    base = json.dumps(str(ROOT / "examples" / "two_agents.toml")) if base is None else base
    path.write_text(f"base = {base}\n[axes]\n{axes}\n")
    return path


@pytest.mark.parametrize(
    "axes,says",
    [
        (
            '"agents.B.eta" = [{}]\n"agents.A.n" = [{}]'.format(
                ", ".join(f"{0.1 + k * 1e-5:.5f}" for k in range(30_000)),
                ", ".join(str(4 + k) for k in range(30_000)),
            ),
            "900,000,000 points (30000 x 30000), more than the limit of 1,000,000 points",
        ),
        (
            "\n".join(
                f'"{axis}" = {{linspace = [0.1, 1.0, 1000]}}'
                for axis in ("agents.A.eta", "agents.B.eta", "agents.B.noise")
            ),
            "1,000,000,000 points (1000 x 1000 x 1000), more than the limit of 1,000,000",
        ),
    ],
    ids=["two-lists-of-30000", "three-linspaces-of-1000"],
)
def test_a_grid_beyond_the_limit_is_refused_at_once_before_anything_is_built(tmp_path, axes, says):
    """The grid's size is the product of its axes' sizes, counted before any value or point
    exists: refused in one line naming the count and the limit, exit 2, in well under a
    second (the bound below is loose: a loaded machine must not make it flaky)."""
    path = _write_sweep(tmp_path / "s.toml", axes)
    started = time.perf_counter()
    line = refused("sweep", path, "--out", tmp_path / "out")
    assert time.perf_counter() - started < 5
    assert line.startswith(f"misalign: error: axes: the sweep has {says}")
    assert not (tmp_path / "out").exists()


def test_a_grid_that_memory_cannot_hold_is_refused(monkeypatch):
    """Under the point limit, the grid's estimated memory must fit too (``sizes.require``)."""
    monkeypatch.setattr(misalign.runtime.sizes, "available_memory", lambda: 10**5)
    with pytest.raises(ConfigError, match=r"^axes: the sweep's 1,000 points needs .* of memory"):
        check_grid(SweepConfig(base=BASE, axes={"seed": {"linspace": [0, 1, 1000]}}))
    zipped = SweepConfig(base=BASE, mode="zip", axes={"seed": [1, 2], "agents.A.n": [4, 5]})
    assert check_grid(zipped) == 2


@pytest.mark.parametrize(
    "axes,base,says",
    [
        (f'"seed" = {"[" * 3000}{"]" * 3000}', None, "s.toml: invalid TOML: nested too deeply"),
        (f'"seed" = {"[" * 100}{"]" * 100}', None, "axes.seed.0.0.0.0...: nested more than 32"),
        (
            '"seed" = [1]',
            f"{{d = 2, rounds = 3, agents = {{A = {{n = 4}}}}, x = {'[' * 100}{']' * 100}}}",
            "base.x.0.0.0.0...: nested more than 32 levels deep",
        ),
    ],
    ids=["file", "axis", "inline-base"],
)
def test_deep_nesting_in_a_sweep_file_is_one_line(tmp_path, axes, base, says):
    path = _write_sweep(tmp_path / "s.toml", axes, base)
    assert says in refused("sweep", path, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_json_summary(tmp_path, capsys):
    path = tmp_path / "s.toml"
    import tomli_w

    path.write_text(tomli_w.dumps(small()))
    with pytest.raises(SystemExit) as caught:
        main(["sweep", str(path), "--out", str(tmp_path / "out"), "--workers", "1", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert caught.value.code == 0
    assert {k: summary[k] for k in ("points", "chunks", "errors", "computed")} == {
        "points": 6,
        "chunks": 3,
        "errors": 0,
        "computed": 3,
    }
    assert summary["out"] == str(tmp_path / "out") and summary["seconds"] > 0
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--out", str(tmp_path / "out")])
    assert "already finished: 6 points" in capsys.readouterr().out


def test_a_sweep_of_one_point_says_one_point_in_one_chunk(tmp_path, capsys):
    import tomli_w

    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(small(axes={"agents.A.n": [3]})))
    with pytest.raises(SystemExit) as caught:
        main(["sweep", str(path), "--out", str(tmp_path / "out"), "--workers", "1"])
    line = capsys.readouterr().out
    assert caught.value.code == 0
    assert ": 1 point in 1 chunk (1 computed now, " in line and "s), 0 errors; rows" in line
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--out", str(tmp_path / "out")])
    assert "already finished: 1 point in " in capsys.readouterr().out


def _cli(capsys, *args) -> tuple[int, str, str]:
    """``misalign ARGS`` (the real CLI, in this process): exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as caught:
        main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return caught.value.code, captured.out, captured.err


def _finished(tmp_path: Path, capsys, name: str = "s", **changes) -> tuple[Path, Path]:
    """A small sweep file (``small(**changes)``) and its finished output, by the CLI."""
    import tomli_w

    path, out = tmp_path / f"{name}.toml", tmp_path / name
    path.write_text(tomli_w.dumps(small(**changes)))
    code, _, err = _cli(capsys, "sweep", path, "--out", out, "--workers", "1")
    assert code == 0, err
    return path, out


def _resumed(capsys, path: Path, out: Path, spoiled: str, why: str, again: str) -> None:
    """A sweep with one spoiled chunk file: refused in one line without --resume (naming it),
    finished with it and one warning line; its rows are those of the untouched sweep and
    the other chunk files are not rewritten."""
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "rows").iterdir() if p.name != spoiled}
    code, _, err = _cli(capsys, "sweep", path, "--out", out, "--workers", "1")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"misalign: error: --out {out}: this sweep has ") and spoiled in err
    assert err.endswith("; pass --resume to finish it\n")
    code, stdout, err = _cli(capsys, "sweep", path, "--out", out, "--workers", "1", "--resume")
    assert code == 0 and err.count("\n") == 1, err
    assert err.startswith(f"misalign: warning: --out {out}: rows/{spoiled} {why}")
    assert err.endswith(f"; {again}\n")
    if again == "computing it again":
        assert "6 points in 3 chunks (1 computed now, " in stdout
    else:
        assert "already finished: 6 points" in stdout
    after = {p.name: p.stat().st_mtime_ns for p in (out / "rows").iterdir()}
    assert {name: after[name] for name in kept} == kept
    assert sorted(after) == [f"chunk-{k:05d}.parquet" for k in range(3)]


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda data: data[: len(data) // 2], "is damaged (Parquet magic bytes not found"),
        (lambda data: b"", "is damaged (Parquet file size is 0 bytes"),
        (lambda data: b"PAR1" + bytes(100) + data[-200:], "is damaged ("),
        (lambda data: data[:250] + bytes([data[250] ^ 0xFF]) + data[251:], "is damaged ("),
    ],
    ids=["truncated", "empty", "garbage inside", "a flipped byte"],
)
def test_resume_computes_a_damaged_chunk_again_in_one_line(tmp_path, capsys, damage, why):
    """Issue 21: a damaged chunk file was a 94-line ArrowInvalid traceback on --resume."""
    path, out = _finished(tmp_path, capsys)
    before = without_seconds(read_rows(out))
    chunk = chunk_path(out, 1)
    chunk.write_bytes(damage(chunk.read_bytes()))
    _resumed(capsys, path, out, chunk.name, why, "computing it again")
    assert without_seconds(read_rows(out)) == before


def _unlabelled(source: Path, target: Path) -> None:
    """``source``'s rows written to ``target`` without the sweep they belong to (as an older
    misalign, or another program, writes them)."""
    pq.write_table(pq.read_table(source).replace_schema_metadata(None), target)


@pytest.mark.parametrize(
    ("spoil", "name", "why", "again"),
    [
        (
            lambda mine, other: other / "rows" / "chunk-00001.parquet",
            "chunk-00001.parquet",
            "holds rows of sweep {other}, not of this one ({mine})",
            "computing it again",
        ),
        (
            lambda mine, other: mine / "rows" / "chunk-00000.parquet",
            "chunk-00001.parquet",
            "holds the rows of chunk 0, not of chunk 1",
            "computing it again",
        ),
        (
            lambda mine, other: mine / "rows" / "chunk-00002.parquet",
            "chunk-00007.parquet",
            "is not a chunk of this sweep (3 chunks)",
            "removed",
        ),
        (
            None,
            "chunk-00001.parquet",
            "records no sweep (not written by misalign sweep, or by an older version)",
            "computing it again",
        ),
    ],
    ids=["from another sweep", "another chunk of this sweep", "beyond its chunks", "unlabelled"],
)
def test_resume_computes_a_chunk_of_another_sweep_again_in_one_line(
    tmp_path, capsys, spoil, name, why, again
):
    """Issue 21: a chunk copied in from another sweep with the same columns was taken as
    finished, mixing two sweeps; so would a chunk in another chunk's place or an extra one."""
    path, out = _finished(tmp_path, capsys)
    _, other = _finished(tmp_path, capsys, "other", seeds=4)
    before = without_seconds(read_rows(out))
    target = out / "rows" / name
    if spoil is None:
        _unlabelled(target, target)
    else:
        target.write_bytes(spoil(out, other).read_bytes())
    digests = {
        "mine": json.loads((out / "manifest.json").read_text())["sweep"],
        "other": json.loads((other / "manifest.json").read_text())["sweep"],
    }
    _resumed(capsys, path, out, name, why.format(**digests), again)
    assert without_seconds(read_rows(out)) == before


def test_resume_with_the_axes_in_another_order_computes_every_chunk_again(tmp_path, capsys):
    """The sweep's hash does not see the order of its axes, which orders its points: after
    the axes are swapped, every chunk holds other points and is computed again."""
    import tomli_w

    axes = {"agents.B.eta": [0.25, 0.625, 1.0], "agents.A.n": [3, 8]}
    path, out = _finished(tmp_path, capsys, axes=axes)
    before = {row["point"]: row for row in without_seconds(read_rows(out))}
    path.write_text(tomli_w.dumps(small(axes=dict(reversed(axes.items())))))
    code, stdout, err = _cli(capsys, "sweep", path, "--out", out, "--workers", "1", "--resume")
    assert code == 0 and err.count("\n") == 3
    lines = err.splitlines()
    assert all(line.endswith("axes in another order; computing it again") for line in lines)
    assert "(3 computed now, " in stdout
    rows = without_seconds(read_rows(out))
    assert [row["agents.A.n"] for row in rows] == [3, 3, 3, 8, 8, 8]
    assert [row["point"] for row in rows] == list(range(6))
    same = {(row["agents.A.n"], row["agents.B.eta"]): row for row in before.values()}
    for row in rows:  # the same points, each with its own statistics
        assert {**row, "point": 0} == {**same[row["agents.A.n"], row["agents.B.eta"]], "point": 0}


SLOW = {
    "base": {**BASE, "rounds": 12000},
    "seeds": 20,
    "chunk": 2,
    "axes": {"agents.B.eta": {"linspace": [0.25, 1.0, 6]}, "agents.A.n": [4, 8]},
}
"""12 points in 6 chunks, a few tenths of a second each: time to kill between and inside them."""


def _stamps(rows: Path) -> dict[str, tuple[int, int]]:
    """Every finished chunk file's modification time and inode: unchanged if not rewritten."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in rows.glob("chunk-*")}


def _sweep_process(path: Path, out: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "misalign.cli", "sweep", str(path), "--out", str(out)]
    args += ["--workers", "1", "--json", *(["--resume"] if resume else [])]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(process: subprocess.Popen, ready, limit: float = 120) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds (polled every 2 ms)."""
    deadline = time.monotonic() + limit
    while not ready():
        assert process.poll() is None, f"finished before the kill: {process.communicate()}"
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def _whole(rows: Path) -> None:
    """Only whole chunk files count as results: each reads back with its two rows."""
    for path in rows.glob("chunk-*.parquet"):
        assert pq.read_table(path).num_rows == 2, path


@pytest.mark.slow
def test_killed_with_sigkill_at_several_moments_and_resumed_nothing_is_lost(tmp_path):
    import tomli_w

    path = tmp_path / "slow.toml"
    path.write_text(tomli_w.dumps(SLOW))
    out, rows = tmp_path / "out", tmp_path / "out" / "rows"
    count = lambda: len(list(rows.glob("chunk-*.parquet"))) if rows.exists() else 0  # noqa: E731

    # 1. killed while it starts (before any chunk can be finished)
    process = _sweep_process(path, out, resume=False)
    _kill_when(process, lambda: (out / "manifest.json").exists())
    # 2. killed just after the first chunk file appears
    process = _sweep_process(path, out, resume=True)
    _kill_when(process, lambda: count() >= 1)
    _whole(rows)
    # 3. killed mid-way, inside a chunk (a stale temporary file from a kill is also planted)
    before = _stamps(rows)
    process = _sweep_process(path, out, resume=True)
    _kill_when(process, lambda: count() >= 3)
    _whole(rows)
    after = _stamps(rows)
    assert {k: after[k] for k in before} == before  # finished chunks were not rewritten
    (rows / ".chunk-00005.parquet.abc123").write_bytes(b"half a file")
    # 4. resumed to the end
    before = _stamps(rows)
    assert 3 <= len(before) < 6
    process = _sweep_process(path, out, resume=True)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["computed"] == 6 - len(before) and summary["points"] == 12
    after = _stamps(rows)
    assert {k: after[k] for k in before} == before
    assert sorted(p.name for p in rows.iterdir()) == [f"chunk-{k:05d}.parquet" for k in range(6)]
    resumed = read_rows(out)
    assert resumed.column("point").to_pylist() == list(range(12))  # all there, none twice
    # the same rows as an uninterrupted run
    run_sweep(load_sweep(path), tmp_path / "whole", workers=1)
    assert without_seconds(resumed) == without_seconds(read_rows(tmp_path / "whole"))
    # and once finished, a re-run is a no-op that says so
    process = _sweep_process(path, out, resume=False)
    stdout, _ = process.communicate(timeout=120)
    assert json.loads(stdout)["finished_before"] is True and _stamps(rows) == after


@pytest.mark.ray
def test_ray_on_a_local_instance_gives_the_rows_of_the_local_backend(tmp_path):
    ray = pytest.importorskip("ray")
    sweep = parse_sweep(small())
    run_sweep(sweep, tmp_path / "local", backend="local", workers=2)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        summary = run_sweep(sweep, tmp_path / "ray", backend="ray")
    finally:
        ray.shutdown()
    assert summary["computed"] == 3 and summary["errors"] == 0
    assert without_seconds(read_rows(tmp_path / "ray")) == without_seconds(
        read_rows(tmp_path / "local")
    )


@pytest.mark.ray
def test_ray_unreachable_address_is_one_line(tmp_path, capsys):
    pytest.importorskip("ray")
    with pytest.raises(SystemExit) as caught:
        main(
            [
                *("sweep", str(SWEEP), "--backend", "ray"),
                *("--address", "127.0.0.1:1", "--out", str(tmp_path / "out")),
            ]
        )
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1
    assert err.startswith("misalign: error: --address 127.0.0.1:1: no Ray cluster reachable")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize(
    ("backend", "moment"),
    [("local", "busy"), ("local", "idle"), pytest.param("ray", "busy", marks=pytest.mark.ray)],
)
def test_a_killed_sweep_leaves_no_worker_behind(tmp_path, backend, moment):
    """SIGKILL of a sweep on two workers, while they compute or once the last chunk is handed
    out: every process it started (joblib's workers and loky's resource tracker; a local Ray
    instance's GCS, raylet, workers and agents) is gone within seconds, and the resumed sweep
    finishes without them."""
    import tomli_w

    if backend == "ray":
        pytest.importorskip("ray")

    path = tmp_path / "slow.toml"
    path.write_text(tomli_w.dumps(SLOW))
    out, rows = tmp_path / "out", tmp_path / "out" / "rows"
    args = [sys.executable, "-m", "misalign.cli", "sweep", str(path), "--out", str(out)]
    args += ["--backend", backend]
    process = subprocess.Popen([*args, "--workers", "2"], stdout=subprocess.DEVNULL)
    needed = 1 if moment == "busy" else 5
    deadline = time.monotonic() + 120
    while len(list(rows.glob("chunk-*.parquet")) if rows.exists() else []) < needed:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    started = descendants(process.pid)  # pid: start time
    assert len(started) >= 2  # the workers, at least
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 15
    while alive := [pid for pid, start in started.items() if same_process(pid, start)]:
        assert time.monotonic() < deadline, alive
        time.sleep(0.1)
    done = subprocess.run([*args, "--resume", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_rows(out).column("point").to_pylist() == list(range(12))


def test_a_large_grid_shows_its_validation_on_a_terminal(tmp_path):
    """Issue 21 item 2: 10^4 points are validated before any runs (about a second here); on a
    terminal a bar says so (stderr is a pty), and nothing is printed off a terminal."""
    import os
    import pty

    sweep = tmp_path / "grid.toml"
    sweep.write_text(
        f'base = "{ROOT / "examples" / "two_agents.toml"}"\nseeds = 1\n[axes]\n'
        '"agents.B.eta" = {linspace = [0.1, 1.5, 100]}\n'
        '"agents.A.eta" = {linspace = [0.1, 1.5, 100]}\n'
    )
    code = "from misalign.workflows.sweep import load_sweep; import sys\n"
    code += f"print(len(load_sweep({str(sweep)!r}).points))"
    master, slave = pty.openpty()
    done = subprocess.run(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=slave, timeout=120
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert done.returncode == 0 and done.stdout.strip() == b"10000"
    assert b"validating points" in seen
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert quiet.stdout.strip() == b"10000" and quiet.stderr == b""
