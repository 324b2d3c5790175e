"""In-context regression prompts: sampling and geometry.

An agent's prompt is ``P = (X, y)`` with ``X`` of shape ``(n, d)``, rows
``x_j ~ N(0, Lambda)`` and labels ``y = X w* + noise * N(0, 1)``
(docs/theory.md §1). ``Lambda = R diag(spectrum) R^T`` with ``R`` the identity
or, when ``rotate`` is set, a Haar-random rotation.

Every draw comes from the ``numpy.random.Generator`` passed in: no global
state, so the same generator state gives the same prompt bit for bit.

A batch of prompts is sampled at once (``sample_prompts``): every play still draws from
its own streams, the streams of ``agent_rng(seed, name)``, so play ``i`` of a batch is bit
for bit the prompt of its seed alone; only the seeding of the streams (numpy's
``SeedSequence`` hash, here on whole arrays of seeds) and the arithmetic are batched.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.random.bit_generator import ISeedSequence, _coerce_to_uint32_array


@dataclass(frozen=True)
class Prompt:
    """One agent's in-context regression prompt, or a batch of prompts of one shape (every
    array then carries a leading batch axis, as ``sample_prompts`` returns them).

    Attributes:
        X: inputs, shape ``(n, d)`` (a batch: ``(B, n, d)``, and so on).
        y: labels, shape ``(n,)``.
        target: the agent's objective ``w*``, shape ``(d,)``.
        covariance: the population covariance ``Lambda`` the rows were drawn from, ``(d, d)``.
    """

    X: np.ndarray
    y: np.ndarray
    target: np.ndarray
    covariance: np.ndarray

    @property
    def n(self) -> int:
        return self.X.shape[-2]

    @property
    def d(self) -> int:
        return self.X.shape[-1]

    @property
    def second_moment(self) -> np.ndarray:
        """``S = X^T X / n`` (docs/theory.md §1)."""
        return np.swapaxes(self.X, -1, -2) @ self.X / self.n

    @property
    def moment(self) -> np.ndarray:
        """``X^T y / n``, so that ``b = Gamma X^T y / n``."""
        return (np.swapaxes(self.X, -1, -2) @ self.y[..., None])[..., 0] / self.n

    def least_squares(self) -> np.ndarray:
        """The prompt's own solution ``pinv(X) y``: ``w*`` when the labels are noise-free
        and ``n >= d`` (docs/theory.md §2, noisy labels)."""
        return (np.linalg.pinv(self.X) @ self.y[..., None])[..., 0]

    def plays(self) -> list[Prompt]:
        """The prompts of a batch, one per play (views, no copy)."""
        return list(map(Prompt, self.X, self.y, self.target, self.covariance))


def agent_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of one agent: independent of the other agents' names and order.

    Args:
        seed: the play's data seed.
        name: the agent's name.

    Returns:
        A generator seeded by ``(seed, crc32(name))``.
    """
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def sample_prompt(
    rng: np.random.Generator,
    d: int,
    n: int,
    spectrum: np.ndarray | None = None,
    rotate: bool = False,
    target: np.ndarray | None = None,
    noise: float = 0.0,
) -> Prompt:
    """Draw one prompt.

    Rotation, target, inputs and label noise come from four independent child
    streams of ``rng``, so each switch changes only what it governs (giving the
    target explicitly leaves ``X`` as it was).

    Args:
        rng: the agent's generator (see ``agent_rng``).
        d: dimension.
        n: number of in-context examples.
        spectrum: eigenvalues of ``Lambda``, length ``d``, all positive; default ones.
        rotate: rotate the eigenbasis by a Haar-random rotation.
        target: ``w*``; sampled from ``N(0, I)`` when ``None``.
        noise: standard deviation of the label noise.

    Returns:
        The prompt.
    """
    batch = sample_prompts(Streams.of(rng), d, n, spectrum, rotate, target, noise)
    return batch.plays()[0]


def sample_prompts(
    streams: Streams,
    d: int,
    n: int,
    spectrum: np.ndarray | None = None,
    rotate: bool = False,
    target: np.ndarray | None = None,
    noise: float | np.ndarray = 0.0,
) -> Prompt:
    """Draw the prompts of a batch of plays, each from its own streams (``sample_prompt``
    for each play, bit for bit).

    Args:
        streams: every play's generator (``agent_streams``, ``Streams.of``).
        d: dimension.
        n: number of in-context examples.
        spectrum: eigenvalues of ``Lambda``, ``(d,)`` or one row per play; default ones.
        rotate: rotate every play's eigenbasis by its own Haar-random rotation.
        target: ``w*``, ``(d,)`` or one row per play; each play samples its own when ``None``.
        noise: standard deviation of the label noise, one or one per play.

    Returns:
        The prompts, as one ``Prompt`` whose arrays carry a leading batch axis.
    """
    batch = streams.size
    spectrum = np.ones(d) if spectrum is None else np.asarray(spectrum, dtype=float)
    shared = spectrum.ndim == 1
    spectrum = np.broadcast_to(spectrum, (batch, d))
    noise = np.broadcast_to(np.asarray(noise, dtype=float), (batch,))
    noisy = np.flatnonzero(noise > 0)
    drawn = (rotate, target is None, True, len(noisy) > 0)
    child = streams.children([k for k, draws in enumerate(drawn) if draws])
    rotation = haar_rotations(streams.normals(child[ROTATION], (d, d))) if rotate else None
    if target is None:
        target = streams.normals(child[TARGET], (d,))
    target = np.asarray(target, dtype=float)
    if target.shape != (batch, d):
        target = np.array(np.broadcast_to(target, (batch, d)), order="C")
    X = streams.normals(child[INPUTS], (n, d))
    X *= np.sqrt(spectrum)[:, None, :]
    if rotation is not None:  # without, X @ I: the same numbers
        X = X @ rotation.transpose(0, 2, 1)
    y = (X @ target[..., None])[..., 0]
    if len(noisy):
        y[noisy] += noise[noisy, None] * streams.normals(child[NOISE], (n,), noisy)
    if rotation is None and shared and batch > 1:  # (I * spectrum) @ I^T: one for all plays
        covariance = np.broadcast_to(np.diag(spectrum[0]), (batch, d, d))
    elif rotation is None:
        covariance = np.zeros((batch, d, d))
        covariance[:, np.arange(d), np.arange(d)] = spectrum
    else:
        covariance = (rotation * spectrum[:, None, :]) @ rotation.transpose(0, 2, 1)
    return Prompt(X=X, y=y, target=target, covariance=covariance)


ROTATION, TARGET, INPUTS, NOISE = range(4)
"""The child streams of an agent's generator, in the order of ``Generator.spawn(4)``."""

FEW = 16
"""Child streams up to which numpy's ``SeedSequence``, one at a time, hashes faster than the
whole-array hash (about 0.17 ms a call, 10 us a stream): a single prompt, a small batch."""


def haar_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    """A Haar-random rotation in ``SO(d)`` (``haar_rotations`` of one ``d x d`` Gaussian
    matrix drawn from ``rng``)."""
    return haar_rotations(rng.standard_normal((1, d, d)))[0]


def haar_rotations(gaussian: np.ndarray) -> np.ndarray:
    """Haar-random rotations in ``SO(d)`` from Gaussian matrices ``(B, d, d)``: QR of each
    with the signs of ``diag(R)`` moved into ``Q`` (Mezzadri 2007, "How to generate random
    matrices from the classical compact groups"), then one column flipped where ``det = -1``.
    Same law as ``scipy.stats.special_ortho_group``, without the half-second import of
    ``scipy.stats``."""
    q, r = np.linalg.qr(gaussian)
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    flip = np.linalg.det(q) < 0
    q[flip, :, 0] = -q[flip, :, 0]
    return q


# numpy's SeedSequence (numpy/random/bit_generator.pyx, after M. O'Neill's seed_seq) on
# arrays: the entropy words of every play hashed at once, uint32 arithmetic wrapping.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _MASK32 = 0xCA01F9DD, 0x4973F715, 0xFFFFFFFF


def _int_words(value: int) -> list[int]:
    """A non-negative integer as uint32 words, lowest first (``0`` is one word)."""
    return [int(w) for w in _coerce_to_uint32_array(int(value))]


def _pools(words: np.ndarray, pool_size: int) -> np.ndarray:
    """``SeedSequence.mix_entropy``: the entropy pools of assembled entropies ``(B, L)``."""
    h = _INIT_A
    words = words.astype(np.uint32)

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal h
        value = value ^ np.uint32(h)
        h = (h * _MULT_A) & _MASK32
        value = value * np.uint32(h)
        return value ^ (value >> np.uint32(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
        return result ^ (result >> np.uint32(16))

    length = words.shape[1]
    zero = np.zeros(len(words), np.uint32)
    pool = [hashmix(words[:, i] if i < length else zero) for i in range(pool_size)]
    for src in range(pool_size):
        for dst in range(pool_size):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(pool_size, length):
        for dst in range(pool_size):
            pool[dst] = mix(pool[dst], hashmix(words[:, src]))
    return np.stack(pool, axis=1)


def _generate_state(pools: np.ndarray, n_words: int, dtype=np.uint32) -> np.ndarray:
    """``SeedSequence.generate_state`` of every pool ``(B, pool_size)``: ``(B, n_words)``."""
    wide = np.dtype(dtype) == np.uint64
    if not wide and np.dtype(dtype) != np.uint32:
        raise ValueError("only support uint32 or uint64")
    h, out = _INIT_B, []
    for i in range(2 * n_words if wide else n_words):
        value = pools[:, i % pools.shape[1]] ^ np.uint32(h)
        h = (h * _MULT_B) & _MASK32
        value = value * np.uint32(h)
        out.append(value ^ (value >> np.uint32(16)))
    state = np.stack(out, axis=1).reshape(len(pools), -1)
    if wide:  # little-endian pairs, whatever the machine's order
        state = state[:, 0::2].astype(np.uint64) | (state[:, 1::2].astype(np.uint64) << 32)
    return state


class _Seeded(ISeedSequence):
    """A child ``SeedSequence`` already hashed: its pool, and the state ``PCG64`` asks for."""

    __slots__ = ("pool", "words")

    def __init__(self, pool: np.ndarray, words: np.ndarray) -> None:
        self.pool, self.words = pool, words

    def generate_state(self, n_words, dtype=np.uint32):
        if n_words == 4 and (dtype is np.uint64 or np.dtype(dtype) == np.uint64):
            return self.words
        return _generate_state(self.pool[None], n_words, dtype)[0]


@dataclass(frozen=True)
class Streams:
    """The generators of a batch of plays, unbuilt: each play's ``SeedSequence`` entropy.

    Child stream ``k`` of play ``i`` is ``Generator.spawn(4)[k]`` of its generator (as
    ``SeedSequence.spawn`` builds it): its seed hashes the words ``stem[i]`` (the entropy,
    padded with zeros to the pool size, then the spawn key) followed by those of
    ``spawned[i] + k``; the hashing runs on the whole batch at once.

    Attributes:
        groups: ``(plays, stems)`` for the plays whose stems have one length, ``stems``
            ``(plays, length)`` uint32.
        spawned: per play, the children its generator had spawned already, ``(B,)``.
        pool_size: the seed sequences' pool size.
        bit_generator: the bit generator's class.
    """

    groups: tuple[tuple[np.ndarray, np.ndarray], ...]
    spawned: np.ndarray
    pool_size: int = 4
    bit_generator: type = np.random.PCG64

    @property
    def size(self) -> int:
        return len(self.spawned)

    @classmethod
    def of(cls, rng: np.random.Generator) -> Streams:
        """The streams of one generator seeded by a ``SeedSequence`` (a batch of one)."""
        seq = rng.bit_generator.seed_seq
        entropy = _coerce_to_uint32_array(seq.entropy)
        padded = np.zeros(max(seq.pool_size - len(entropy), 0), np.uint32)
        stem = np.concatenate([entropy, padded, _coerce_to_uint32_array(seq.spawn_key)])
        return cls(
            ((np.zeros(1, int), stem[None].astype(np.uint32)),),
            np.array([seq.n_children_spawned], dtype=object),
            seq.pool_size,
            type(rng.bit_generator),
        )

    def children(self, ks: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Child streams ``ks`` of every play, hashed in one pass: per ``k``, the entropy pools
        ``(B, pool_size)`` and the states ``PCG64`` seeds from, ``(B, 4)`` uint64."""
        pools = np.empty((len(ks), self.size, self.pool_size), np.uint32)
        states = np.empty((len(ks), self.size, 4), np.uint64)
        for plays, stems in self.groups:
            keys = self.spawned[plays][None, :] + np.array(ks)[:, None]
            if keys.size > FEW and keys.max() <= _MASK32:  # on arrays, each key one word
                words = np.empty((*keys.shape, stems.shape[1] + 1), np.uint32)
                words[..., :-1], words[..., -1] = stems, keys
                mixed = _pools(words.reshape(keys.size, -1), self.pool_size)
                pools[:, plays] = mixed.reshape(*keys.shape, -1)
                states[:, plays] = _generate_state(mixed, 4, np.uint64).reshape(*keys.shape, 4)
                continue
            for j, i in np.ndindex(keys.shape):  # numpy's own (a stem is padded already)
                key = (int(keys[j, i]),)
                seq = np.random.SeedSequence(stems[i], spawn_key=key, pool_size=self.pool_size)
                pools[j, plays[i]], states[j, plays[i]] = seq.pool, seq.generate_state(4, np.uint64)
        return {k: (pools[j], states[j]) for j, k in enumerate(ks)}

    def normals(
        self, child: tuple[np.ndarray, np.ndarray], shape: tuple[int, ...], plays=None
    ) -> np.ndarray:
        """Standard normals of shape ``shape`` from a child stream (``children``) of every
        play (of ``plays``), ``(plays, *shape)``."""
        pools, states = child if plays is None else (child[0][plays], child[1][plays])
        out = np.empty((len(pools), *shape))
        make, kind = np.random.Generator, self.bit_generator
        for pool, state, row in zip(pools, states, out, strict=True):
            make(kind(_Seeded(pool, state))).standard_normal(out=row)
        return out


def agent_streams(seeds: Sequence[int], name: str) -> Streams:
    """``agent_rng(seed, name)`` for every seed, unbuilt (``Streams``): the entropy
    ``[seed, crc32(name)]`` of each, as uint32 words padded to the pool size."""
    crc = zlib.crc32(name.encode())
    values = np.asarray(seeds)
    if values.dtype.kind in "iu" and (values >= 0).all():  # below 2^64: split on arrays
        values = values.astype(np.uint64)
        high = values >> np.uint64(32)
        wide = high > 0  # two words
        stems = np.zeros((len(values), 4), np.uint32)
        stems[:, 0] = values & np.uint64(_MASK32)
        stems[:, 1] = np.where(wide, high, crc)
        stems[:, 2] = np.where(wide, crc, 0)
        return Streams(((np.arange(len(values)), stems),), np.zeros(len(values), np.int64))
    # any integer (a negative one refused as SeedSequence refuses it)
    words = [_int_words(s) + [crc] for s in seeds]
    words = [w + [0] * (4 - len(w)) for w in words]
    lengths = np.array([len(w) for w in words])
    groups = []
    for length in np.unique(lengths):
        plays = np.flatnonzero(lengths == length)
        groups.append((plays, np.array([words[i] for i in plays], dtype=np.uint32)))
    return Streams(tuple(groups), np.zeros(len(words), np.int64))
