"""Tests for misalign.model.agent."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.model.agent import (
    AffineMap,
    GradientAgent,
    Turn,
    fit_affine,
    icl_loss,
    lsa_optimal_gamma,
    preconditioner,
)
from misalign.model.prompt import sample_prompt, sample_prompts
from misalign.runtime.device import host
from misalign.runtime.device_test import torch_device

KINDS = ["identity", "lsa-optimal", "newton"]


def _agent(prompts, kind="lsa-optimal", eta=1.0, steps=1):
    return GradientAgent(
        "A",
        gamma=np.stack([preconditioner(kind, p, eta) for p in prompts]),
        second_moment=np.stack([p.second_moment for p in prompts]),
        moment=np.stack([p.moment for p in prompts]),
        steps_per_turn=steps,
    )


def _prompts(batch, d, n, seed=0, **kw):
    return [sample_prompt(seed + b, "A", d=d, n=n, **kw) for b in range(batch)]


AGENT = {
    "n": st.integers(1, 15),
    "kind": st.sampled_from(KINDS),
    "eta": st.floats(0.05, 1.5),
    "seed": st.integers(0, 10**6),
}
"""An analytic agent's settings, drawn by the property tests below (with ``d`` and steps)."""


@settings(max_examples=30, deadline=None)
@given(**AGENT, d=st.integers(1, 6), steps=st.integers(1, 4))
def test_respond_is_k_gradient_steps_on_the_prompt(d, n, kind, eta, steps, seed):
    """f(w) = w - Gamma X^T (X w - y) / n, applied k times, computed from the raw prompt."""
    prompts = _prompts(3, d, n, seed=seed, noise=0.2, rotate=True)
    agent = _agent(prompts, kind, eta, steps)
    w = np.random.default_rng(seed).standard_normal((3, d))
    out = agent.respond(w, Turn(round=0, position=0, reads="B"))
    for b, p in enumerate(prompts):
        gamma = preconditioner(kind, p, eta)
        x = w[b]
        for _ in range(steps):
            x = x - gamma @ p.X.T @ (p.X @ x - p.y) / n
        np.testing.assert_allclose(out[b], x, rtol=1e-9, atol=1e-9)


def test_lsa_optimal_isotropic_is_scalar():
    p = sample_prompt(0, "A", d=5, n=20)
    np.testing.assert_allclose(preconditioner("lsa-optimal", p), 20 / 26 * np.eye(5))


def test_lsa_optimal_minimises_the_icl_loss_monte_carlo():
    """E|(Gamma S - I) w|^2 over x ~ N(0, Lambda), w ~ N(0, I): Gamma* beats scaled variants,
    and in the isotropic case reaches d(d+1)/(n+d+1) (docs/theory.md §1)."""
    rng = np.random.default_rng(0)
    d, n, trials = 3, 8, 40000

    def loss(gamma, spectrum):
        X = rng.standard_normal((trials, n, d)) * np.sqrt(spectrum)
        w = rng.standard_normal((trials, d))
        pred_minus_w = np.einsum("ij,tkj,tkl,tl->ti", gamma, X, X, w) / n - w
        return np.mean(np.einsum("ti,i,ti->t", pred_minus_w, spectrum, pred_minus_w))

    iso = sample_prompt(0, "A", d=d, n=n)
    optimum = loss(preconditioner("lsa-optimal", iso), np.ones(d))
    assert optimum == pytest.approx(d * (d + 1) / (n + d + 1), rel=0.03)
    spectrum = np.array([3.0, 1.0, 0.3])
    skew = sample_prompt(0, "A", d=d, n=n, spectrum=spectrum)
    best = loss(preconditioner("lsa-optimal", skew), spectrum)
    for scale in (0.8, 1.25):
        assert best < loss(scale * preconditioner("lsa-optimal", skew), spectrum)


def test_newton_step_lands_on_the_least_squares_solution():
    prompts = _prompts(4, d=3, n=9, noise=0.3)
    agent = _agent(prompts, "newton")
    np.testing.assert_allclose(agent.affine().H, np.broadcast_to(np.eye(3), (4, 3, 3)), atol=1e-10)
    out = agent.respond(np.ones((4, 3)), Turn(0, 0, "B"))
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(out[b], p.least_squares(), atol=1e-10)


def test_newton_with_fewer_examples_than_dimensions_projects_on_the_row_space():
    (p,) = _prompts(1, d=5, n=2)
    H = _agent([p], "newton").affine().H[0]
    np.testing.assert_allclose(H @ H, H, atol=1e-10)
    np.testing.assert_allclose(H, np.linalg.pinv(p.X) @ p.X, atol=1e-10)


def test_affine_power_composes():
    rng = np.random.default_rng(1)
    f = AffineMap(rng.standard_normal((2, 3, 3)) * 0.5, rng.standard_normal((2, 3)))
    w = rng.standard_normal((2, 3))
    np.testing.assert_allclose(f.power(3)(w), f(f(f(w))))
    np.testing.assert_allclose(f.power(0)(w), w)


def test_fit_affine_recovers_the_exact_map():
    agent = _agent(_prompts(5, d=4, n=6, rotate=True))
    fitted = fit_affine(agent, d=4, batch=5)
    np.testing.assert_allclose(fitted.A, agent.affine().A, atol=1e-10)
    np.testing.assert_allclose(fitted.c, agent.affine().c, atol=1e-10)


def test_fit_affine_needs_enough_probes():
    with pytest.raises(ValueError, match="d \\+ 1"):
        fit_affine(_agent(_prompts(1, d=4, n=6)), d=4, batch=1, probes=3)


def test_turn_outputs_select_an_agents_history():
    past = np.arange(7 * 1 * 1, dtype=float).reshape(7, 1, 1)
    turn = Turn(round=2, position=1, reads="A", past=past, order=("A", "B", "A"))
    assert turn.outputs("B")[:, 0, 0].tolist() == [1.0, 4.0]
    assert turn.outputs("A")[:, 0, 0].tolist() == [0.0, 2.0, 3.0, 5.0, 6.0]


def test_turn_pairs_match_each_output_with_the_input_it_read():
    """Order (A, B): A reads B, B reads A; rows 0..4 are A0 B0 A1 B1 A2."""
    past = np.arange(5, dtype=float).reshape(5, 1, 1) + 1
    start = np.zeros((1, 1))
    turn = Turn(round=2, position=1, reads="A", past=past, order=("A", "B"), start=start)
    inputs, outputs = turn.pairs("A", "B")
    assert inputs[:, 0, 0].tolist() == [0.0, 2.0, 4.0] and outputs[:, 0, 0].tolist() == [
        1.0,
        3.0,
        5.0,
    ]
    inputs, outputs = turn.pairs("B", "A")
    assert inputs[:, 0, 0].tolist() == [1.0, 3.0] and outputs[:, 0, 0].tolist() == [2.0, 4.0]
    inputs, outputs = turn.pairs("A", "A")  # an agent reading itself
    assert inputs[:, 0, 0].tolist() == [0.0, 1.0, 3.0]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), d=st.integers(1, 4), n=st.integers(2, 12))
def test_icl_loss_closed_form_matches_monte_carlo(seed, d, n):
    """The closed-form ICL loss against a Monte Carlo estimate, at Gamma* and at a random Gamma;
    Gamma* is its minimiser, with the isotropic value d(d+1)/(n+d+1)."""
    rng = np.random.default_rng(seed)
    spectrum = rng.uniform(0.3, 2.0, d)
    Lam = np.diag(spectrum)
    trials = 200_000
    X = rng.standard_normal((trials, n, d)) * np.sqrt(spectrum)
    w = rng.standard_normal((trials, d))
    xq = rng.standard_normal((trials, d)) * np.sqrt(spectrum)
    S_w = np.einsum("tkj,tkl,tl->tj", X, X, w) / n
    best = lsa_optimal_gamma(Lam, n)
    for gamma in (best, best + 0.1 * rng.standard_normal((d, d))):
        errors = np.einsum("ti,ij,tj->t", xq, gamma, S_w) - np.einsum("ti,ti->t", xq, w)
        mc, sem = np.mean(errors**2), np.std(errors**2) / np.sqrt(trials)
        assert abs(icl_loss(gamma, Lam, n) - mc) < 5 * sem
    gradient_free = [icl_loss(best + 1e-4 * e, Lam, n) for e in np.eye(d * d).reshape(-1, d, d)]
    assert min(gradient_free) >= icl_loss(best, Lam, n)
    iso = icl_loss(lsa_optimal_gamma(np.eye(d), n), np.eye(d), n)
    assert iso == pytest.approx(d * (d + 1) / (n + d + 1))


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(1, 8),
    n=st.integers(1, 20),
    kind=st.sampled_from(KINDS),
    rotate=st.booleans(),
    skewed=st.booleans(),
    seed=st.integers(0, 2**40),
)
def test_preconditioner_of_a_batch_is_each_play_alone(d, n, kind, rotate, skewed, seed):
    """On a batch of prompts (one ``eta`` per play, or one for all), ``preconditioner`` and
    ``lsa_optimal_gamma`` give each play's own matrix, bit for bit."""
    seeds = [seed + b for b in range(4)]
    spectrum = np.random.default_rng(seed).uniform(0.2, 3.0, d) if skewed else None
    batch = sample_prompts(seeds, "A", d, n, spectrum, rotate)
    alone = [sample_prompt(s, "A", d, n, spectrum, rotate) for s in seeds]
    etas = np.array([0.3, 0.7, 1.0, 1.3])
    for eta in (etas, 0.6):
        gamma = preconditioner(kind, batch, eta)
        assert gamma.shape == (4, d, d)
        for b, p in enumerate(alone):
            assert np.array_equal(
                gamma[b], preconditioner(kind, p, float(np.broadcast_to(eta, 4)[b]))
            )
    stacked = lsa_optimal_gamma(batch.covariance, n)
    for b, p in enumerate(alone):
        assert np.array_equal(stacked[b], lsa_optimal_gamma(p.covariance, n))


def test_one_step_power_is_the_map_itself():
    f = AffineMap(np.random.default_rng(0).standard_normal((2, 3, 3)), np.ones((2, 3)))
    g = f.power(1)
    assert np.array_equal(g.A, f.A) and np.array_equal(g.c, f.c)
    eye = np.broadcast_to(np.eye(3), f.A.shape)
    assert np.array_equal(f.A @ eye, f.A) and np.array_equal(f(np.zeros((2, 3))), f.c)


@settings(max_examples=25, deadline=None)
@given(**AGENT, d=st.integers(1, 8), steps=st.integers(0, 4), rotate=st.booleans())
def test_maps_on_torch_are_numpys_within_rounding(d, n, kind, eta, steps, rotate, seed):
    """The analytic agent built from torch prompts: its ``A``, ``c`` and answers against
    numpy's, within ``1e-12`` of their scale (for ``newton``, times the condition number of
    ``S`` on its range: ``pinv`` magnifies the last-bit differences of ``S``); ``host`` gives
    them back as numpy."""
    torch = pytest.importorskip("torch")
    seeds = range(seed, seed + 20)
    maps = []
    for on in (None, torch_device()):
        prompts = sample_prompts(seeds, "A", d, n, rotate=rotate, noise=0.1, device=on)
        gamma = preconditioner(kind, prompts, eta)
        maps.append(GradientAgent("A", gamma, prompts.second_moment, prompts.moment, steps))
    want, got = maps[0].affine(), maps[1].affine()
    assert isinstance(got.A, torch.Tensor) and isinstance(got.host().A, np.ndarray)
    w = np.random.default_rng(seed).standard_normal((20, d))
    answers = (maps[0].respond(w, Turn(0, 0, "B")), host(got(torch.from_numpy(w).to(got.A.device))))
    conditioning = 1.0
    if kind == "newton":
        S = sample_prompts(seeds, "A", d, n, rotate=rotate, noise=0.1).second_moment
        for values in np.linalg.eigvalsh(S):
            kept = values[values > 1e-12 * values.max()]
            conditioning = max(conditioning, kept.max() / kept.min())
    for a, b in ((want.A, got.host().A), (want.c, got.host().c), answers):
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 * scale * conditioning)
