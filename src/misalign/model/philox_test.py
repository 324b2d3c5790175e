"""Tests for misalign.model.philox: the cipher against Random123's known answers and a scalar
reference, the normals against their definition, batches against single seeds bit for bit."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.model import philox
from misalign.runtime.device import host
from misalign.runtime.device_test import torch_device

# Random123 v1.14.0, tests/kat_vectors, the "philox4x32 10" lines: counter, key, output.
KAT = [
    ("00000000 00000000 00000000 00000000", "00000000 00000000",
     "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff",
     "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0",
     "d16cfe09 94fdcceb 5001e420 24126ea1"),
]  # fmt: skip


def _words(text):
    return [int(word, 16) for word in text.split()]


def _reference(counter, key):
    """Philox4x32-10 on Python integers, one block, as Random123's philox.h writes it."""
    c, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
    return c


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers(counter, key, expected):
    assert _reference(_words(counter), _words(key)) == _words(expected)
    scalar = philox.philox(_words(counter), _words(key))
    assert [int(w) for w in scalar] == _words(expected)
    arrays = philox.philox(
        [np.full(3, w, np.uint64) for w in _words(counter)],
        [np.full(3, w, np.uint64) for w in _words(key)],
    )
    assert [[int(x) for x in w] for w in arrays] == [[w] * 3 for w in _words(expected)]


@settings(max_examples=200, deadline=None)
@given(
    counter=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4),
    key=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=2),
)
def test_arrays_agree_with_the_scalar_reference(counter, key):
    out = philox.philox(
        [np.array([c], np.uint64) for c in counter], [np.array([k], np.uint64) for k in key]
    )
    assert [int(w[0]) for w in out] == _reference(counter, key)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    name=st.sampled_from(["A", "B", "a long agent name"]),
    stream=st.integers(0, 4),
    turn=st.integers(0, 2**32 - 1),
    size=st.integers(1, 9),
)
def test_normals_follow_their_definition(seed, name, stream, turn, size):
    """Block ``j`` of the counter ``(j, stream, turn, crc32(name))`` under the seed's words
    gives normals ``2 j`` and ``2 j + 1`` by Box-Muller on its two 53-bit uniforms."""
    drawn = philox.normals([seed], name, stream, (size,), turn=turn)[0]
    key = (seed & 0xFFFFFFFF, seed >> 32)
    expected = []
    for j in range((size + 1) // 2):
        w = _reference([j, stream, turn, philox.name_word(name)], key)
        u1 = (((w[1] << 32 | w[0]) >> 11) + 1) * 2.0**-53
        angle = ((w[3] << 32 | w[2]) >> 11) * (2.0**-53 * 2 * math.pi)
        radius = math.sqrt(-2 * math.log(u1))
        expected += [radius * math.cos(angle), radius * math.sin(angle)]
    # libm and numpy's vectorised log, cos and sin may differ in the last bit
    np.testing.assert_allclose(drawn, expected[:size], rtol=1e-14, atol=1e-15)


def test_a_batch_is_each_seed_alone_bit_for_bit():
    """Any batch holding a seed gives its normals exactly: sizes that take the vectorised
    loops' tails and several cache-sized chunks."""
    rng = np.random.default_rng(0)
    known = np.array([0, 1, 2**32, 2**64 - 1], np.uint64)
    seeds = np.concatenate([known, rng.integers(0, 2**63, 40_000).astype(np.uint64)])
    for shape in [(1,), (3,), (12, 4), (33,)]:
        batch = philox.normals(seeds, "A", philox.INPUTS, shape, turn=5)
        for i in [*range(6), *rng.integers(0, len(seeds), 30)]:
            alone = philox.normals([int(seeds[i])], "A", philox.INPUTS, shape, turn=5)[0]
            assert np.array_equal(batch[i], alone)
            pair = philox.normals([int(seeds[i]), 7], "A", philox.INPUTS, shape, turn=5)[0]
            assert np.array_equal(pair, alone)


def test_normals_are_standard_and_independent_across_streams():
    """Monte Carlo over 10^6 draws: mean 0, variance 1, fourth moment 3, no correlation
    between neighbours, streams, turns, agents or seeds."""
    seeds = np.arange(50_000)
    z = philox.normals(seeds, "A", philox.INPUTS, (20,))
    se = 1 / np.sqrt(z.size)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * np.sqrt(2) * se
    assert abs((z**4).mean() - 3) < 5 * np.sqrt(96) * se
    assert abs((z[:, 1:] * z[:, :-1]).mean()) < 5 * se
    others = [
        philox.normals(seeds, "A", philox.TARGET, (20,)),
        philox.normals(seeds, "A", philox.INPUTS, (20,), turn=1),
        philox.normals(seeds, "B", philox.INPUTS, (20,)),
        philox.normals(seeds + 1, "A", philox.INPUTS, (20,)),
    ]
    for other in others:
        assert abs((z * other).mean()) < 5 * se
    # the tails: P(|z| > 3) against the normal law's 0.0027
    tail = (np.abs(z) > 3).mean()
    assert abs(tail - math.erfc(3 / math.sqrt(2))) < 5 * np.sqrt(0.0027 / z.size)


def test_seeds_outside_64_bits_are_refused():
    for seeds in ([-1], [2**64], np.array([-3])):
        with pytest.raises(ValueError, match=r"\[0, 2\^64\)"):
            philox.normals(seeds, "A", 0, (2,))


def test_seeds_of_any_form_are_the_same_numbers():
    expected = np.array([5, 6, 7], dtype=np.uint64)
    for seeds in (range(5, 8), [5, 6, 7], np.array([5, 6, 7]), expected, (5, 6, 7)):
        assert np.array_equal(philox.as_seeds(seeds), expected)
    assert len(philox.as_seeds(range(4, 2))) == 0
    big = philox.as_seeds(range(2**64 - 2, 2**64))
    assert big.dtype == np.uint64 and list(big) == [2**64 - 2, 2**64 - 1]


@settings(max_examples=100, deadline=None)
@given(
    counter=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4),
    key=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=2),
)
def test_torch_words_are_the_reference_bit_for_bit(counter, key):
    """On torch (``int64``, products wrapping modulo ``2^64``) the cipher is the same."""
    torch = pytest.importorskip("torch")
    on = torch_device()
    out = philox.philox(
        [torch.tensor([c], device=on) for c in counter], [torch.tensor([k], device=on) for k in key]
    )
    assert all(w.dtype == torch.int64 for w in out)
    assert [int(w[0]) for w in out] == _reference(counter, key)


@settings(max_examples=30, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20),
    name=st.sampled_from(["A", "B", "a long agent name"]),
    stream=st.integers(0, 4),
    turn=st.integers(0, 2**32 - 1),
    shape=st.sampled_from([(1,), (5,), (3, 4), (20, 10)]),
)
def test_normals_on_torch_are_numpys_within_rounding(seeds, name, stream, turn, shape):
    """The same uniforms; torch's log, sqrt, cos and sin against numpy's: an ulp or two."""
    torch = pytest.importorskip("torch")
    drawn = philox.normals(seeds, name, stream, shape, turn=turn, device=torch_device())
    assert drawn.dtype == torch.float64 and drawn.shape == (len(seeds), *shape)
    expected = philox.normals(seeds, name, stream, shape, turn=turn)
    np.testing.assert_allclose(host(drawn), expected, rtol=1e-14, atol=1e-15)
