"""Tests for misalign.agents.lsa: the model against an independent numpy transformer, the GD sign
convention for L layers, and the two readings of Gamma."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.agents.lsa import (
    LSA,
    LSAAgent,
    gamma_by_probing,
    gamma_from_weights,
    label_coupling,
)
from misalign.model.agent import Turn, fit_affine
from misalign.model.prompt import sample_prompt


def _numpy_lsa(pv_list, kq_list, X, y, xq):
    """Z <- Z + W_PV Z M Z^T W_KQ Z / n, tokens as columns; prediction -Z[d, n]."""
    n, d = X.shape
    Z = np.zeros((d + 1, n + 1))
    Z[:d, :n], Z[d, :n], Z[:d, n] = X.T, y, xq
    M = np.diag([1.0] * n + [0.0])
    for pv, kq in zip(pv_list, kq_list, strict=True):
        Z = Z + pv @ Z @ M @ Z.T @ kq @ Z / n
    return -Z[d, n]


def _random_model(d, layers, coupled, seed):
    model = LSA(
        d, layers, init_scale=0.5, generator=torch.Generator().manual_seed(seed), coupled=coupled
    )
    if coupled:  # fill the label-coupling blocks too
        g = torch.Generator().manual_seed(seed + 1)
        for p in [*model.pv, *model.kq]:
            p.data = 0.5 * torch.randn(d + 1, d + 1, generator=g)
    return model.double()


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    d=st.integers(1, 4),
    layers=st.integers(1, 3),
    coupled=st.booleans(),
)
def test_forward_matches_an_independent_implementation(seed, d, layers, coupled):
    model = _random_model(d, layers, coupled, seed)
    rng = np.random.default_rng(seed)
    n, q = 6, 3
    X, y, Q = (
        rng.standard_normal((2, n, d)),
        rng.standard_normal((2, n)),
        rng.standard_normal((2, q, d)),
    )
    out = model(torch.as_tensor(X), torch.as_tensor(y), torch.as_tensor(Q)).detach().numpy()
    pv = [(p * model.mask_pv).detach().numpy() for p in model.pv]
    kq = [(p * model.mask_kq).detach().numpy() for p in model.kq]
    for b in range(2):
        for j in range(q):
            np.testing.assert_allclose(
                out[b, j], _numpy_lsa(pv, kq, X[b], y[b], Q[b, j]), rtol=1e-10, atol=1e-10
            )


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_l_layers_with_value_minus_one_are_l_gradient_steps(layers):
    """von Oswald et al.'s convention: v = -1 and K = eta_l I in layer l give x_q^T w_L,
    w_{l+1} = w_l - eta_l X^T (X w_l - y) / n from w_0 = 0."""
    d, n = 3, 8
    model = LSA(d, layers).double()
    etas = [0.3, 0.5, 0.2][:layers]
    for pv, kq, eta in zip(model.pv, model.kq, etas, strict=True):
        pv.data.zero_()
        kq.data.zero_()
        pv.data[d, d] = -1.0
        kq.data[:d, :d] = eta * torch.eye(d, dtype=torch.float64)
    rng = np.random.default_rng(layers)
    X, y, xq = rng.standard_normal((n, d)), rng.standard_normal(n), rng.standard_normal(d)
    w = np.zeros(d)
    for eta in etas:
        w = w - eta * X.T @ (X @ w - y) / n
    pred = model(
        torch.as_tensor(X[None]), torch.as_tensor(y[None]), torch.as_tensor(xq[None, None])
    )
    assert pred.item() == pytest.approx(xq @ w, rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), d=st.integers(1, 5))
def test_gamma_from_weights_equals_gamma_by_probing(seed, d):
    """A non-symmetric, untrained Gamma: the weights and the basis-query probes agree."""
    model = _random_model(d, 1, False, seed)
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((3 * d, 7, d)), rng.standard_normal((3 * d, 7))
    np.testing.assert_allclose(gamma_by_probing(model, X, y), gamma_from_weights(model), atol=1e-10)
    assert label_coupling(model) == 0.0


def test_label_coupling_breaks_the_weight_reading():
    model = _random_model(3, 1, True, 0)
    assert label_coupling(model) > 0.1
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 7, 3)), rng.standard_normal((20, 7))
    assert not np.allclose(gamma_by_probing(model, X, y), gamma_from_weights(model), atol=1e-3)


def test_lsa_agent_takes_the_step_and_reports_its_map():
    d = 3
    model = _random_model(d, 1, False, 5)
    prompts = [sample_prompt(s, "A", d=d, n=9, noise=0.1) for s in range(4)]
    agent = LSAAgent("A", model, prompts)
    gamma = gamma_from_weights(model)
    w = np.random.default_rng(1).standard_normal((4, d))
    out = agent.respond(w, Turn(0, 0, "B"))
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(
            out[b], w[b] + gamma @ p.X.T @ (p.y - p.X @ w[b]) / 9, atol=1e-12
        )
    fitted = fit_affine(agent, d, 4)
    np.testing.assert_allclose(fitted.A, agent.affine().A, atol=1e-10)
    np.testing.assert_allclose(fitted.c, agent.affine().c, atol=1e-10)


def test_lsa_agent_plays_on_one_thread_like_training():
    """Torch's default, a thread per core, made a play ~4x slower than one thread (16 cores)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        prompts = [sample_prompt(0, "A", d=2, n=5, noise=0.0)]
        LSAAgent("A", _random_model(2, 1, False, 0), prompts)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
