"""Tests for misalign.workflows.design: every advice item's predicted effect is what a
re-simulation of
the changed configuration gives, the stability boundary is where the play stops converging,
the bias scale is a minimum, and greedy examples beat random ones."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from misalign.api import predict, setup, simulate
from misalign.cli import app
from misalign.config import load_config, parse_config
from misalign.model.agent import lsa_optimal_gamma
from misalign.workflows.design import COLUMNS, TOL, Design, advise
from misalign.workflows.design import table_rows as design_table

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
runner = CliRunner()


def _agreed(result):
    """Every item's predicted and simulated value agree to ``TOL``."""
    assert result["baseline"]["difference"] < TOL
    for name, row in result["stability"].items():
        if row["scale"]:
            assert row["verified"], name
    if "skipped" not in result["bias"]:
        assert result["bias"]["difference"] < TOL
        before = result["bias"]["before"]
        assert abs(before["predicted"] - before["simulated"]) < TOL
    for item in ("prompt", "exposure"):
        row = result[item]
        if "skipped" in row:
            continue
        assert row["difference"] < TOL, item
        assert row["theory_vs_check"] < TOL, item  # the greedy search's value is the game's
        assert abs(row["before"]["predicted"] - row["before"]["simulated"]) < TOL, item
        assert abs(row["before"]["theory"] - row["before"]["predicted"]) < TOL, item
        assert row["baseline"]["max_difference"] < TOL, item


@pytest.mark.parametrize("example", ["two_agents.toml", "design.toml"])
def test_every_item_matches_its_simulation_on_the_examples(example):
    result = advise(load_config(EXAMPLES / example), "A", examples=3, seeds=6)
    _agreed(result)
    assert {"stability", "bias", "prompt", "exposure"} <= set(result)
    assert "skipped" not in result["exposure"]
    assert result["prompt"]["gain"]["absolute"] > 0 and result["exposure"]["gain"]["absolute"] > 0


def _random_config(seed: int, agents: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 6))
    table = {}
    for k in range(agents):
        kind = ["identity", "lsa-optimal", "newton"][int(rng.integers(3))]
        eta = float(rng.uniform(0.1, 0.4)) if kind == "identity" else float(rng.uniform(0.3, 0.9))
        table["ABC"[k]] = {
            "n": int(rng.integers(d, 3 * d + 1)),
            "spectrum": rng.uniform(0.2, 3.0, d).round(3).tolist(),
            "rotate": bool(rng.integers(2)),
            "preconditioner": kind,
            "eta": eta,
        }
    return {"seed": seed, "d": d, "rounds": 100, "agents": table}


@pytest.mark.parametrize("seed", range(6))
def test_every_item_matches_its_simulation_on_random_configs(seed):
    config = parse_config(_random_config(seed, agents=2 if seed < 4 else 3))
    result = advise(config, "A", examples=2, seeds=4)
    _agreed(result)
    if seed >= 4:
        assert "two-agent" in result["exposure"]["skipped"]


def test_the_stability_boundary_is_where_the_play_stops_converging():
    """Independently of the rate ``advise`` measures: at 0.99 s the play settles on the
    prediction, at 1.01 s its outputs grow without bound."""
    config = load_config(EXAMPLES / "design.toml")
    result = advise(config, "A", examples=1, seeds=2)
    for name, row in result["stability"].items():
        s = row["scale"]
        data = config.model_dump(mode="json", exclude_none=True)
        games = {}
        for factor in (0.99, 1.0, 1.01):
            data["agents"][name]["eta"] = config.agents[name].eta * s * factor
            games[factor] = setup(parse_config(data))
        assert abs(predict(games[1.0]).rho[0] - 1) < 1e-9  # the boundary: rho = 1
        low, high = games[0.99], games[1.01]
        p = predict(low)
        t = simulate(low, rounds=4000)
        assert t.distance(name, p.fixed_point[name])[-1, 0] < 1e-12
        grown = simulate(high, rounds=4000).outputs(name)
        norms = np.linalg.norm(grown, axis=-1)[:, 0]
        assert norms[-1] > 1e6 * norms[len(norms) // 2 - 1]


def test_the_bias_scale_is_a_minimum():
    for path, overrides in ((EXAMPLES / "design.toml", []), (EXAMPLES / "three_agents.toml", [])):
        result = advise(load_config(path, overrides), "A", examples=1, seeds=2)
        bias = result["bias"]
        assert not bias["on_edge"]
        for neighbour in bias["neighbours"]:
            assert neighbour["simulated"] > bias["simulated"]
        assert bias["simulated"] < bias["before"]["simulated"]


def _gains(objective: str, seeds: range, k: int = 3):
    greedy, random = [], []
    for seed in seeds:
        config = load_config(EXAMPLES / "design.toml", [f"seed={seed}"])
        design = Design(config, "A", seeds=10)
        f = getattr(design, objective)
        _, curve = design.greedy(k, f)
        _, baseline = design.random(k, f)
        greedy.append(curve[0] - curve[-1])
        random.append(curve[0] - baseline[:, -1].mean())
    return np.array(greedy), np.array(random)


@pytest.mark.parametrize("objective", ["residual", "exposure"])
def test_greedy_examples_beat_random_ones_over_seeds(objective):
    greedy, random = _gains(objective, range(20))
    print(
        f"{objective}: mean gain over 20 seeds, greedy {greedy.mean():.4f}, "
        f"random {random.mean():.4f}"
    )
    assert greedy.mean() > random.mean() and (greedy >= random).mean() >= 0.9
    assert (greedy >= 0).all()  # greedy never does worse than adding nothing


def test_the_augmented_agent_recomputes_its_preconditioner_with_n_plus_k():
    config = load_config(EXAMPLES / "design.toml")
    design = Design(config, "A")
    rows = np.eye(config.d)[None, :2] * 2.0
    game = design.changed_game(rows)
    prompt = game.prompts["A"][0]
    assert prompt.n == config.agents["A"].n + 2
    np.testing.assert_allclose(game.agents["A"].gamma[0], lsa_optimal_gamma(prompt.covariance, 10))
    np.testing.assert_array_equal(prompt.y[-2:], rows[0] @ prompt.target)


def test_the_decoy_is_the_configured_attack():
    """Without added examples, the exposure check plays what ``[attack] method = "decoy"``
    sets up."""
    config = load_config(EXAMPLES / "design.toml")
    design = Design(config, "A")
    mine = simulate(design.changed_game(np.zeros((1, 0, config.d)), decoy=True))
    data = config.model_dump(mode="json", exclude_none=True)
    configured = setup(parse_config(data | {"attack": {"agent": "B", "method": "decoy"}}))
    np.testing.assert_allclose(mine.turns, simulate(configured).turns, atol=1e-12)
    assert mine.distance("B", design.game.targets["B"])[-1, 0] < 1e-12


def test_cli_table_and_artifacts(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["design", str(EXAMPLES / "design.toml"), "--agent", "A", "--out", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    for word in (*COLUMNS, "stability A", "stability B", "bias", "prompt", "exposure"):
        assert word in result.stdout
    assert (out / "design.json").exists() and (out / "design.png").exists()
    assert (out / "config.toml").exists()


def test_cli_json(tmp_path):
    out = tmp_path / "out"
    args = ["design", str(EXAMPLES / "design.toml"), "--agent", "A", "--examples", "2"]
    result = runner.invoke(app, [*args, "--seeds", "3", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert json.loads((out / "design.json").read_text()) == data
    assert {"agent", "baseline", "stability", "bias", "prompt", "exposure", "config_hash"} <= set(
        data
    )
    assert data["examples"] == 2 and len(data["prompt"]["examples"]) == 2
    assert {"predicted", "simulated", "difference", "gain", "baseline"} <= set(data["prompt"])
    assert {"mean", "std", "seeds", "curve_mean"} <= set(data["prompt"]["baseline"])


ONE_DIMENSION = """seed = 5
d = 1
rounds = 100
[agents.A]
n = 8
target = [1.0]
[agents.B]
n = 12
target = [0.5]
eta = 0.5
"""


def test_an_exact_zero_difference_is_printed_as_zero_not_inf(tmp_path):
    """With d = 1 the diverging check of an edge measures its rate exactly (difference 0.0):
    the "stability A" row shows the larger of its two differences, never ``inf``."""
    config = tmp_path / "d1.toml"
    config.write_text(ONE_DIMENSION)
    out = tmp_path / "out"
    args = ["design", str(config), "--agent", "A", "--examples", "1", "--seeds", "2"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    checks = json.loads((out / "design.json").read_text())["stability"]["A"]["checks"]
    differences = [check["difference"] for check in checks]
    assert 0.0 in differences  # the case of the issue
    row = next(line for line in result.stdout.splitlines() if "stability A" in line)
    assert "inf" not in row and f"{max(differences):.1e}" in row


LSA = """d = 2
rounds = 10
[agents.A]
kind = "lsa"
n = 4
checkpoint = "nowhere.pt"
[agents.B]
n = 4
"""
SAMPLED = """d = 2
rounds = 10
[agents.A]
n = 4
sampling_std = 0.1
[agents.B]
n = 4
"""


@pytest.mark.parametrize(
    "args,message",
    [
        (["--agent", "Z"], "--agent: names no agent: 'Z' (agents: A, B)"),
        (["--agent", "A", "--norm", "-1"], "--norm: must be a positive finite number"),
        (["--agent", "A", "--examples", "0"], "--examples"),
        ([], "Missing option '--agent'"),
        (["--agent", "A", "--set", "agents.A.eta=-1"], "agents.A.eta"),
        (["llm", "--agent", "B"], "agents.A.kind: A is a black box (kind llm)"),
        (["attack", "--agent", "A"], "attack: design advises on the honest play"),
        (["lsa", "--agent", "B"], "agents.A.kind: A is a trained lsa model"),
        (["sampled", "--agent", "A"], "agents.A.sampling_std: design needs noise-free answers"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    files = {"llm": EXAMPLES / "local_llm.toml", "attack": EXAMPLES / "attack.toml"}
    (tmp_path / "lsa.toml").write_text(LSA)
    (tmp_path / "sampled.toml").write_text(SAMPLED)
    files |= {"lsa": tmp_path / "lsa.toml", "sampled": tmp_path / "sampled.toml"}
    config = EXAMPLES / "design.toml"
    if args and args[0] in files:
        config, args = files[args[0]], args[1:]
    done = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "design", str(config), *args]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


SAVED_BY_A_LARGER_ETA_B = """seed = 0
d = 3
rounds = 2000

[agents.A]
n = 200
spectrum = [3.0, 3.0, 3.0]
preconditioner = "identity"
eta = 1.0

[agents.B]
n = 200
preconditioner = "identity"
eta = 0.3
"""
"""A play that diverges at scale 1 and that a larger ``eta_B`` alone saves, whatever the seed:
with 200 examples each, ``H_A`` is near ``3 I`` (A overshoots, ``|1 - h_A|`` near 2) and
``H_B`` near ``eta_B I``, so ``rho`` is near ``2 |1 - eta_B|``: about 1.4 at ``eta_B = 0.3``,
below 1 for ``eta_B`` between about 0.6 and 1.4 (seeds 0 to 7: ``eta_B`` x1.6..2.5 to
x4.1..5.0). ``examples/diverging.toml`` (8 examples each, A's variance 6) has none for any of
seeds 0 to 11: whether one exists there depends on the sampled prompts."""


def test_a_diverging_play_gets_a_stable_scale_and_no_example_advice(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "play.toml").write_text(SAVED_BY_A_LARGER_ETA_B)
    args = ["design", str(tmp_path / "play.toml"), "--agent", "A", "--seeds", "2"]
    result = runner.invoke(app, [*args, "--json", "--out", str(out)])
    assert result.exit_code == 0, result.stderr

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    data = json.loads(result.stdout, parse_constant=refuse)
    assert not data["baseline"]["converges"] and data["baseline"]["simulated"] is None
    assert data["stability"]["A"]["verified"] and data["stability"]["A"]["scale"] < 1
    b = data["stability"]["B"]  # a larger eta_B alone saves the play: the search goes up too
    assert b["verified"] and len(b["intervals"]) == 1 and 1 < b["lower"] < b["scale"]
    assert data["bias"]["difference"] < TOL and data["bias"]["scale"] < 1
    assert "does not converge" in data["prompt"]["skipped"]
    assert (out / "design.png").exists()


def test_default_out_is_named_by_the_config_and_the_options(tmp_path, monkeypatch):
    """Advice for another agent or another K goes to its own directory, the same call to
    the same one."""
    monkeypatch.chdir(tmp_path)
    config = str(EXAMPLES / "design.toml")
    for args in (["--agent", "A"], ["--agent", "B"], ["--agent", "A", "--examples", "2"]):
        done = runner.invoke(app, ["design", config, *args, "--seeds", "2"])
        assert done.exit_code == 0, done.output
    again = runner.invoke(app, ["design", config, "--agent", "A", "--seeds", "2"])
    assert again.exit_code == 0, again.output
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 3 and all(r.name.startswith("design-") for r in runs)
    assert all((r / "design.json").exists() for r in runs)


def _sweep_config(seed: int) -> dict:
    """A random play (d 2 to 5, 2 or 3 agents, every preconditioner, eta from 0.2 to 3 on a
    log scale): many diverge at scale 1 and converge at a larger one."""
    rng = np.random.default_rng([seed, 2024])
    d = int(rng.integers(2, 6))
    agents = {}
    for k in range(int(rng.integers(2, 4))):
        agents["ABC"[k]] = {
            "n": int(rng.integers(1, 3 * d + 1)),
            "spectrum": rng.uniform(0.2, 3.0, d).round(3).tolist(),
            "rotate": bool(rng.integers(2)),
            "preconditioner": ["identity", "lsa-optimal", "newton"][int(rng.integers(3))],
            "eta": float(np.exp(rng.uniform(np.log(0.2), np.log(3)))),
            "target": rng.standard_normal(d).round(3).tolist(),
        }
    return {"seed": seed, "d": d, "rounds": 100, "agents": agents}


# the plays of issue 19 (their parameters; the seeds draw prompts that show it with the
# counter-based generator, misalign.model.philox): A diverges at scale 1 and converges from
# x1.32 to x2.66 (most seeds of ABOVE_ONE's parameters do, at other scales); A's lower edge
# lies between log-grid points and its least residual on it (a particular draw: seed 259)
ABOVE_ONE = {
    "seed": 44,
    "d": 4,
    "rounds": 400,
    "agents": {
        "A": {
            "n": 8,
            "preconditioner": "identity",
            "eta": 0.3893243097445214,
            "target": [1, 0, 0, 0],
        },
        "B": {
            "n": 4,
            "preconditioner": "identity",
            "eta": 1.5145485393004519,
            "target": [0, 1, 0, 0],
        },
    },
}
LOWER_EDGE = {
    "seed": 259,
    "d": 3,
    "rounds": 400,
    "agents": {
        "A": {
            "n": 3,
            "rotate": True,
            "preconditioner": "lsa-optimal",
            "eta": 0.715,
            "target": [1, 0, 0],
        },
        "B": {"n": 3, "preconditioner": "identity", "eta": 0.770, "target": [0, 1, 0]},
    },
}
SWEEP = [
    ABOVE_ONE,
    LOWER_EDGE,
    tomllib.loads(SAVED_BY_A_LARGER_ETA_B),
    *(_sweep_config(seed) for seed in range(16)),
]


def _scan(config, name: str, scales: np.ndarray):
    """The theory's prediction (``misalign.model.theory.predict``) with agent ``name``'s ``Gamma``
    times each of ``scales``, built from the prompts of play 0 independently of ``Design``."""
    from misalign.model.agent import GradientAgent
    from misalign.model.theory import predict as theory_predict

    game, size, d = setup(config), len(scales), config.d
    maps = {}
    for n, agent in game.agents.items():
        prompt = game.prompts[n][0]
        gamma = np.broadcast_to(agent.gamma[0], (size, d, d))
        gamma = gamma * scales[:, None, None] if n == name else gamma
        S = np.broadcast_to(prompt.second_moment, (size, d, d))
        m = np.broadcast_to(prompt.moment, (size, d))
        steps = config.agents[n].steps_per_turn
        maps[n] = GradientAgent(n, np.array(gamma), np.array(S), np.array(m), steps).affine()
    targets = {n: np.broadcast_to(t[0], (size, d)) for n, t in game.targets.items()}
    return theory_predict(
        maps, game.schedule, targets, start=np.broadcast_to(game.start[0], (size, d))
    )


def _dense(config, name: str, per_decade: int = 100):
    """``rho`` (and the prediction) on a log grid over the whole valid range of scales."""
    eta = config.agents[name].eta
    scales = np.geomspace(1e-30 / eta, 1e30 / eta, 60 * per_decade + 1)
    return scales, _scan(config, name, scales)


def test_every_interval_of_convergence_matches_a_dense_scan():
    """Over the issue's plays and a seeded sweep, for every agent: the intervals of ``rho < 1``
    reported are the dense scan's (every edge between the two scan points where ``rho``
    crosses 1, an interval narrower than the scan's step checked directly), and every edge is
    refined: ``rho < 1`` at it, ``rho >= 1`` a relative ``2 EDGE_TOL`` outside. Among them,
    plays that diverge at scale 1 and converge at a larger one."""
    from misalign.workflows.design import EDGE_TOL

    above_one = 0
    for data in SWEEP:
        config = parse_config(data)
        design = Design(config, "A")
        for name in design.names:
            scales, p = _dense(config, name)
            inside = p.rho < 1
            reported = design.intervals(name)
            edges = [(e, side) for lo, hi in reported for e, side in ((lo, -1), (hi, 1))]
            edges = [(e, side) for e, side in edges if e is not None]
            found = [e for e, _ in edges]
            step = scales[1] / scales[0]
            flips = np.flatnonzero(inside[1:] != inside[:-1])
            narrow = [(lo, hi) for lo, hi in reported if lo and hi and hi / lo < step**2]
            assert len(flips) == len(found) - 2 * len(narrow), (data, name, reported)
            wide = sorted(e for lo, hi in reported if (lo, hi) not in narrow for e in (lo, hi) if e)
            for k, e in zip(flips, wide, strict=True):
                assert scales[k] < e <= scales[k + 1], (data, name, e)
            assert inside[0] == bool(reported and reported[0][0] is None), (data, name)
            assert inside[-1] == bool(reported and reported[-1][1] is None), (data, name)
            if found:
                at = np.array(found)
                out = np.array([e * (1 + 2 * EDGE_TOL * side) for e, side in edges])
                assert (_scan(config, name, at).rho < 1).all(), (data, name, found)
                assert (_scan(config, name, out).rho >= 1).all(), (data, name, found)
            diverges = _scan(config, name, np.array([1.0])).rho[0] >= 1
            above_one += bool(diverges and any(lo and lo > 1 for lo, _ in reported))
    assert above_one >= 3


def test_the_bias_scale_is_the_least_residual_of_a_dense_scan():
    """The scale ``best_scale`` advises gives ``|e_A|`` no larger than the least of a dense
    scan over every scale with ``rho < RHO_CAP`` (the issue's lower-edge play: the least is
    on the refined edge, below the log-grid point the search used to stop at)."""
    from misalign.workflows.design import RHO_CAP

    for data in SWEEP:
        config = parse_config(data)
        design = Design(config, "A")
        scales, p = _dense(config, "A", per_decade=400)
        value = np.where(p.rho < RHO_CAP, np.linalg.norm(p.residual["A"], axis=-1), np.inf)
        found = design.best_scale()
        assert (found is None) == (not np.isfinite(value).any()), data
        if found is None:
            continue
        mine = _scan(config, "A", np.array([found[0]]))
        assert mine.rho[0] < RHO_CAP
        best = np.linalg.norm(mine.residual["A"][0])
        assert best <= value.min() * (1 + 1e-9) + 1e-11, (data, found, scales[np.argmin(value)])


def test_the_issue_plays_converge_above_scale_one_and_refine_the_lower_edge():
    """Issue 19: A diverges at scale 1 and converges at x1.77: the advice reports that
    interval, checked by playing, and the bias inside it (no larger than at x1.77); the lower
    edge of the second play is refined, and its bias (on that edge) beats the log-grid point
    x0.63096. The numbers are those of the seeds' draws (ABOVE_ONE, LOWER_EDGE)."""
    config = parse_config(ABOVE_ONE)
    result = advise(config, "A", examples=1, seeds=2)
    row = result["stability"]["A"]
    assert row["verified"] and len(row["intervals"]) == 1
    assert row["lower"] < 1.77 < row["upper"] == row["scale"] and row["lower"] > 1
    assert result["bias"]["difference"] < TOL and row["lower"] < result["bias"]["scale"]
    at = np.linalg.norm(_scan(config, "A", np.array([1.77])).residual["A"][0])
    assert result["bias"]["simulated"] <= at * (1 + 1e-9)
    table = " ".join(" ".join(r) for r in design_table(result))
    assert "x1.322 to x2.659" in table

    result = advise(parse_config(LOWER_EDGE), "A", examples=1, seeds=2)
    row, bias = result["stability"]["A"], result["bias"]
    assert row["verified"] and abs(row["lower"] - 0.6172384) < 1e-6
    assert bias["on_edge"] and abs(bias["scale"] - 0.6191757) < 1e-6
    assert bias["simulated"] < 1.42209 < 1.42249  # at x0.63096 (the grid point): 1.42250


def _network(seed: int, steps: int = 1):
    """A random network of 3 to 8 gradient agents as ``network_test`` builds them (every
    preconditioner, ``n`` from ``d - 1``, label noise; random weighted reads, turns in order
    or simultaneous), advised for ``a0``; with ``steps``, each agent takes 1 to ``steps``
    steps per turn."""
    from misalign.model.network_test import _mix, network

    rng = np.random.default_rng(seed)
    agents, d = int(rng.integers(3, 9)), int(rng.integers(1, 5))
    names = [f"a{k}" for k in range(agents)]
    reads = {n: _mix(rng, [m for m in names if m != n]) for n in names if rng.integers(4)}
    config = network(rng, d, names, reads, bool(rng.integers(2)))
    data = config.model_dump(mode="json", exclude_none=True)
    for agent in data["agents"].values():
        agent["steps_per_turn"] = int(rng.integers(1, steps + 1))
    return parse_config(data)


# both schedules, d 1 to 4, 3 to 8 agents; 28: four roots cross at lambda = i at once; 42:
# one agent's search falls back on the grid
NETWORKS = [1, 3, 6, 8, 14, 21, 24, 28, 42, 57]


def _grid_best(config, design: Design) -> float:
    """The least ``|e_A|`` the bias item found before its search went through
    ``Design.solver``: every value predicted (``_scan``), ``inf`` where ``rho >= RHO_CAP``,
    on the grid and the grid scan's edges, zoomed to ``EDGE_TOL``; the present value where no
    scale beats it by a relative ``1e-9``."""
    from misalign.workflows.design import EDGE_TOL, RHO_CAP, ZOOM, scale_range

    def value(scales):
        p = _scan(config, design.name, scales)
        norm = np.linalg.norm(p.residual[design.name], axis=-1)
        return np.where(p.rho < RHO_CAP, norm, np.inf)

    bounds = design.scan(design.name, RHO_CAP)
    lo, hi = scale_range(config.agents[design.name].eta)
    edges = [lo if a is None else a for a, _ in bounds] + [
        hi if b is None else b for _, b in bounds
    ]
    grid = np.union1d(design.scales(design.name), edges)
    k = int(np.argmin(value(grid)))
    a, b, best = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)], grid[k]
    while b / a - 1 > EDGE_TOL:
        points = np.geomspace(a, b, ZOOM)
        j = int(np.argmin(value(points)))
        best, a, b = points[j], points[max(j - 1, 0)], points[min(j + 1, ZOOM - 1)]
    now, least = value(np.array([1.0, best]))
    return now if np.isfinite(now) and least >= now * (1 - 1e-9) else least


@pytest.mark.parametrize("seed,steps", [(s, 1) for s in NETWORKS] + [(3, 3), (6, 3), (14, 3)])
def test_the_crossings_find_what_the_grid_finds_on_random_networks(seed, steps):
    """``intervals`` (from the crossings of the circle, a few predictions per agent) against
    ``scan``, the grid of docs/theory.md §8 (thousands of predictions), on networks of 3 to 8
    agents: the same intervals for every agent (rho < 1) and for a0 (rho < RHO_CAP), each edge
    within 2 EDGE_TOL of the grid's (each brackets the same crossing to EDGE_TOL); and the
    bias item's least |e_A| is the one every value predicted on the grid gives. Also with
    up to 3 steps per turn (the crossings are the roots of a matrix polynomial of degree k)."""
    from misalign.workflows.design import EDGE_TOL, RHO_CAP

    config = _network(seed, steps)
    design = Design(config, "a0")
    for name in design.names:
        for level in (1.0, RHO_CAP) if name == "a0" else (1.0,):
            found, scanned = design.intervals(name, level), design.scan(name, level)
            assert len(found) == len(scanned), (seed, name, level, found, scanned)
            for mine, grid in zip(found, scanned, strict=True):
                for x, y in zip(mine, grid, strict=True):
                    assert (x is None) == (y is None), (seed, name, level, found, scanned)
                    assert x is None or abs(x / y - 1) <= 2 * EDGE_TOL, (seed, name, x, y)
    found = design.best_scale()
    if found is None:
        assert not design.scan("a0", RHO_CAP)
        return
    mine = _scan(config, "a0", np.array([found[0]]))
    value = np.linalg.norm(mine.residual["a0"][0])
    reference = _grid_best(config, design)
    assert abs(value - reference) <= 1e-9 * reference + 1e-12, (seed, found, value, reference)


def test_the_answer_at_the_fixed_point_is_the_predicted_one():
    """``Design.answer`` (a d x d solve per variant of A's map) is A's predicted limit
    (``_scan``, the theory's prediction) on networks, at scales from 0.1 to 10."""
    from misalign.model.agent import GradientAgent

    checked = 0
    for seed in NETWORKS:
        config = _network(seed)
        design = Design(config, "a0")
        if design.solver() is None:
            continue
        scales = np.geomspace(0.1, 10, 9)
        p = _scan(config, "a0", scales)
        agent, prompt = design.game.agents["a0"], design.game.prompts["a0"][0]
        gamma = agent.gamma[0] * scales[:, None, None]
        S = np.broadcast_to(prompt.second_moment, gamma.shape)
        m = np.broadcast_to(prompt.moment, (len(scales), config.d))
        steps = config.agents["a0"].steps_per_turn
        f = GradientAgent("a0", gamma, np.array(S), np.array(m), steps).affine()
        ok = p.converges
        np.testing.assert_allclose(
            design.answer(f)[ok], p.fixed_point["a0"][ok], rtol=1e-9, atol=1e-12
        )
        checked += ok.sum()
    assert checked >= 40


@pytest.mark.parametrize("seed", NETWORKS[:5])
def test_the_greedy_examples_are_those_of_predicting_every_candidate(seed):
    """``Design.least`` predicts only the candidates that may be least: the greedy examples
    and their curve are those of an objective that predicts every candidate (a wrapper of
    ``residual``, which ``least`` does not shortcut), to the last bit."""
    design = Design(_network(seed), "a0")
    if not predict(design.game).converges[0]:
        pytest.skip("the play does not converge")
    rows, curve = design.greedy(3, design.residual)
    every_rows, every_curve = design.greedy(3, lambda maps: design.residual(maps))
    np.testing.assert_array_equal(rows, every_rows)
    np.testing.assert_array_equal(curve, every_curve)


@pytest.mark.parametrize("source", ["design.toml", "diverging.toml", 6])
def test_the_edges_checked_together_are_each_pair_played_alone(source):
    """``Design.rates`` plays every edge's pair of scales in shared batches: each pair's
    predicted rho, rounds and measured rate are those of playing the pair alone for its own
    rounds, ``30 / |log rho|`` of its slower play from 200 to 20,000 (as ``_checked`` did one
    pair at a time)."""
    from dataclasses import replace

    config = load_config(EXAMPLES / source) if isinstance(source, str) else _network(source)
    design = Design(config, next(iter(config.agents)))
    pairs = [
        (name, (0.99 * e, 1.01 * e) if e == hi else (1.01 * e, 0.99 * e))
        for name in design.names
        for lo, hi in design.intervals(name)
        for e in (lo, hi)
        if e is not None
    ]
    assert pairs
    for (name, scales), (rho, measured, rounds) in zip(pairs, design.rates(pairs), strict=True):
        game = design.scaled_game(name, scales)
        alone = predict(game).rho
        np.testing.assert_array_equal(rho, alone)
        slow = np.abs(np.log(alone)).min()
        assert rounds == int(np.clip(np.ceil(30 / slow), 200, 20_000))
        start = np.broadcast_to(design.random_start, game.start.shape).copy()
        t = simulate(replace(game, start=start), rounds=rounds)
        s = np.concatenate([t.outputs(n) for n in design.names], axis=-1)
        step = np.linalg.norm(np.diff(s, axis=0), axis=-1)
        half = len(step) // 2
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            np.testing.assert_array_equal(
                measured, (step[-1] / step[half - 1]) ** (1 / (len(step) - half))
            )


def test_the_figure_names_the_agent(tmp_path, monkeypatch):
    """The legend of design.png says ``|e_a0|`` for an agent named a0, never ``|e_A|``."""
    import misalign.outputs.figure
    from misalign.workflows.design import plot_design

    legends = []
    save = misalign.outputs.figure.save_figure

    def keep(fig, path):
        out = save(fig, path)
        legends.extend(t.get_text() for axis in fig.axes for t in axis.get_legend().get_texts())
        return out

    monkeypatch.setattr(misalign.outputs.figure, "save_figure", keep)
    config = parse_config(
        {"seed": 3, "d": 2, "rounds": 50, "agents": {"a0": {"n": 4}, "a1": {"n": 5}}}
    )
    plot_design(advise(config, "a0", examples=1, seeds=2), tmp_path / "design.png")
    assert "|e_a0| greedy" in legends and not any("e_A" in text for text in legends)


def test_design_shows_its_progress_on_a_terminal(tmp_path):
    """On a terminal (a pty for stderr) the design bar names each agent's search as it starts
    (each step drawn at once, however short); the JSON on stdout stays clean."""
    import os
    import pty

    import tomli_w

    agents = {f"a{k}": {"n": 4 + k % 3, "target": [k % 2, 1 - k % 2]} for k in range(6)}
    data = {"seed": 1, "d": 2, "rounds": 50, "schedule": "simultaneous", "agents": agents}
    config = tmp_path / "net.toml"
    config.write_text(tomli_w.dumps(data))
    master, slave = pty.openpty()
    out = (tmp_path / "stdout.json").open("w+b")
    args = ["design", str(config), "--agent", "a0", "--json", "--out", str(tmp_path / "o")]
    child = subprocess.Popen(
        [sys.executable, "-m", "misalign.cli", *args], stdout=out, stderr=slave
    )
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the pty
            break
        if not chunk:
            break
        shown += chunk
    assert child.wait(timeout=120) == 0
    os.close(master)
    out.seek(0)
    assert json.loads(out.read())["agent"] == "a0"
    out.close()
    text = shown.decode(errors="replace")
    for k in range(6):
        assert f"design: stability: rho against a{k}'s step scale ({k + 1} of 6)" in text
    assert "design: prompt" in text
