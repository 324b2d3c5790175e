"""Tests for misalign.model.prompt."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.model import philox
from misalign.model.prompt import haar_rotation, sample_prompt, sample_prompts
from misalign.runtime.device import host
from misalign.runtime.device_test import torch_device


def _sample(seed=0, name="A", **kw):
    kw = {"d": 4, "n": 10} | kw
    return sample_prompt(seed, name, **kw)


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


# Batched sampling: every play of a batch draws the counter-based numbers of its own seed
# (misalign.model.philox), so a batch is each seed alone bit for bit; checked against a
# per-play sampler written from the definition, one play at a time.

SEEDS = [0, 1, 7, 2**31, 2**32 - 1, 2**32, 2**40 + 3, 2**63, 2**64 - 1]


def _former(seed, name, d, n, spectrum=None, rotate=False, target=None, noise=0.0):
    """One play's prompt from its definition: the streams of ``philox.normals`` for rotation,
    target, inputs and noise, the rotation by QR with the signs of ``diag(R)`` moved into
    ``Q``, one play at a time."""

    def draw(stream, shape):
        return philox.normals([seed], name, stream, shape)[0]

    spectrum = np.ones(d) if spectrum is None else np.asarray(spectrum, dtype=float)
    R = np.eye(d)
    if rotate:
        q, r = np.linalg.qr(draw(philox.ROTATION, (d, d)))
        R = q * np.sign(np.diag(r))
        if np.linalg.det(R) < 0:
            R[:, 0] = -R[:, 0]
    target = draw(philox.TARGET, (d,)) if target is None else np.asarray(target, dtype=float)
    X = draw(philox.INPUTS, (n, d)) * np.sqrt(spectrum) @ R.T
    y = X @ target
    if noise > 0:
        y += noise * draw(philox.NOISE, (n,))
    return X, y, target, (R * spectrum) @ R.T


SETTINGS = {
    "d": st.integers(1, 12),
    "n": st.integers(1, 30),
    "rotate": st.booleans(),
    "noise": st.sampled_from([0.0, 0.3]),
    "given_target": st.booleans(),
    "skewed": st.booleans(),
}
"""A prompt's settings, drawn by the property tests below."""


def _settings(d, n, rotate, noise, given_target, skewed):
    """``sample_prompts``' keywords for drawn settings (a spectrum and a target of their own,
    seeded by ``d`` and ``n``)."""
    rng = np.random.default_rng(d * 100 + n)
    return {
        "spectrum": rng.uniform(0.2, 3.0, d) if skewed else None,
        "rotate": rotate,
        "target": rng.standard_normal(d) if given_target else None,
        "noise": noise,
    }


@settings(max_examples=40, deadline=None)
@given(
    **SETTINGS,
    name=st.sampled_from(["A", "B", "helper"]),
    seeds=st.lists(
        st.one_of(st.integers(0, 2**32), st.integers(0, 2**64 - 1), st.sampled_from(SEEDS)),
        min_size=1,
        max_size=12,
    ),
)
def test_a_batch_of_prompts_is_each_seed_alone_bit_for_bit(
    d, n, rotate, noise, given_target, skewed, name, seeds
):
    """``sample_prompts`` over seeds, ``sample_prompt`` of each seed and the per-play sampler
    agree exactly on ``X``, ``y``, the target and the covariance (and so the moments)."""
    kw = _settings(d, n, rotate, noise, given_target, skewed)
    batch = sample_prompts(seeds, name, d, n, **kw)
    for i, (seed, played) in enumerate(zip(seeds, batch.plays(), strict=True)):
        alone = sample_prompt(seed, name, d, n, **kw)
        former = _former(seed, name, d, n, **kw)
        for p in (played, alone):
            for key, value in zip(("X", "y", "target", "covariance"), former, strict=True):
                assert np.array_equal(getattr(p, key), value), key
            assert np.array_equal(p.second_moment, former[0].T @ former[0] / n)
            assert np.array_equal(p.moment, former[0].T @ former[1] / n)
        assert np.array_equal(batch.second_moment[i], alone.second_moment)
        assert np.array_equal(batch.moment[i], alone.moment)


def test_plays_of_a_batch_may_differ_in_every_setting_but_shape():
    """Per-play spectra, targets and noise levels: each play is its own single draw."""
    rng = np.random.default_rng(3)
    seeds, d, n = [4, 2**33, 9], 3, 5
    spectrum, target = rng.uniform(0.5, 2, (3, d)), rng.standard_normal((3, d))
    noise = np.array([0.0, 0.2, 0.5])
    batch = sample_prompts(seeds, "A", d, n, spectrum, True, target, noise)
    for i, p in enumerate(batch.plays()):
        former = _former(seeds[i], "A", d, n, spectrum[i], True, target[i], noise[i])
        for key, value in zip(("X", "y", "target", "covariance"), former, strict=True):
            assert np.array_equal(getattr(p, key), value), key
        assert np.array_equal(p.least_squares(), np.linalg.pinv(former[0]) @ former[1])
        assert np.array_equal(batch.least_squares()[i], p.least_squares())


def test_seeds_outside_64_bits_are_refused():
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=r"\[0, 2\^64\)"):
            sample_prompt(seed, "A", 2, 3)


def test_haar_rotation_is_the_former_one():
    for d in (1, 2, 5, 10):
        for seed in range(20):
            q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
            R = q * np.sign(np.diag(r))
            if np.linalg.det(R) < 0:
                R[:, 0] = -R[:, 0]
            assert np.array_equal(haar_rotation(np.random.default_rng(seed), d), R)


@settings(max_examples=25, deadline=None)
@given(**SETTINGS, first=st.integers(0, 2**64 - 40))
def test_prompts_on_torch_are_numpys_within_rounding(
    d, n, rotate, noise, given_target, skewed, first
):
    """``sample_prompts(..., device=cpu)`` (torch) against numpy: every array of 30 plays,
    some noisy and some not, within ``1e-12`` of its scale."""
    torch = pytest.importorskip("torch")
    kw = _settings(d, n, rotate, np.where(np.arange(30) % 3 == 0, noise, 0.0), given_target, skewed)
    seeds = range(first, first + 30)
    on = sample_prompts(seeds, "A", d, n, device=torch_device(), **kw)
    expected = sample_prompts(seeds, "A", d, n, **kw)
    for key in ("X", "y", "target", "covariance", "second_moment", "moment"):
        got, want = getattr(on, key), getattr(expected, key)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float64, key
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(host(got), want, rtol=0, atol=1e-12 * scale, err_msg=key)
