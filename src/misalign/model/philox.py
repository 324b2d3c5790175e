"""Counter-based random numbers: every play's draws as a handful of array operations.

Every seeded number of a play (its prompts' rotations, targets, inputs and label noise, a
sampled agent's noise) is a pure function of ``(seed, agent, stream, draw)``: the Philox4x32-10
block cipher (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3";
the Random123 definition, checked against its known-answer vectors in ``philox_test``) keyed by
the play's seed, of the counter ``(block, stream, turn, crc32(agent))``. Nothing is carried from
one draw to the next, so a batch of plays evaluates the cipher over arrays, and a single play is
the batch of one: bit for bit the same numbers, by construction.

From each 128-bit block come two uniforms of 53 bits, ``u1 = (k1 + 1) 2^-53`` in ``(0, 1]``
and ``u2 = k2 2^-53`` in ``[0, 1)`` (``k1``: words 0 and 1, ``k2``: words 2 and 3, high word
second, top 53 bits), and from them two standard normals by the Box-Muller transform,
``sqrt(-2 ln u1) cos(2 pi u2)`` then ``sqrt(-2 ln u1) sin(2 pi u2)``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from misalign.runtime.device import is_numpy, namespace

GENERATOR = "philox4x32-10/box-muller"
"""The generator's name, written into every run (``config_hash`` covers it through the
configuration; ``run.json`` names it under ``generator``)."""

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
"""Philox4x32's multipliers (Random123 ``PHILOX_M4x32_0``, ``_1``)."""
W0, W1 = 0x9E3779B9, 0xBB67AE85
"""Philox4x32's key increments (Random123 ``PHILOX_W32_0``, ``_1``)."""
ROUNDS = 10
MASK = np.uint64(0xFFFFFFFF)
SHIFT = np.uint64(32)
BLOCK = 1 << 14
"""Blocks enciphered together: arrays that stay in cache."""

ROTATION, TARGET, INPUTS, NOISE, SAMPLING = range(5)
"""The streams of an agent: a prompt's rotation, target, inputs and label noise, and a sampled
agent's answer noise (one per turn)."""


def philox(counter: Sequence, key: Sequence) -> tuple:
    """Philox4x32-10 of counters under keys, elementwise (the Random123 definition).

    Args:
        counter: four 32-bit words, arrays (numpy ``uint64`` or torch ``int64``, values below
            ``2^32``) or integers, broadcast against each other and the key.
        key: two 32-bit words, likewise (at least one array among counter and key gives
            the kind of the result).

    Returns:
        The four output words, arrays of values below ``2^32`` (``uint64`` for numpy; for
        torch ``int64``, whose products wrap modulo ``2^64`` like ``uint64``'s, the high
        word taken back from the sign by a mask).
    """
    tensors = [x for x in (*counter, *key) if not (isinstance(x, int) or is_numpy(x))]
    if not tensors:
        c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
        k0, k1 = (int(k) if np.ndim(k) == 0 else np.asarray(k, dtype=np.uint64) for k in key)
        m0, m1, mask, shift, signed = M0, M1, MASK, SHIFT, False
    else:
        c0, c1, c2, c3 = (_tensor(c, tensors[0]) for c in counter)
        k0, k1 = (_tensor(k, tensors[0]) for k in key)
        m0, m1, mask, shift, signed = int(M0), int(M1), int(MASK), int(SHIFT), True
    for r in range(ROUNDS):
        if r:
            k0, k1 = _bump(k0, W0), _bump(k1, W1)
        p0, p1 = c0 * m0, c2 * m1  # 32 x 32 bits: exact in 64 (modulo 2^64 for int64)
        h0, h1 = p0 >> shift, p1 >> shift
        if signed:
            h0, h1 = h0 & mask, h1 & mask
        c0, c1, c2, c3 = (
            h1 ^ c1 ^ _word(k0),
            p1 & mask,
            h0 ^ c3 ^ _word(k1),
            p0 & mask,
        )
    return c0, c1, c2, c3


def _tensor(value, like):
    """A counter or key word as an ``int64`` tensor on ``like``'s device."""
    import torch

    return torch.as_tensor(value, dtype=torch.int64, device=like.device)


def _bump(k, w: int):
    """A key word plus its increment, modulo ``2^32``."""
    if isinstance(k, int):
        return (k + w) & 0xFFFFFFFF
    if is_numpy(k):
        return (k + np.uint64(w)) & MASK
    return (k + w) & int(MASK)


def _word(k):
    return np.uint64(k) if isinstance(k, int) else k


def as_seeds(seeds: Sequence[int] | np.ndarray) -> np.ndarray:
    """Play seeds as a ``uint64`` array.

    Args:
        seeds: non-negative integers below ``2^64``.

    Returns:
        The seeds, ``(B,)``.

    Raises:
        ValueError: a seed outside ``[0, 2^64)``.
    """
    if isinstance(seeds, range) and seeds.step == 1 and seeds.start >= 0 and seeds.stop <= 2**63:
        return np.arange(seeds.start, max(seeds.start, seeds.stop), dtype=np.int64).astype(
            np.uint64
        )
    if isinstance(seeds, np.ndarray) and seeds.dtype == np.uint64:
        return seeds.reshape(-1)
    if isinstance(seeds, np.ndarray) and seeds.dtype.kind == "i" and (seeds >= 0).all():
        return seeds.astype(np.uint64).reshape(-1)
    values = [int(s) for s in (np.ravel(seeds) if isinstance(seeds, np.ndarray) else seeds)]
    if any(not 0 <= s < 2**64 for s in values):
        raise ValueError("a seed must lie in [0, 2^64)")
    return np.array(values, dtype=np.uint64)


def seed_key(seeds: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Philox keys of play seeds (``as_seeds``): the low and high 32-bit words of each,
    ``uint64`` arrays of shape ``(B,)``."""
    seeds = as_seeds(seeds)
    return seeds & MASK, seeds >> SHIFT


def name_word(name: str) -> int:
    """An agent's counter word: ``crc32`` of its name."""
    return zlib.crc32(name.encode())


def normals(
    seeds: Sequence[int] | np.ndarray,
    name: str,
    stream: int,
    shape: tuple[int, ...],
    turn: int = 0,
    device=None,
):
    """Standard normals of every play: ``(B, *shape)``, row ``i`` a function of ``seeds[i]``
    alone (so any batch holding seed ``s`` gives its row bit for bit).

    Args:
        seeds: the plays' seeds, ``(B,)``.
        name: the agent drawing.
        stream: what is drawn (``ROTATION``, ``TARGET``, ``INPUTS``, ``NOISE``, ``SAMPLING``).
        shape: the draws of one play, filled in C order.
        turn: the turn of a per-turn stream (0 otherwise).
        device: a ``torch.device`` to draw on (the same words; the logarithm, square root,
            cosine and sine are torch's, within an ulp or so of numpy's); ``None``: numpy.

    Returns:
        The normals, float64.
    """
    low, high = seed_key(seeds)
    size = int(np.prod(shape, dtype=np.int64))
    blocks = (size + 1) // 2
    counter = np.arange(blocks, dtype=np.uint64)[None, :]
    step = max(1, BLOCK // max(blocks, 1))  # rows whose arrays stay in cache
    if device is None:
        out = np.empty((len(low), 2 * blocks))
    else:
        import torch

        out = torch.empty((len(low), 2 * blocks), dtype=torch.float64, device=device)
        low, high, counter = (
            torch.as_tensor(x.astype(np.int64), device=device) for x in (low, high, counter)
        )
        if device.type != "cpu":
            step = max(1, len(low))  # one pass: a GPU wants the whole batch
    xp = namespace(out)
    crc = name_word(name)
    for start in range(0, len(low), step):
        rows = slice(start, start + step)
        key = (low[rows, None], high[rows, None])
        x0, x1, x2, x3 = philox((counter, stream, turn, crc), key)
        # the top 53 bits of (high word << 32 | low word), without leaving 63 bits
        u1 = _float((x1 << 21) | (x0 >> 11))
        u1 += 1.0
        u1 *= 2.0**-53
        u2 = _float((x3 << 21) | (x2 >> 11))
        u2 *= 2.0**-53 * 2 * np.pi
        radius = xp.log(u1)
        radius *= -2.0
        xp.sqrt(radius, out=radius)
        block = out[rows]
        xp.multiply(radius, xp.cos(u2), out=block[:, 0::2])
        xp.multiply(radius, xp.sin(u2), out=block[:, 1::2])
    return out[:, :size].reshape(len(low), *shape)


def _float(words):
    """Integers below ``2^53`` as float64 (exact)."""
    if is_numpy(words):
        return words.astype(np.float64)
    import torch

    return words.to(torch.float64)
