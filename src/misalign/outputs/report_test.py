"""Tests for misalign.outputs.report: the JSON contract."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from misalign.api import predict, setup, simulate
from misalign.api_test import CONFIG
from misalign.config import load_config, parse_config
from misalign.model.observe import CLASSES, classify
from misalign.outputs.batch import batch
from misalign.outputs.report import report, to_json

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"


def test_report_round_trips_through_json_and_matches_the_arrays():
    game = setup(parse_config(CONFIG))
    prediction, trajectory = predict(game), simulate(game)
    text = json.dumps(report(game, prediction, trajectory))
    data = json.loads(text)
    assert json.dumps(data) == text
    for name in ("A", "B"):
        agent = data["agents"][name]
        p = game.prompts[name][0]
        np.testing.assert_array_equal(agent["X"], p.X)
        np.testing.assert_array_equal(agent["y"], p.y)
        np.testing.assert_array_equal(agent["gamma"], game.agents[name].gamma[0])
        assert len(data["outputs"][name]) == 60 and len(data["outputs"][name][0]) == 3
        final = np.linalg.norm(np.array(data["outputs"][name][-1]) - agent["target"])
        assert data["distance"][name] == pytest.approx(final)
        assert data["distance"][name] == pytest.approx(
            data["prediction"]["distance"][name], abs=1e-8
        )
    assert data["prediction"]["converges"] is True
    assert data["config"]["seed"] == 3 and data["diverged_at"] is None


def test_a_play_that_fails_to_parse_failed_and_did_not_diverge(tmp_path):
    """A language model that answers ``0.5 w`` and then, from its 10th request on (during
    the play, after its 4 probes), prose: the play is observed ``failed``; the JSON's
    ``failed_at`` is the round it failed at and ``diverged_at`` is null (the play engine
    stops at the NaN as at an overflow: the report tells the two apart)."""
    from misalign.api import fit
    from misalign.llm.agent import Session
    from misalign.llm.fake_server import FakeServer, Reply, estimate_of

    def behaviour(body, index):
        if index >= 10:
            return Reply(content="I would rather not say.")
        return Reply(content=json.dumps({"estimate": (0.5 * estimate_of(body, 2)).tolist()}))

    with FakeServer(behaviour) as server:
        llm = {"kind": "llm", "model": "fake", "base_url": server.base_url, "api_key_env": ""}
        config = {
            "seed": 0,
            "d": 2,
            "rounds": 20,
            "agents": {
                "A": llm | {"n": 4, "probes": 4, "refits": 0, "max_retries": 0},
                "B": {"n": 6},
            },
        }
        session = Session(str(tmp_path / "s.sqlite"))
        try:
            game = setup(parse_config(config), session=session)
            fits = fit(game)
            trajectory = simulate(game)
            data = json.loads(to_json(report(game, predict(game), trajectory, fits=fits)))
        finally:
            session.close()
    assert data["observed"]["class"] == "failed"
    assert data["diverged_at"] is None
    assert data["failed_at"] == data["rounds_played"] == 6, (
        data["failed_at"],
        data["rounds_played"],
    )


def _contract():
    """The key table of docs/json.md (the ``--json`` contract): top-level keys, the ``run``-only
    ones, and the keys of ``prediction``."""
    page = (ROOT / "docs" / "json.md").read_text()
    table = page[page.index("| key | content |") :].split("\n\n")[0].splitlines()[2:]
    keys, run_only, prediction = set(), set(), set()
    for row in table:
        first, content = row.strip("| ").split(" | ", 1)
        names = set(re.findall(r"`([a-z_]+)(?:\.<name>)?`", first))
        keys |= names
        if content.startswith("`run` only") or content.startswith("`run --seeds N` only"):
            run_only |= names
        if names == {"prediction"}:
            # a key is followed by its description: "`rho` (...)", "`converges`;"
            prediction = set(re.findall(r"`([a-z_]+)(?:\.<name>)?`(?=[;:]| \()", content))
    return keys, run_only, prediction


CASES = {
    "converging": ("two_agents.toml", []),
    "diverging": ("diverging.toml", []),
    "one-sided": ("one_sided.toml", []),
    "sampled": ("two_agents.toml", ["--set", "agents.A.sampling_std=0.05"]),
    "attacked": ("attack.toml", []),
    "defended": ("attack.toml", ["--set", "defence={agent = 'A', method = 'monitor'}"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_contract_key_in_every_case(tmp_path, case):
    """The key table of docs/json.md is the contract: ``run`` and ``theory`` print exactly its keys
    (``null`` where there is no value), as strict JSON, whatever the play does."""
    keys, run_only, prediction_keys = _contract()
    assert {"config", "prediction", "batch", "distance", "defence"} <= keys
    assert {"rho", "converges", "distance", "covariance", "why", "scope"} <= prediction_keys
    assert "theory" not in prediction_keys
    example, extra = CASES[case]
    for command in ("run", "theory"):
        result = subprocess.run(
            [sys.executable, "-m", "misalign.cli", command, str(EXAMPLES / example), "--json"]
            + ["--out", str(tmp_path), *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
        assert set(data) == (keys if command == "run" else keys - run_only)
        names = set(data["agents"])
        assert set(data["prediction"]) == prediction_keys | names
        assert set(data["prediction"]["distance"]) == names
        if not data["prediction"]["converges"]:
            assert all(data["prediction"][n] is None for n in names)
            assert data["prediction"]["one_sided"] is None
    assert (data["prediction"]["covariance"] is not None) == (case == "sampled")
    assert (data["attack"] is not None) == (case in ("attacked", "defended"))


GRID_CONFIG = {
    "seed": 11,
    "d": 4,
    "rounds": 300,
    "agents": {
        "A": {"n": 12, "rotate": True, "steps_per_turn": 2},
        "B": {"n": 10, "eta": 0.6},
    },
}
NOISE = {
    "none": {},
    "label": {"A": {"noise": 0.3}, "B": {"noise": 0.4}},
    "sampled victim": {"A": {"sampling_std": 0.01}},
    "sampled attacker": {"B": {"sampling_std": 0.01}},
}
ATTACKS = {
    "none": None,
    "decoy": {"method": "decoy"},
    "gray-box decoy": {"method": "decoy", "knowledge": "gray-box"},
    "geometry": {"method": "geometry"},
    "per-turn": {"method": "per-turn"},
}


@pytest.mark.parametrize("noise", sorted(NOISE))
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_no_verdict_is_contradicted_by_the_play(attack, noise):
    """Over attack x defence x noise, 4 seeds each: wherever the report says an agent ends on
    target, the simulated play ends there (noise-aware); the prediction of the regime each
    agent ended in agrees with the play in every case docs/attacks.md says it covers."""
    held = 0
    for defence in (None, "damping", "monitor", "predict"):
        data = json.loads(json.dumps(GRID_CONFIG))
        for name, extra in NOISE[noise].items():
            data["agents"][name] |= extra
        if ATTACKS[attack] is not None:
            data["attack"] = {"agent": "B", **ATTACKS[attack]}
        if defence is not None:
            data["defence"] = {"agent": "A", "method": defence}
        game = setup(parse_config(data), seeds=range(11, 15))
        trajectory = simulate(game)
        prediction = predict(game)
        for play in range(4):
            out = report(game, prediction, trajectory, play)
            held += out["agreement"]["holds"] is True
            for name, exact in out["prediction"]["on_target"].items():
                if exact:
                    final = np.array(out["outputs"][name][-1])
                    target = np.array(out["agents"][name]["target"])
                    slack = out["agreement"]["tolerance"][name]
                    assert np.linalg.norm(final - target) <= slack + 1e-6, (defence, name, play)
            if out["prediction"]["one_sided"] is not None:
                assert out["agreement"]["holds"] is True
    assert held == 16, f"the prediction missed the play in {16 - held} of 16 plays"


def test_no_verdict_where_the_play_cannot_be_checked_or_has_not_arrived(tmp_path):
    """Review findings: a play that has not reached its prediction gets no verdict in the JSON
    or the text; sampled outputs that random-walk along unseen directions cannot be checked;
    theory gives no verdict a damped or sampled victim of a gray box would contradict; a
    refusing predictive victim is on target because it stopped reading."""
    slow = ["--set", "agents.A.eta=1e-11", "--set", "agents.B.eta=1e-11"]
    slow += [
        "--set",
        "agents.A.preconditioner=identity",
        "--set",
        "agents.B.preconditioner=identity",
    ]
    args = [sys.executable, "-m", "misalign.cli", "run", str(EXAMPLES / "two_agents.toml")]
    text = subprocess.run(
        [*args, *slow, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    ).stdout
    assert "does not end at the prediction" in text and "closest" not in text
    withheld = [
        "--set",
        "attack.knowledge=gray-box",
        "--set",
        "defence={agent='A',method='damping'}",
    ]
    text = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "theory", str(EXAMPLES / "attack.toml"), *withheld]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "no verdict before the play" in text
    assert "closest" not in text and "one-sided" not in text

    unseen = {"seed": 1, "d": 6, "rounds": 50, "agents": {"A": {"n": 2}, "B": {"n": 3}}}
    unseen["agents"]["A"]["sampling_std"] = 0.1
    game = setup(parse_config(unseen))
    trajectory = simulate(game)
    data = report(game, predict(game), trajectory)
    assert data["agreement"]["holds"] is None and data["prediction"]["one_sided"] is None
    assert set(data["prediction"]["on_target"].values()) == {None}

    gray = {"method": "decoy", "knowledge": "gray-box"}
    for defence, victim in (({"method": "damping"}, {}), (None, {"sampling_std": 0.01})):
        config = json.loads(json.dumps(GRID_CONFIG))
        config["agents"]["A"] |= victim
        config["attack"] = {"agent": "B", **gray}
        if defence:
            config["defence"] = {"agent": "A", **defence}
        game = setup(parse_config(config))
        before = report(game, predict(game))["prediction"]
        assert "no verdict" in before["scope"] and before["one_sided"] is None

    config = json.loads(json.dumps(GRID_CONFIG)) | {"seed": 5}
    config["defence"] = {"agent": "A", "method": "predict"}
    for seed in range(5, 15):
        game = setup(parse_config(config | {"seed": seed}))
        trajectory = simulate(game)
        data = report(game, predict(game), trajectory)
        if data["defence"]["refused_at"] is not None and data["prediction"]["on_target"]["A"]:
            assert data["prediction"]["why"]["A"].startswith("predictive defence: it stopped")
            break
    else:
        pytest.fail("no seed in 5..14 where the predictive victim refuses and ends on target")


def test_batch_spread_is_the_observed_and_the_predicted_stationary_spread():
    """``batch.spread``: over 2,000 sampled plays, the observed RMS distance of the final
    outputs from their predicted limits matches the Lyapunov prediction (docs/theory.md §6)
    within 10% (plays near rho = 1 carry most of the variance: over 400 plays the ratio
    ranged from 0.89 to 1.0 by seed range), and equals the quantity computed directly from
    the trajectory; ``null`` without noise."""
    config = load_config(EXAMPLES / "two_agents.toml", ["agents.A.sampling_std=0.05"])
    game = setup(config, seeds=range(2000))
    trajectory, prediction = simulate(game), predict(game)
    spread = batch(game, prediction, trajectory)["spread"]
    ok = prediction.converges & (trajectory.diverged_at < 0)
    assert 0 < ok.sum() < 2000  # some play has no limit: left out, not a NaN in the mean
    for name in ("A", "B"):
        gap = trajectory.outputs(name)[-1][ok] - prediction.fixed_point[name][ok]
        assert np.isclose(spread[name]["observed"], np.sqrt((gap**2).sum(-1).mean()))
        assert abs(spread[name]["observed"] / spread[name]["predicted"] - 1) < 0.1
    quiet = setup(load_config(EXAMPLES / "two_agents.toml"), seeds=range(3))
    assert batch(quiet, predict(quiet), simulate(quiet))["spread"] is None


def test_observed_is_the_play_classified_alone_and_the_batch_counts():
    """``observed`` is ``null`` before the play and, after it, the play's classification
    (``misalign.model.observe``) through strict JSON; ``batch.observed`` counts the classes over the
    batch and the periods of its cycles."""
    config = load_config(EXAMPLES / "two_agents.toml", ["rounds=60"])
    game = setup(config, seeds=range(3))
    prediction, trajectory = predict(game), simulate(game)
    assert report(game, prediction)["observed"] is None
    whole = classify(trajectory)
    for play in range(3):
        data = json.loads(to_json(report(game, prediction, trajectory, play)))["observed"]
        assert data["class"] == CLASSES[whole.code[play]] == "fixed point"
        assert data["tail"] == [int(whole.first[play]), 59] and data["period"] is None
        for name in ("A", "B"):
            fixed = prediction.fixed_point[name][play]
            assert np.allclose(data["agents"][name]["mean"], fixed, rtol=0, atol=1e-6)
    counts = batch(game, prediction, trajectory)["observed"]
    assert counts == {"counts": dict.fromkeys(CLASSES, 0) | {"fixed point": 3}, "periods": {}}


def test_arrays_are_written_as_lists_with_null_for_what_is_not_finite():
    """A batch's per-play lists are numpy arrays until written: floats with NaN and
    infinities become ``null``, integers (uint64 seeds too) stay exact."""
    data = {
        "x": np.array([1.5, np.nan, np.inf, -np.inf, -0.0]),
        "seeds": np.array([0, 2**64 - 1], dtype=np.uint64),
        "n": np.arange(3),
        "empty": np.zeros(0),
    }
    assert json.loads(to_json(data)) == {
        "x": [1.5, None, None, None, -0.0],
        "seeds": [0, 2**64 - 1],
        "n": [0, 1, 2],
        "empty": [],
    }
