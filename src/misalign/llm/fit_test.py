"""Tests for misalign.llm.fit: fitted maps of language-model agents against servers whose
answers follow a known map (the fake server of misalign.llm.fake_server, over loopback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.api import fit, predict, setup, simulate
from misalign.config import parse_config
from misalign.llm.agent import Session
from misalign.llm.fake_server import FakeServer, Reply, affine, estimate_of
from misalign.llm.fit import WARMUP, fit_answers, most_answers


def _config(server: FakeServer, d: int, rounds: int, **llm) -> dict:
    return {
        "seed": 0,
        "d": d,
        "rounds": rounds,
        "agents": {
            "A": {
                "kind": "llm",
                "model": "fake",
                "base_url": server.base_url,
                "api_key_env": "",
                "n": 8,
                "concurrency": 32,
                **llm,
            },
            "B": {"n": 8, "noise": 0.2},
        },
    }


def _map(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A non-symmetric ``A`` with spectral radius 0.6, and ``c``."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    A *= 0.6 / max(abs(np.linalg.eigvals(A)))
    assert not np.allclose(A, A.T)
    return A, rng.standard_normal(d)


def _run(config: dict, store, seeds=range(1)):
    session = Session(str(store))
    try:
        game = setup(parse_config(config), seeds=seeds, session=session)
        fits = fit(game)
        trajectory = simulate(game)
        return game, fits, trajectory, predict(game), session
    finally:
        session.close()


@pytest.mark.parametrize("d", [2, 4])
def test_fit_recovers_a_known_affine_map_and_the_play_ends_on_its_prediction(tmp_path, d):
    """A server answering ``A w + c`` (non-symmetric ``A``): both fits recover ``A`` and
    ``c`` to 1e-6, the local prediction is confirmed, and every play ends on the predicted
    equilibrium to 1e-6."""
    A, c = _map(d, seed=d)
    with FakeServer(affine(A, c)) as server:
        game, fits, trajectory, prediction, _ = _run(
            _config(server, d, rounds=80), tmp_path / "s.sqlite", range(3)
        )
    fitted = fits.agents["A"]
    fit_ = fitted.global_
    assert np.abs(fit_.map.A - A).max() < 1e-6
    assert np.abs(fit_.map.c - c).max() < 1e-6
    assert (fit_.r2 > 1 - 1e-12).all() and (fit_.rms < 1e-9).all()
    assert (fit_.r2_loo > 1 - 1e-12).all()
    # the global prediction holds where it says: checked once per play, never refitted
    assert fitted.confirmed.all() and fitted.iterations == 0 and fitted.local is None
    assert fitted.probes == 3
    for name in ("A", "B"):
        final = trajectory.outputs(name)[-1]
        assert np.abs(final - prediction.fixed_point[name]).max() < 1e-6


def test_a_play_without_an_equilibrium_is_probed_where_its_play_goes(tmp_path):
    """In a batch where the global fits predict no equilibrium for some plays (a partner
    with a large step), the plays with one are checked and confirmed; the others play a
    warm-up, are refitted once around the inputs it visited (``WARMUP`` rounds, stored:
    the play reads them back) and, still without an equilibrium, are not confirmed."""
    A, c = _map(2, seed=2)
    with FakeServer(affine(A, c)) as server:
        config = _config(server, 2, rounds=5)
        config["agents"]["B"] |= {"preconditioner": "identity", "eta": 2.0}
        game, fits, trajectory, _, session = _run(config, tmp_path / "s.sqlite", range(8))
        sent = len(server.requests)
    converges = fits.global_prediction.converges
    assert converges.any() and not converges.all()
    fitted = fits.agents["A"]
    assert fitted.iterations == 1
    assert (fitted.confirmed == converges).all()
    assert fitted.probes == converges.sum() + 4 * (~converges).sum()
    assert np.allclose(fitted.local.map.A, fitted.global_.map.A, atol=1e-9)
    # the warm-up's 5 rounds are the play's own first 5 turns: asked once, read back
    warm = WARMUP * (~converges).sum()
    assert sent == 4 * 8 + fitted.probes + warm + 5 * converges.sum()
    assert session.stats.cached == warm
    assert sent + session.stats.cached <= most_answers(game) + 5 * 8


def test_the_local_fit_follows_a_nonlinear_model_where_the_play_goes(tmp_path):
    """A server whose answers are affine only locally (``0.8 tanh(w) + c``): the global fit
    over the play's scale misses the equilibrium that the play reaches; the local refits,
    probing around the predicted equilibrium, predict it to within a small fraction of that
    miss, and the model's answer there confirms it."""
    d = 2
    c = np.array([1.5, -1.2])

    def tanh_map(body: dict, index: int) -> Reply:
        w = estimate_of(body, d)
        return Reply(content=json.dumps({"estimate": (0.8 * np.tanh(2 * w) + c).tolist()}))

    with FakeServer(tanh_map) as server:
        config = _config(server, d, rounds=200, probes=8, refits=8)
        config["agents"]["B"] |= {"target": [4.0, -4.0], "noise": 0.0}
        _, fits, trajectory, prediction, _ = _run(config, tmp_path / "s.sqlite")
    observed = trajectory.outputs("A")[-1, 0]
    global_gap = np.linalg.norm(observed - fits.global_prediction.fixed_point["A"][0])
    local_gap = np.linalg.norm(observed - prediction.fixed_point["A"][0])
    assert global_gap > 0.05
    assert local_gap < 0.05 * global_gap
    assert fits.agents["A"].confirmed[0]


@pytest.mark.slow
def test_predicted_stationary_spread_matches_200_noisy_plays(tmp_path):
    """Answers ``A w + c + N(0, s^2 I)``: with ``samples = 12`` per probe the fit estimates
    the answers' covariance ``Q``; the Lyapunov solution (docs/theory.md §6) predicts the
    RMS spread of the final outputs around the predicted limit, over 200 plays, within 10%."""
    d, std = 2, 0.05
    A, c = _map(d, seed=5)
    with FakeServer(affine(A, c, noise_std=std, seed=3)) as server:
        config = _config(server, d, rounds=30, samples=12, refits=0, request={"seed": 1})
        config["agents"]["B"]["n"] = 40  # a well-conditioned partner: every play mixes fast
        game, fits, trajectory, prediction, _ = _run(config, tmp_path / "s.sqlite", range(200))
    Q = fits.agents["A"].global_.noise
    assert abs(np.trace(Q, axis1=1, axis2=2).mean() / (d * std**2) - 1) < 0.1
    assert prediction.rho.max() < 0.8
    gap = trajectory.outputs("A")[-1] - prediction.fixed_point["A"]
    observed = np.sqrt((gap**2).sum(axis=-1).mean())
    predicted = np.sqrt(np.trace(prediction.covariance["A"], axis1=1, axis2=2).mean())
    assert abs(observed / predicted - 1) < 0.1, (observed, predicted)


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(1, 4),
    batch=st.integers(1, 3),
    samples=st.integers(1, 4),
    missing=st.floats(0, 0.3),
    seed=st.integers(0, 2**32 - 1),
)
def test_fit_answers_agrees_with_numpy_least_squares(d, batch, samples, missing, seed):
    """``fit_answers`` per play equals ``numpy.linalg.lstsq`` on ``[w, 1]`` over the answers
    that are there (a share ``missing`` of them is NaN), its ``r2`` and RMS are those of the
    residuals, and ``Q`` is their covariance with ``d + 1`` degrees of freedom removed; a
    play without ``d + 1`` affinely independent probes answered has no fit."""
    rng = np.random.default_rng(seed)
    probes = d + 3
    W = rng.standard_normal((probes, batch, d))
    F = rng.standard_normal((samples, probes, batch, d))
    F[rng.random((samples, probes, batch)) < missing] = np.nan
    fit_ = fit_answers(W, F)
    for b in range(batch):
        X = np.concatenate([np.tile(W[:, b], (samples, 1)), np.ones((samples * probes, 1))], 1)
        Y = F[:, :, b].reshape(samples * probes, d)
        here = np.isfinite(Y).all(axis=1)
        X, Y = X[here], Y[here]
        if np.linalg.matrix_rank(X) < d + 1:
            assert np.isnan(fit_.map.A[b]).all() and np.isnan(fit_.r2[b])
            continue
        coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
        assert np.allclose(fit_.map.A[b], coef[:d].T, atol=1e-8)
        assert np.allclose(fit_.map.c[b], coef[d], atol=1e-8)
        residual = Y - X @ coef
        total = ((Y - Y.mean(0)) ** 2).sum()
        assert np.isclose(fit_.r2[b], 1 - (residual**2).sum() / total)
        assert np.isclose(fit_.rms[b], np.sqrt((residual**2).mean()))
        if samples > 1:
            dof = max(1, len(Y) - d - 1)
            assert np.allclose(fit_.noise[b], residual.T @ residual / dof, atol=1e-8)
    assert (fit_.noise is None) == (samples == 1)


def test_a_play_that_fails_while_probed_leaves_the_batch_predicted(tmp_path):
    """A model that never answers one play's prompt with numbers: that play fails during the
    fit (``rho = inf``, no equilibrium, listed as failed) and the rest of the batch is fitted,
    played and predicted as if alone."""
    d = 2
    A, c = _map(d, seed=3)
    probe = Session(str(tmp_path / "probe.sqlite"))
    with FakeServer(affine(A, c)) as server:
        config = parse_config(_config(server, d, rounds=40, max_retries=1))
        game = setup(config, seeds=range(3), session=probe)
        probe.close()
        marker = f"x = {game.prompts['A'][1].X[0].tolist()}"
        answer = affine(A, c)

        def refuse_play_1(body: dict, index: int) -> Reply:
            if any(marker in str(m["content"]) for m in body["messages"]):
                return Reply(content="I would rather not compute that.")
            return answer(body, index)

        server.behaviour = refuse_play_1
        game, fits, trajectory, prediction, session = _run(
            _config(server, d, rounds=40, max_retries=1), tmp_path / "s.sqlite", range(3)
        )
    assert {f["seed"] for f in session.failed} == {1}
    assert prediction.rho[1] == np.inf and not fits.global_prediction.converges[1]
    for play in (0, 2):
        assert np.abs(fits.agents["A"].global_.map.A[play] - A).max() < 1e-6
        final = trajectory.outputs("A")[-1, play]
        assert np.abs(final - prediction.fixed_point["A"][play]).max() < 1e-6


def test_each_agent_refits_as_often_as_it_says(tmp_path):
    """Two language-model agents: ``refits = 0`` leaves A with its global fit only, while B
    is refitted locally; the play still ends on the prediction."""
    d = 2
    A, c = _map(d, seed=4)
    with FakeServer(affine(A, c)) as server:
        config = _config(server, d, rounds=60, refits=0)
        config["agents"]["B"] = config["agents"]["A"] | {"refits": 3, "n": 9}
        _, fits, trajectory, prediction, _ = _run(config, tmp_path / "s.sqlite")
    assert fits.agents["A"].local is None and fits.agents["A"].iterations == 0
    assert not fits.agents["A"].confirmed[0]  # never checked
    # B's global prediction is checked, holds, and is not refitted
    assert fits.agents["B"].local is None and fits.agents["B"].iterations == 0
    assert fits.agents["B"].confirmed[0] and fits.agents["B"].probes == 1
    for name in "AB":
        assert np.abs(trajectory.outputs(name)[-1] - prediction.fixed_point[name]).max() < 1e-6


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(1, 4),
    batch=st.integers(1, 3),
    samples=st.integers(1, 3),
    extra=st.integers(1, 4),
    missing=st.floats(0, 0.2),
    seed=st.integers(0, 2**32 - 1),
)
def test_r2_loo_is_the_fit_to_the_other_probes(d, batch, samples, extra, missing, seed):
    """``r2_loo`` equals refitting without each probe (all its samples) in turn and scoring
    that probe's answers: ``1 - PRESS / total`` by brute force; NaN where some probe cannot
    be left out (the others lose ``d + 1`` affinely independent answers)."""
    rng = np.random.default_rng(seed)
    probes = d + 1 + extra
    W = rng.standard_normal((probes, batch, d))
    F = np.einsum("ij,pbj->pbi", rng.standard_normal((d, d)), W) + 0.5 * rng.standard_normal(
        (samples, probes, batch, d)
    )
    F[rng.random((samples, probes, batch)) < missing] = np.nan
    fit_ = fit_answers(W, F)
    for b in range(batch):
        if np.isnan(fit_.r2[b]):
            assert np.isnan(fit_.r2_loo[b])
            continue
        press, possible = 0.0, True
        for p in range(probes):
            rest = [q for q in range(probes) if q != p]
            alone = fit_answers(W[rest][:, b : b + 1], F[:, rest][:, :, b : b + 1])
            mine = F[:, p, b]
            mine = mine[np.isfinite(mine).all(axis=1)]
            if not len(mine):
                continue
            if np.isnan(alone.map.c).any():
                possible = False
                break
            predicted = alone.map.A[0] @ W[p, b] + alone.map.c[0]
            press += ((mine - predicted) ** 2).sum()
        Y = F[:, :, b].reshape(-1, d)
        Y = Y[np.isfinite(Y).all(axis=1)]
        if not possible:
            assert np.isnan(fit_.r2_loo[b])
            continue
        expected = 1 - press / ((Y - Y.mean(axis=0)) ** 2).sum()
        assert np.isclose(fit_.r2_loo[b], expected, rtol=1e-7, atol=1e-9), (b, expected)


def test_held_out_r2_sees_through_noise_and_heavy_tails():
    """Answers that do not depend on the input: in-sample ``r2`` averages ``d / (m - 1)``
    over ``m`` answers (0.40 at d = 2 with 6 probes), held out it is negative; one heavy-
    tailed answer (1e15, one coordinate of one probe) scores in-sample ``r2`` 0.45 (median)
    and held out below 0 in every play; with
    ``d + 1`` probes in-sample ``r2`` is 1 by construction and nothing can be held out."""
    rng = np.random.default_rng(0)
    d, probes, batch = 2, 6, 4000
    W = rng.standard_normal((probes, batch, d))
    noise = fit_answers(W, rng.standard_normal((1, probes, batch, d)))
    assert abs(noise.r2.mean() - d / (probes - 1)) < 0.02
    assert np.median(noise.r2_loo) < -0.2
    F = rng.standard_normal((1, probes, 50, d))
    F[0, 2, :, 0] = 1e15
    heavy = fit_answers(W[:, :50], F)
    assert np.median(heavy.r2) > 0.3 and (heavy.r2_loo < 0).all()
    exact = fit_answers(W[: d + 1, :50], rng.standard_normal((1, d + 1, 50, d)))
    assert np.allclose(exact.r2, 1) and np.isnan(exact.r2_loo).all()


def test_confirmed_means_the_reported_equilibrium_holds(tmp_path):
    """A server answering ``1.392 tanh(M w + c)`` (d = 2, 5 probes, 2 refits; a case where
    the flag once checked the prediction before the last refit): over 8 plays, ``confirmed``
    is true exactly where the model's answer at the input the reported prediction names is
    within the tolerance of the output it names."""
    d = 2
    rng = np.random.default_rng(11)
    M, c = 0.9 * rng.standard_normal((d, d)), rng.standard_normal(d)

    def model(w: np.ndarray) -> np.ndarray:
        return 1.392 * np.tanh(M @ w + c)

    def behaviour(body: dict, index: int) -> Reply:
        return Reply(content=json.dumps({"estimate": model(estimate_of(body, d)).tolist()}))

    with FakeServer(behaviour) as server:
        config = _config(server, d, rounds=5, probes=5, refits=2)
        game, fits, _, prediction, _ = _run(config, tmp_path / "s.sqlite", range(8))
    fitted = fits.agents["A"]
    at = prediction.fixed_point["B"]  # A reads B
    for b in range(8):
        if not prediction.converges[b]:
            assert not fitted.confirmed[b]
            continue
        miss = np.linalg.norm(model(at[b]) - prediction.fixed_point["A"][b])
        assert fitted.confirmed[b] == (miss <= fitted.tolerance[b]), (b, miss)
    assert fitted.confirmed.any()


def _answering(f):
    """A fake server's behaviour: the estimate ``f(w)`` of the estimate ``w`` it is shown
    (d = 2)."""
    return lambda body, index: Reply(
        content=json.dumps({"estimate": [float(x) for x in f(estimate_of(body, 2))]})
    )


def _two_model_config(a_url: str, b_url: str, rounds: int, **top) -> dict:
    """Two language-model agents on loopback servers (6 probes, d = 2), A reading B and B
    reading A, from a start off the origin."""
    agent = {"kind": "llm", "model": "fake", "api_key_env": "", "n": 4, "probes": 6}
    return {
        "seed": 0,
        "d": 2,
        "rounds": rounds,
        "start": [0.3, -0.2],
        **top,
        "agents": {"A": agent | {"base_url": a_url}, "B": agent | {"base_url": b_url}},
    }


def test_a_prediction_without_an_equilibrium_is_never_confirmed(tmp_path):
    """Two refitted language models, A answering ``clip(-1.5 w + 0.1, -1, 1)`` and B
    echoing its input (6 probes): B's local fit is confirmed at an early check, but A's
    refits end on ``rho >= 1``, a prediction with no equilibrium, so nothing the reported
    prediction names was asked: neither agent is confirmed and ``miss`` and ``tolerance``
    are NaN (an earlier prediction's flags once stayed: B confirmed, miss 1e-16)."""

    a_map, b_map = _answering(lambda w: np.clip(-1.5 * w + 0.1, -1, 1)), _answering(lambda w: w)
    with FakeServer(a_map) as a, FakeServer(b_map) as b:
        config = _two_model_config(a.base_url, b.base_url, rounds=10)
        _, fits, _, prediction, _ = _run(config, tmp_path / "s.sqlite")
    assert not prediction.converges[0] and prediction.rho[0] >= 1
    assert not np.isfinite(prediction.fixed_point["B"][0]).all()
    for name in ("A", "B"):
        fitted = fits.agents[name]
        assert fitted.iterations > 0, name
        assert not fitted.confirmed[0], name
        assert np.isnan(fitted.miss[0]) and np.isnan(fitted.tolerance[0]), name


def _two_models(tmp_path, f_a, f_b, *extra: str, **top) -> tuple[dict, str]:
    """``misalign run --json`` and the text summary of two language-model agents on loopback
    servers answering ``f_a(w)`` and ``f_b(w)`` (d = 2), A reading B and B reading A."""
    import subprocess
    import sys

    import tomli_w

    with FakeServer(_answering(f_a)) as a, FakeServer(_answering(f_b)) as b:
        config = _two_model_config(a.base_url, b.base_url, rounds=40, **top)
        path = tmp_path / "c.toml"
        path.write_text(tomli_w.dumps(config))
        base = [sys.executable, "-m", "misalign.cli", "run", str(path)]
        base += ["--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "out"), *extra]
        as_json = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=120)
        text = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 0 and text.returncode == 0, as_json.stderr + text.stderr
    return json.loads(as_json.stdout), text.stdout


def test_a_bounded_cycle_is_reported_as_a_cycle_not_a_divergence(tmp_path):
    """A answers ``clip(-1.5 w + 0.1, -1, 1)``, B echoes its input: the play is a bounded
    cycle of period 2 (outputs +-1), while the fitted maps have ``rho >= 1``. The headline is
    the observed cycle, the fit's verdict is a prediction beside it, and "diverges" is printed
    nowhere; the cycle's mean over its tail is what the fits are compared with."""
    result, text = _two_models(tmp_path, lambda w: np.clip(-1.5 * w + 0.1, -1, 1), lambda w: w)
    observed = result["observed"]
    assert observed["class"] == "cycle" and observed["period"] == 2
    first, last = observed["tail"]
    outputs = np.array(result["outputs"]["A"])[first : last + 1]
    assert np.abs(np.abs(outputs) - 1).max() == 0  # the play really sits on +-1
    assert np.allclose(observed["agents"]["A"]["mean"], outputs.mean(axis=0))
    assert result["fit"]["A"]["observed"] == observed["agents"]["A"]["mean"]
    assert text.splitlines()[0].startswith("observed: a cycle of period 2")
    assert "diverges" not in text
    from PIL import Image

    title = Image.open(tmp_path / "out" / "trajectory.png").text["Description"]
    assert "observed: a cycle of period 2; predicted from the fitted maps: " in title, title
    assert "diverge" not in title
    if not result["prediction"]["converges"]:  # nothing the prediction names was checked
        for name, row in result["fit"].items():
            assert row["confirmed"] is False and row["miss"] is row["tolerance"] is None
            assert f"{name}: the reported prediction is not checked" in text
    if not result["prediction"]["converges"]:
        assert "no equilibrium it converges to (rho = " in text
    for row in result["fit"].values():
        for key in ("global", "local"):
            if row[key] is not None:
                assert {"r2", "r2_loo", "r2_play", "rms_play"} <= set(row[key])


def test_a_batch_of_black_boxes_leads_with_what_was_observed(tmp_path):
    """``--seeds 2`` with the cycling pair of models: the batch summary's headline is the
    observed classes, the fitted maps' verdict follows labelled as a prediction, and play 0's
    fits are shown with their in-sample, held-out and on-the-play ``r2`` and their check."""
    result, text = _two_models(
        tmp_path, lambda w: np.clip(-1.5 * w + 0.1, -1, 1), lambda w: w, "--seeds", "2"
    )
    counts = result["batch"]["observed"]["counts"]
    assert counts["cycle"] == 2, counts
    lines = text.splitlines()
    assert lines[0].startswith("2 plays (seeds 0..1), observed: 2 cycling"), lines[0]
    assert lines[1].startswith("predicted from the fitted maps (a prediction, not an obs")
    assert "diverges" not in text and "diverge " not in text
    assert "fitted maps of play 0 (seed 0; the report's fit is this play's)" in text
    from PIL import Image

    title = Image.open(tmp_path / "out" / "trajectory.png").text["Description"]
    assert title.startswith("observed: 2 cycling; drawn: the ") and "diverge" not in title
    for name, row in result["fit"].items():
        fit_ = row["local"] or row["global"]
        assert all(f"{fit_[k]:.3f}" in text for k in ("r2", "r2_loo", "r2_play")), (name, fit_)
        assert f"{name}: the reported prediction is " in text


def test_heavy_tailed_answers_score_well_only_in_sample(tmp_path):
    """A answers ``0.5 w + 1``, but now and then (where the sixth decimal of ``w_0`` is 0 or
    1: one of the global fit's 6 probes here) 1e15 in its first coordinate: the in-sample
    ``r2`` of that fit is high, the held-out ``r2_loo`` below 0, and the summary prints both."""
    outliers = []

    def heavy(w):
        out = 0.5 * w + 1
        if int(abs(w[0]) * 1e6) % 10 < 2:
            out[0] = 1e15
            outliers.append(w)
        return out

    result, text = _two_models(tmp_path, heavy, lambda w: 0.5 * w, "--set", "agents.A.refits=0")
    fit_ = result["fit"]["A"]["global"]
    assert outliers and fit_["r2"] > 0.3 and fit_["r2_loo"] < 0, (fit_, outliers)
    assert "r2 held out" in text and f"{fit_['r2_loo']:.3f}" in text
