"""In-context regression prompts: sampling and geometry.

An agent's prompt is ``P = (X, y)`` with ``X`` of shape ``(n, d)``, rows
``x_j ~ N(0, Lambda)`` and labels ``y = X w* + noise * N(0, 1)``
(docs/theory.md §1). ``Lambda = R diag(spectrum) R^T`` with ``R`` the identity
or, when ``rotate`` is set, a Haar-random rotation.

Every draw is a counter-based random number of ``(seed, agent, stream)``
(``misalign.model.philox``): no state, so a batch of plays is sampled as a few array
operations and play ``i`` of a batch is bit for bit the prompt of its seed alone (a single
prompt is the batch of one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from misalign.model.philox import INPUTS, NOISE, ROTATION, TARGET, as_seeds, normals
from misalign.runtime.device import broadcast, namespace, on


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
        return self.X.swapaxes(-1, -2) @ self.X / self.n

    @property
    def moment(self) -> np.ndarray:
        """``X^T y / n``, so that ``b = Gamma X^T y / n``."""
        return (self.X.swapaxes(-1, -2) @ self.y[..., None])[..., 0] / self.n

    def least_squares(self) -> np.ndarray:
        """The prompt's own solution ``pinv(X) y``: ``w*`` when the labels are noise-free
        and ``n >= d`` (docs/theory.md §2, noisy labels)."""
        return (np.linalg.pinv(self.X) @ self.y[..., None])[..., 0]

    def plays(self) -> PlayPrompts:
        """The prompts of a batch, one per play (views, no copy, each made when read)."""
        return PlayPrompts(self)


class PlayPrompts(Sequence[Prompt]):
    """The prompts of a batch as a sequence with one prompt per play: play ``i`` is a view
    of row ``i`` of ``batch``'s arrays, made when it is read (a batch of 10^6 plays holds no
    10^6 objects).

    Attributes:
        batch: the prompts, as one ``Prompt`` with a leading batch axis.
    """

    def __init__(self, batch: Prompt) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return self.batch.X.shape[0]

    def __getitem__(self, play):
        if isinstance(play, slice):
            return [self[i] for i in range(*play.indices(len(self)))]
        b = self.batch
        return Prompt(b.X[play], b.y[play], b.target[play], b.covariance[play])


def sample_prompt(
    seed: int,
    name: str,
    d: int,
    n: int,
    spectrum: np.ndarray | None = None,
    rotate: bool = False,
    target: np.ndarray | None = None,
    noise: float = 0.0,
) -> Prompt:
    """Draw one prompt: ``sample_prompts`` of the batch of one.

    Rotation, target, inputs and label noise are four streams of ``(seed, name)``, so each
    switch changes only what it governs (giving the target explicitly leaves ``X`` as it was).

    Args:
        seed: the play's data seed.
        name: the agent's name (agents draw independent numbers under one seed).
        d: dimension.
        n: number of in-context examples.
        spectrum: eigenvalues of ``Lambda``, length ``d``, all positive; default ones.
        rotate: rotate the eigenbasis by a Haar-random rotation.
        target: ``w*``; sampled from ``N(0, I)`` when ``None``.
        noise: standard deviation of the label noise.

    Returns:
        The prompt.
    """
    batch = sample_prompts([seed], name, d, n, spectrum, rotate, target, noise)
    return batch.plays()[0]


def sample_prompts(
    seeds: Sequence[int] | np.ndarray,
    name: str,
    d: int,
    n: int,
    spectrum: np.ndarray | None = None,
    rotate: bool = False,
    target: np.ndarray | None = None,
    noise: float | np.ndarray = 0.0,
    device=None,
) -> Prompt:
    """Draw the prompts of a batch of plays, each from its own seed's numbers
    (``sample_prompt`` for each play, bit for bit).

    Args:
        seeds: the plays' data seeds, ``(B,)``.
        name: the agent's name.
        d: dimension.
        n: number of in-context examples.
        spectrum: eigenvalues of ``Lambda``, ``(d,)`` or one row per play; default ones.
        rotate: rotate every play's eigenbasis by its own Haar-random rotation.
        target: ``w*``, ``(d,)`` or one row per play; each play samples its own when ``None``.
        noise: standard deviation of the label noise, one or one per play.
        device: a ``torch.device`` to draw and hold the prompts on (float64 tensors, equal
            to numpy's within rounding); ``None``: numpy.

    Returns:
        The prompts, as one ``Prompt`` whose arrays carry a leading batch axis.
    """
    seeds = as_seeds(seeds)
    batch = len(seeds)
    spectrum = np.ones(d) if spectrum is None else np.asarray(spectrum, dtype=float)
    shared = spectrum.ndim == 1
    spectrum = np.broadcast_to(spectrum, (batch, d))
    noise = np.broadcast_to(np.asarray(noise, dtype=float), (batch,))
    noisy = np.flatnonzero(noise > 0)
    X = normals(seeds, name, INPUTS, (n, d), device=device)
    rotation = None
    if rotate:
        rotation = haar_rotations(normals(seeds, name, ROTATION, (d, d), device=device))
    if target is None:
        target = normals(seeds, name, TARGET, (d,), device=device)
    else:
        target = np.asarray(target, dtype=float)
        if target.shape != (batch, d):
            target = np.array(np.broadcast_to(target, (batch, d)), order="C")
        target = on(target, X)
    X *= on(np.sqrt(spectrum)[:, None, :], X)
    if rotation is not None:  # without, X @ I: the same numbers
        X = X @ rotation.swapaxes(1, 2)
    y = (X @ target[..., None])[..., 0]
    if len(noisy):
        draws = normals(seeds[noisy], name, NOISE, (n,), device=device)
        rows = on(noisy, X)
        y[rows] += on(noise[noisy, None], X) * draws
    if rotation is None and shared and batch > 1:  # (I * spectrum) @ I^T: one for all plays
        covariance = broadcast(np.diag(spectrum[0]), (batch, d, d), X)
    elif rotation is None:
        covariance = np.zeros((batch, d, d))
        covariance[:, np.arange(d), np.arange(d)] = spectrum
        covariance = on(covariance, X)
    else:
        spread = on(spectrum[:, None, :], X)
        covariance = (rotation * spread) @ rotation.swapaxes(1, 2)
    return Prompt(X=X, y=y, target=target, covariance=covariance)


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
    xp = namespace(gaussian)
    q, r = xp.linalg.qr(gaussian)
    q = q * xp.sign(xp.diagonal(r, 0, -2, -1))[:, None, :]
    flip = xp.linalg.det(q) < 0
    q[flip, :, 0] = -q[flip, :, 0]
    return q
