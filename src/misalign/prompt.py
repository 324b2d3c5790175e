"""In-context regression prompts: sampling and geometry.

An agent's prompt is ``P = (X, y)`` with ``X`` of shape ``(n, d)``, rows
``x_j ~ N(0, Lambda)`` and labels ``y = X w* + noise * N(0, 1)``
(docs/theory.md §1). ``Lambda = R diag(spectrum) R^T`` with ``R`` the identity
or, when ``rotate`` is set, a Haar-random rotation.

Every draw comes from the ``numpy.random.Generator`` passed in: no global
state, so the same generator state gives the same prompt bit for bit.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prompt:
    """One agent's in-context regression prompt.

    Attributes:
        X: inputs, shape ``(n, d)``.
        y: labels, shape ``(n,)``.
        target: the agent's objective ``w*``, shape ``(d,)``.
        covariance: the population covariance ``Lambda`` the rows were drawn from.
    """

    X: np.ndarray
    y: np.ndarray
    target: np.ndarray
    covariance: np.ndarray

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def d(self) -> int:
        return self.X.shape[1]

    @property
    def second_moment(self) -> np.ndarray:
        """``S = X^T X / n`` (docs/theory.md §1)."""
        return self.X.T @ self.X / self.n

    @property
    def moment(self) -> np.ndarray:
        """``X^T y / n``, so that ``b = Gamma X^T y / n``."""
        return self.X.T @ self.y / self.n

    def least_squares(self) -> np.ndarray:
        """The prompt's own solution ``pinv(X) y``: ``w*`` when the labels are noise-free
        and ``n >= d`` (docs/theory.md §2, noisy labels)."""
        return np.linalg.pinv(self.X) @ self.y


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
    spectrum = np.ones(d) if spectrum is None else np.asarray(spectrum, dtype=float)
    rotation = haar_rotation(_child(rng, ROTATION), d) if rotate else np.eye(d)
    if target is None:
        target = _child(rng, TARGET).standard_normal(d)
    target = np.asarray(target, dtype=float)
    X = _child(rng, INPUTS).standard_normal((n, d)) * np.sqrt(spectrum) @ rotation.T
    y = X @ target
    if noise > 0:
        y += noise * _child(rng, NOISE).standard_normal(n)
    covariance = (rotation * spectrum) @ rotation.T
    return Prompt(X=X, y=y, target=target, covariance=covariance)


ROTATION, TARGET, INPUTS, NOISE = range(4)
"""The child streams of an agent's generator, in the order of ``Generator.spawn(4)``."""


def _child(rng: np.random.Generator, k: int) -> np.random.Generator:
    """``rng.spawn(4)[k]``, built alone: the same stream, without the cost of the children a
    prompt does not draw from (a batch of 10^5 plays builds 10^5 prompts per agent)."""
    seeds = rng.bit_generator.seed_seq
    child = np.random.SeedSequence(
        seeds.entropy,
        spawn_key=(*seeds.spawn_key, seeds.n_children_spawned + k),
        pool_size=seeds.pool_size,
    )
    return np.random.Generator(type(rng.bit_generator)(child))


def haar_rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    """A Haar-random rotation in ``SO(d)``: QR of a Gaussian matrix with the signs of
    ``diag(R)`` moved into ``Q`` (Mezzadri 2007, "How to generate random matrices from the
    classical compact groups"), then one column flipped when ``det = -1``. Same law as
    ``scipy.stats.special_ortho_group``, without the half-second import of ``scipy.stats``.
    """
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
