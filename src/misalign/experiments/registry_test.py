"""Every registry entry's quick run checks its claims from claims.json; the files parse; the
CLI lists, refuses an unknown name and prints JSON."""

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from misalign.cli import app
from misalign.experiments import (
    REGISTRY,
    Claim,
    config_hash,
    errors_by_matrix_powers,
    measured_rate,
    theory_and_simulation,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each experiment's quick run, once for the module."""
    root = tmp_path_factory.mktemp("runs")
    return {name: (e.run(True, None, root / name), root / name) for name, e in REGISTRY.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REGISTRY))
def test_quick_run_passes_its_claims(runs, name):
    result, out = runs[name]
    claims = json.loads((out / "claims.json").read_text())
    assert claims, "an experiment checks at least one numeric claim"
    assert len(claims) == len(result.claims)
    for claim in claims:
        assert set(claim) == {"name", "measured", "tolerance", "at_least", "passed"}
        assert claim["passed"] is True, claim
        bound = (claim["tolerance"], claim["measured"])
        low, high = bound if claim["at_least"] else bound[::-1]
        assert claim["measured"] is not None and low <= high, claim


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REGISTRY))
def test_quick_run_files_exist_and_parse(runs, name):
    result, out = runs[name]
    with Image.open(out / "figure.png") as image:
        image.load()
        assert image.size[0] > 100
    svg = (out / "figure.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    with open(out / "table.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = pq.read_table(out / "table.parquet")
    assert len(rows) == table.num_rows == len(result.rows) > 0
    assert list(rows[0]) == table.column_names
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == name
    assert config == REGISTRY[name].config(True, None)
    version = json.loads((out / "version.json").read_text())
    assert version["version"] and "commit" in version
    assert result.figures == [out / "figure.png", out / "figure.svg"]


SLOW_ENTRIES = {"transformer"}
"""Entries whose one-seed run takes tens of seconds (the transformer's probes and plays)."""


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ENTRIES else n for n in REGISTRY],
)
def test_one_seed_runs_and_passes(name, tmp_path):
    """``reproduce NAME --quick --seeds 1``: no crash (std of one seed, empty filters), every
    claim finite and passing."""
    result = REGISTRY[name].run(True, 1, tmp_path)
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [c["name"] for c in claims] == [c.name for c in result.claims]
    assert all(c["measured"] is not None for c in claims), claims
    assert [c["name"] for c in claims if not c["passed"]] == []


def test_attacks_cells_where_no_play_settles_fail_their_claims_without_a_crash(tmp_path):
    import math

    from misalign.experiments import attacks

    cfg = attacks.config(True, 2)
    cfg["base"] = cfg["base"] | {"rounds": 20}  # the honest and decoy plays need more
    result = attacks.run_config(cfg, tmp_path)  # a crash before (max of no play)
    by_name = {c.name: c for c in result.claims}
    empty = [c for c in result.claims if isinstance(c.measured, float) and math.isnan(c.measured)]
    assert {"every cell", "honest play", "decoy, no defence", "damping"} <= {
        c.name.split(":")[0] for c in empty
    }
    assert not any(c.passed for c in empty) and not result.passed
    assert by_name["per-turn, no defence: max attacker distance"].passed  # settled: checked


def test_attacks_claims_leave_out_few_plays_and_a_missing_attack_fails_its_own(monkeypatch):
    """The attacks entry judges the plays its theory says settle within the rounds: on the
    quick study that leaves out at most 1% of any cell's plays (a guard on the claims'
    coverage, not a claim); and an attack that cannot run fails its own claims."""
    import numpy as np

    from misalign.config import parse_config
    from misalign.experiments import attacks

    cfg = attacks.config(True, None)
    base = parse_config(cfg["base"])
    cells, skipped = attacks.run_study(base, seeds=cfg["seeds"])
    assert not skipped
    for cell in cells.values():
        settled = np.nan_to_num(cell.rho, nan=np.inf) ** base.rounds < cfg["settle"]
        assert settled.mean() >= 0.99
    real = attacks.run_study

    def without_geometry(base, seeds):
        cells, skipped = real(base, seeds=seeds)
        cells = {key: cell for key, cell in cells.items() if key[0] != "geometry"}
        return cells, [*skipped, ("geometry", "could not run")]

    monkeypatch.setattr(attacks, "run_study", without_geometry)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        result = attacks.run_config(cfg, out)
    failed = {c.name for c in result.claims if not c.passed}
    assert "geometry, no defence: max attacker distance" in failed
    assert "monitor: share of geometry plays not flagged" in failed and not result.passed


def test_stability_plays_its_default_transient_seeds_at_least():
    config = REGISTRY["stability"].config
    assert config(True, 1)["seeds"] == 1 and config(True, 1)["transient"]["seeds"] == 12
    assert config(True, 40)["transient"]["seeds"] == 40
    assert config(False, 3)["transient"]["seeds"] == 100


def test_seeds_override_the_default_and_change_the_hash():
    entry = REGISTRY["gap"]
    assert entry.config(True, 3)["seeds"] == 3
    assert config_hash(entry.config(True, 3)) != config_hash(entry.config(True, None))
    assert config_hash(entry.config(True, None)) != config_hash(entry.config(False, None))


def test_claim_fails_above_its_tolerance_and_on_nan():
    assert Claim("x", 0.5, 1.0).passed and not Claim("x", 1.5, 1.0).passed
    assert not Claim("x", float("nan"), 1.0).passed
    assert Claim("count", 0, 0).as_dict() == {
        "name": "count",
        "measured": 0,
        "tolerance": 0,
        "at_least": False,
        "passed": True,
    }


def test_a_boundary_claim_passes_at_or_above_its_floor_and_never_on_nan():
    assert Claim("edge", 2.0, 2.0, at_least=True).passed
    assert Claim("edge", 8.0, 2.0, at_least=True).passed
    assert not Claim("edge", 1.0, 2.0, at_least=True).passed
    assert not Claim("edge", float("nan"), 0.0, at_least=True).passed


def test_measured_rate_of_a_geometric_sequence():
    import numpy as np

    t = np.arange(100)[:, None]
    errors = np.hstack([0.9**t, 1.1**t, 0.5**t])
    np.testing.assert_allclose(measured_rate(errors, floor=1e-12), [0.9, 1.1, 0.5])


def test_errors_by_matrix_powers_of_a_non_normal_map():
    import numpy as np

    R = np.array([[[0.5, 4.0], [0.0, 0.5]], [[0.9, 0.0], [0.0, -0.2]]])
    e0 = np.array([[0.0, 1.0], [1.0, 1.0]])
    errors, bound = errors_by_matrix_powers(R, e0, 30)
    for b in range(2):
        for t in range(30):
            power = np.linalg.matrix_power(R[b], t + 1)
            assert errors[t, b] == pytest.approx(np.linalg.norm(power @ e0[b]), rel=1e-12)
    # the first map grows |e_t| from 1 to |(4, 0.5)| before it decays; the second is normal
    assert errors[0, 0] == pytest.approx(np.hypot(4.0, 0.5)) and errors[-1, 0] < 1e-5
    assert bound[0] == pytest.approx(
        max(np.linalg.norm(np.linalg.matrix_power(R[0], t), 2) for t in range(31))
    )
    assert bound[1] == 1.0 and (errors[:, 0] <= bound[0] * np.linalg.norm(e0[0])).all()


def test_theory_and_simulation_draws_a_line_a_band_and_markers():
    import numpy as np
    from matplotlib.container import ErrorbarContainer
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    x = np.array([1.0, 2.0])
    theory = np.array([[1.0, 3.0], [2.0, 2.0]])
    simulated = np.array([[0.0, 4.0, 2.0], [5.0, 5.0, 5.0]])
    theory_and_simulation(ax, x, theory, simulated, "C2", ("theory", None), ms=2)
    (line,) = ax.lines[:1]
    np.testing.assert_array_equal(line.get_ydata(), [2.0, 2.0])
    assert line.get_linestyle() == "-" and line.get_label() == "theory"
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 1.0 and band.max() == 3.0  # mean ± std of the first column
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    markers = bars.lines[0]
    np.testing.assert_array_equal(markers.get_ydata(), [2.0, 5.0])
    assert markers.get_marker() == "o" and markers.get_linestyle() == "None"
    assert markers.get_markersize() == 2 and bars.get_label().startswith("_")  # no entry
    assert ax.get_legend_handles_labels()[1] == ["theory"]


def test_list_has_each_experiment_its_claim_count_and_what_each_compares():
    done = runner.invoke(app, ["reproduce", "--list"])
    assert done.exit_code == 0
    lines = done.stdout.strip().splitlines()
    heads = [line for line in lines if not line.startswith(" ")]
    assert len(heads) == len(REGISTRY) and len(lines) == len(REGISTRY) + sum(
        len(e.compares) for e in REGISTRY.values()
    )
    for line, entry in zip(heads, REGISTRY.values(), strict=True):
        assert line.startswith(entry.name) and entry.claim in line and entry.typical in line
        assert f"{len(entry.compares)} claims" in line
    assert all(" vs " in what for e in REGISTRY.values() for what in e.compares)


def test_list_json_is_one_object():
    done = runner.invoke(app, ["reproduce", "--list", "--json"])
    assert done.exit_code == 0
    data = json.loads(done.stdout)
    assert [e["name"] for e in data["experiments"]] == list(REGISTRY)
    for found, entry in zip(data["experiments"], REGISTRY.values(), strict=True):
        assert found["claims"] == len(entry.compares) > 0
        assert found["compares"] == list(entry.compares)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REGISTRY))
def test_quick_run_checks_the_listed_claims(runs, name):
    entry = REGISTRY[name]
    assert len(runs[name][0].claims) == len(entry.compares) - entry.full_only


def test_unknown_name_is_one_line_exit_2():
    done = runner.invoke(app, ["reproduce", "nope"])
    assert done.exit_code == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0]
    assert all(name in lines[0] for name in REGISTRY)


def test_json_prints_one_object_with_the_claims(tmp_path):
    done = runner.invoke(
        app, ["reproduce", "stability", "--quick", "--json", "--out", str(tmp_path)]
    )
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert data["experiment"] == "stability" and data["passed"] is True
    assert data["claims"] == json.loads((tmp_path / "claims.json").read_text())
    assert Path(data["out"]) == tmp_path


def test_text_output_and_a_failed_claim_exits_1(tmp_path, monkeypatch):
    done = runner.invoke(app, ["reproduce", "single-agent", "--quick", "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert done.stdout.count("pass  ") == 3 and "FAIL" not in done.stdout
    entry = REGISTRY["single-agent"]
    failing = entry.run

    def run(quick, seeds, out):
        result = failing(quick, seeds, out)
        return type(result)(
            result.rows, result.figures, [Claim("impossible", 1.0, 0.0)], result.out
        )

    monkeypatch.setitem(REGISTRY, "single-agent", type(entry)(**{**entry.__dict__, "run": run}))
    done = runner.invoke(app, ["reproduce", "single-agent", "--quick", "--out", str(tmp_path)])
    assert done.exit_code == 1
    assert "FAIL  impossible" in done.stdout


def test_default_out_is_named_by_the_config_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = runner.invoke(app, ["reproduce", "gap", "--quick", "--seeds", "2"])
    assert done.exit_code == 0, done.output
    digest = config_hash(REGISTRY["gap"].config(True, 2))
    assert (tmp_path / "runs" / f"gap-{digest}" / "claims.json").exists()


def test_two_mode_rate_tells_close_modes_apart():
    """Differences made of two modes of close magnitude (real, 0.9 and 0.85; a complex pair of
    modulus 0.9 on an elongated orbit), or of one: the largest modulus, which a ratio of norms
    over the same window misses by more than 1e-3 for the pair; a fast play's window stops
    above rounding."""
    import numpy as np

    from misalign.experiments.base import two_mode_rate

    t = np.arange(400)[:, None]
    u, v = np.array([1.0, 0.2, 0.0]), np.array([0.3, -1.0, 0.5])
    close = 0.9**t * u + 3 * 0.85**t * v
    angle = 0.3 * t
    pair = 0.9**t * (np.cos(angle) * u + 0.3 * np.sin(angle) * v)
    one = 1.1 ** t[:60] * u
    fast = 0.2**t * u + 0.1**t * v
    for moves, rho in ((close, 0.9), (pair, 0.9), (one, 1.1), (fast, 0.2)):
        rate = two_mode_rate(moves[:, None, :], floor=1e-12, window=30)
        assert rate == pytest.approx([rho], rel=1e-6)
    norms = np.linalg.norm(pair, axis=-1)[:, None]
    assert abs(measured_rate(norms / norms[0], floor=1e-12, window=30)[0] - 0.9) > 1e-3
