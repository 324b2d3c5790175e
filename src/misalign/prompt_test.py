"""Tests for misalign.prompt."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.prompt import agent_rng, haar_rotation, sample_prompt


def _sample(seed=0, name="A", **kw):
    kw = {"d": 4, "n": 10} | kw
    return sample_prompt(agent_rng(seed, name), **kw)


def test_same_seed_same_prompt_bit_for_bit():
    a = _sample(seed=5, rotate=True, noise=0.3, spectrum=[1, 2, 3, 4])
    b = _sample(seed=5, rotate=True, noise=0.3, spectrum=[1, 2, 3, 4])
    assert a.X.tobytes() == b.X.tobytes() and a.y.tobytes() == b.y.tobytes()
    assert a.target.tobytes() == b.target.tobytes()


def test_agents_have_separate_streams():
    assert not np.array_equal(_sample(name="A").X, _sample(name="B").X)
    assert not np.array_equal(_sample(seed=1).X, _sample(seed=2).X)


def test_each_switch_changes_only_what_it_governs():
    base = _sample(seed=3)
    assert np.array_equal(base.X, _sample(seed=3, target=[1.0, 0, 0, 0]).X)
    noisy = _sample(seed=3, noise=0.5)
    assert np.array_equal(base.X, noisy.X) and not np.array_equal(base.y, noisy.y)


def test_noise_free_labels_are_linear_in_target():
    p = _sample(target=[1.0, -2.0, 0.5, 3.0])
    np.testing.assert_allclose(p.y, p.X @ p.target)
    np.testing.assert_allclose(p.least_squares(), p.target, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 5), seed=st.integers(0, 10**6), rotate=st.booleans())
def test_inputs_follow_the_covariance(d, seed, rotate):
    """Monte Carlo: X^T X / n -> Lambda = R diag(spectrum) R^T."""
    spectrum = np.random.default_rng(seed).uniform(0.2, 3.0, d)
    p = _sample(seed=seed, d=d, n=40000, spectrum=spectrum, rotate=rotate)
    np.testing.assert_allclose(np.linalg.eigvalsh(p.covariance), np.sort(spectrum), rtol=1e-10)
    scale = np.sqrt(np.outer(np.diag(p.covariance), np.diag(p.covariance)))
    assert np.abs(p.second_moment - p.covariance).max() < 6 * scale.max() / np.sqrt(40000)


@pytest.mark.parametrize("n,d", [(3, 6), (10, 2)])
def test_moments_match_definitions(n, d):
    p = _sample(n=n, d=d, noise=0.1)
    np.testing.assert_allclose(p.second_moment, p.X.T @ p.X / n)
    np.testing.assert_allclose(p.moment, p.X.T @ p.y / n)
    np.testing.assert_allclose(p.least_squares(), np.linalg.lstsq(p.X, p.y, rcond=None)[0])


@pytest.mark.parametrize("d", [2, 3, 5])
def test_haar_rotation_is_a_uniform_rotation(d):
    """Orthogonal, det +1, and Monte Carlo moments of the Haar law: E R = 0, E R_ij^2 = 1/d."""
    rng = np.random.default_rng(d)
    R = np.stack([haar_rotation(rng, d) for _ in range(20000)])
    np.testing.assert_allclose(
        R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(d), R.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    assert np.abs(R.mean(axis=0)).max() < 0.03
    np.testing.assert_allclose((R**2).mean(axis=0), 1 / d, atol=0.02)
