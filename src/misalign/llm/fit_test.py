"""Tests for misalign.llm.fit: fitted maps of language-model agents against servers whose
answers follow a known map (the fake server of misalign.llm.fake_server, over loopback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.config import parse_config
from misalign.experiment import fit, predict, setup, simulate
from misalign.llm.agent import Session
from misalign.llm.fake_server import FakeServer, Reply, affine, estimate_of
from misalign.llm.fit import fit_answers


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
    for fit_ in (fitted.global_, fitted.local):
        assert np.abs(fit_.map.A - A).max() < 1e-6
        assert np.abs(fit_.map.c - c).max() < 1e-6
        assert (fit_.r2 > 1 - 1e-12).all() and (fit_.rms < 1e-9).all()
    assert fitted.confirmed.all() and fitted.iterations == 1
    for name in ("A", "B"):
        final = trajectory.outputs(name)[-1]
        assert np.abs(final - prediction.fixed_point[name]).max() < 1e-6


def test_a_play_without_an_equilibrium_leaves_the_others_refitted(tmp_path):
    """In a batch where the global fits predict no equilibrium for some plays (a partner
    with a large step), the other plays are still refitted locally and confirmed; the plays
    without one keep their global fit and are not confirmed."""
    A, c = _map(2, seed=2)
    with FakeServer(affine(A, c)) as server:
        config = _config(server, 2, rounds=5)
        config["agents"]["B"] |= {"preconditioner": "identity", "eta": 2.0}
        _, fits, _, _, _ = _run(config, tmp_path / "s.sqlite", range(8))
    converges = fits.global_prediction.converges
    assert converges.any() and not converges.all()
    fitted = fits.agents["A"]
    assert fitted.iterations == 1
    assert (fitted.confirmed == converges).all()
    assert fitted.probes == 4 * converges.sum()  # only the plays with an equilibrium asked
    assert np.allclose(fitted.local.map.A, fitted.global_.map.A, atol=1e-9)


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
    assert fits.agents["B"].local is not None and fits.agents["B"].iterations == 1
    assert fits.agents["B"].confirmed[0]
    for name in "AB":
        assert np.abs(trajectory.outputs(name)[-1] - prediction.fixed_point[name]).max() < 1e-6
