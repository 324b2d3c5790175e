"""Defences: wrappers that guard a victim agent against an attacking partner (docs/theory.md §3).

- ``Damped``: ``u_t = (1 - beta) u_{t-1} + beta f(w)``. Same fixed points as the
  undamped agent (``u = f(v)`` solves both), so it cannot move the biased
  equilibrium; it changes the rate, and can even make a divergent play converge.
  The theory (``affine``) describes the undamped play: its fixed point is right,
  its ``rho`` and convergence verdict are not.
- ``Monitor``: estimates the partner's affine map online from the pairs
  (own output, partner's answer) and flags a partner whose map is
  non-stationary, ignores its input (``H = I``: a Newton step, or an attack that
  fixes its output), or implies an implausible target. Behaviour unchanged.
- ``Predictive``: a monitor that also predicts the equilibrium with the fitted
  partner map before committing, and stops reading the partner (answers its own
  least-squares estimate) when that equilibrium costs it more than a budget or
  the monitor flags.

Every wrapper keeps the wrapped agent's name, batch and ``affine`` map: the
theory predicts the undefended play.
"""

from __future__ import annotations

import numpy as np

from misalign.model.agent import (
    AffineMap,
    Agent,
    Turn,
    Wrapper,
    affine_design,
    affine_lstsq,
    condition,
    noise_covariance,
)
from misalign.model.theory import two_agent

CHANGE_TOLERANCE = 1e-4
"""A new pair off the fitted map by more than this fraction of its own change is non-stationary."""

IGNORE_TOLERANCE = 1e-6
"""A fitted ``|I - H|`` below this means the partner ignores its input."""

PLAUSIBLE_QUANTILE = 0.999
"""Implied targets beyond this quantile of ``|w|^2``, ``w ~ N(0, I)``, are implausible."""

WINDOW = 2
"""The monitor fits the last ``WINDOW (d + 1)`` pairs: constant work per turn."""

NOISE_FLOOR = 1e-6
"""Changes below this (relative to the answer's size) are rounding, not evidence."""

CONDITION_LIMIT = 1e6
"""Fits from inputs whose design matrix is worse conditioned than this are not trusted."""


class Guard(Wrapper):
    """A wrapper that keeps the guarded agent's name, preconditioner, affine map and noise,
    and whatever else the agent beneath declares."""

    def __init__(self, inner: Agent) -> None:
        self.inner, self.name = inner, inner.name

    @property
    def gamma(self) -> np.ndarray | None:
        return self.inner.gamma

    def start(self, batch: int) -> None:
        self.inner.start(batch)

    def affine(self) -> AffineMap | None:
        return self.inner.affine()

    def noise_covariance(self) -> np.ndarray | None:
        return noise_covariance(self.inner)


class Damped(Guard):
    """``u_t = (1 - beta) u_{t-1} + beta f(w)``; the first turn is undamped.

    Args:
        inner: the agent to damp.
        beta: weight of the new answer, in ``(0, 1]``.
    """

    def __init__(self, inner: Agent, beta: float) -> None:
        super().__init__(inner)
        self.beta = beta

    def respond(self, w: np.ndarray, turn: Turn) -> np.ndarray:
        answer = self.inner.respond(w, turn)
        mine = turn.outputs(self.name)
        return answer if len(mine) == 0 else (1 - self.beta) * mine[-1] + self.beta * answer

    def affine(self) -> AffineMap | None:
        """``u <- beta (A w + c) + (1 - beta) u``: the inner map scaled, ``keep = 1 - beta``
        (the undamped first turn is a transient the theory does not need)."""
        f = self.inner.affine()
        if f is None:
            return None
        return AffineMap(self.beta * f.A, self.beta * f.c, np.full(len(f.c), 1 - self.beta))

    def noise_covariance(self) -> np.ndarray | None:
        """``beta^2 Q``: the inner agent's noise enters with the new answer's weight."""
        inner = noise_covariance(self.inner)
        return None if inner is None else self.beta**2 * inner


class Monitor(Guard):
    """Estimate the partner's map online and flag it.

    A partner's map can only be read off inputs that span an affine basis, and
    a play converges (or a constant partner freezes it) long before that. So the
    monitor first probes: on its turns ``0..d-1`` it adds ``probe * e_k`` to its
    answer (a transient: the equilibrium is unchanged). At each turn, with the
    pairs ``(u_j, v_j)`` (own output, the partner's answer to it) so far, it
    computes three scores, each ``> 1`` meaning "flag":

    - ``change``: the newest pair's distance from the map fitted on the earlier
      pairs, relative to the pair's own change (floored at ``NOISE_FLOOR``), over
      ``CHANGE_TOLERANCE``: an honest affine partner scores ~0, a partner that
      switches its map (a gray-box attacker ending its probes) scores high;
    - ``ignore``: ``IGNORE_TOLERANCE / |A_fit|`` (``A_fit = I - H_fit``): the
      partner's answer does not depend on its input (``H = I``: an honest
      Newton step, the geometry attack and the per-turn attack all look so);
    - ``implausible``: ``|H_fit^+ c_fit|^2`` (the target an honest partner with
      this map would hold) over the ``PLAUSIBLE_QUANTILE`` of chi-square with
      ``d`` degrees of freedom (targets are drawn ``N(0, I)``).

    Fits use the last ``WINDOW (d + 1)`` pairs, and scores are computed only while
    those inputs span an affine basis (condition number below ``CONDITION_LIMIT``).

    Args:
        inner: the agent to guard.
        probe: size of the probe added on the first ``d`` turns (0: no probing).

    Attributes:
        scores: per score name, per play, the largest value so far.
        score: per play, the largest of the three (the ROC statistic).
        flagged_at: per play, the first round with a score above 1, or ``-1``.
        fitted: the latest fitted partner map; ``trusted`` says where it is informative.
    """

    def __init__(self, inner: Agent, probe: float = 0.1) -> None:
        super().__init__(inner)
        self.probe = probe

    def start(self, batch: int) -> None:
        super().start(batch)
        self.scores = {key: np.zeros(batch) for key in ("change", "ignore", "implausible")}
        self.flagged_at = np.full(batch, -1)
        self.fitted: AffineMap | None = None
        self.trusted = np.zeros(batch, dtype=bool)

    @property
    def score(self) -> np.ndarray:
        return np.maximum.reduce(list(self.scores.values()))

    def respond(self, w: np.ndarray, turn: Turn) -> np.ndarray:
        self.observe(turn)
        return self._probed(self.inner.respond(w, turn), turn)

    def _probed(self, answer: np.ndarray, turn: Turn) -> np.ndarray:
        k = len(turn.outputs(self.name))
        if self.probe > 0 and k < answer.shape[-1]:
            answer = answer.copy()
            answer[:, k] += self.probe
        return answer

    def observe(self, turn: Turn) -> None:
        """Update the fit and the scores from the pairs seen so far."""
        U, V = turn.pairs(turn.reads, self.name)  # the partner's inputs (mine) and answers
        d = U.shape[-1]
        U, V = U[-WINDOW * (d + 1) :], V[-WINDOW * (d + 1) :]
        pairs, batch = U.shape[:2]
        if pairs < d + 1:
            return
        informative = _spread(U) < CONDITION_LIMIT
        fit = affine_lstsq(U, V)
        new = {key: np.zeros(batch) for key in self.scores}
        if pairs >= d + 2:
            earlier = affine_lstsq(U[:-1], V[:-1])
            off = np.linalg.norm(V[-1] - earlier(U[-1]), axis=-1)
            moved = np.linalg.norm(V[-1] - V[-2], axis=-1) + np.linalg.norm(U[-1] - U[-2], axis=-1)
            floor = NOISE_FLOOR * (1 + np.linalg.norm(V[-1], axis=-1))
            change = off / np.maximum(moved, floor) / CHANGE_TOLERANCE
            new["change"] = np.where(_spread(U[:-1]) < CONDITION_LIMIT, change, 0.0)
        gain = np.where(informative, np.linalg.norm(np.nan_to_num(fit.A), ord=2, axis=(1, 2)), 1.0)
        new["ignore"] = IGNORE_TOLERANCE / np.maximum(gain, 1e-300)
        implied = np.full_like(fit.c, np.inf)
        fine = informative & np.isfinite(fit.A).all(axis=(1, 2))
        implied[fine] = (np.linalg.pinv(fit.H[fine]) @ fit.c[fine][..., None])[..., 0]
        new["implausible"] = np.sum(implied**2, axis=-1) / _chi2(d)
        for key, value in new.items():
            self.scores[key] = np.maximum(self.scores[key], np.where(informative, value, 0.0))
        self.flagged_at[(self.score > 1) & (self.flagged_at < 0)] = turn.round
        self.fitted, self.trusted = fit, informative


class Predictive(Monitor):
    """A monitor that predicts the equilibrium before committing.

    With the fitted partner map ``g`` and its own map ``f`` it solves the
    two-agent equilibrium ``u* = f(v*)``, ``v* = g(u*)`` (``theory.two_agent``).
    If ``|u* - w^|`` exceeds ``budget |w^|`` (``w^``: its own least-squares
    estimate of its target) or the monitor flags, it stops reading the partner
    for the rest of the play and answers ``w^``.

    Args:
        inner: the victim's honest agent (must expose an affine map).
        own_estimate: ``w^`` per play, ``(B, d)``.
        budget: the tolerated predicted residual, relative to ``|w^|``.
        probe: as for ``Monitor``.

    Attributes:
        refused_at: per play, the round it stopped reading the partner, or ``-1``.
    """

    def __init__(
        self, inner: Agent, own_estimate: np.ndarray, budget: float, probe: float = 0.1
    ) -> None:
        super().__init__(inner, probe)
        self.own_estimate, self.budget = own_estimate, budget

    def start(self, batch: int) -> None:
        super().start(batch)
        self.refused_at = np.full(batch, -1)

    def respond(self, w: np.ndarray, turn: Turn) -> np.ndarray:
        self.observe(turn)
        answer = self.inner.respond(w, turn)
        refuse = self.flagged_at >= 0
        if self.trusted.any():
            _, _, u = two_agent(self.inner.affine()[self.trusted], self.fitted[self.trusted])
            cost = np.linalg.norm(u - self.own_estimate[self.trusted], axis=-1)
            limit = self.budget * np.linalg.norm(self.own_estimate[self.trusted], axis=-1)
            refuse[self.trusted] |= ~(cost <= limit)
        self.refused_at[refuse & (self.refused_at < 0)] = turn.round
        refused = self.refused_at >= 0
        return np.where(refused[:, None], self.own_estimate, self._probed(answer, turn))

    def _refused(self) -> np.ndarray:
        """Per play, whether it stopped reading the partner (all ``False`` before a play)."""
        refused_at = self.__dict__.get("refused_at")
        return np.zeros(len(self.own_estimate), bool) if refused_at is None else refused_at >= 0

    def affine(self) -> AffineMap | None:
        """The regime each play ends in: the inner map, or, where it stopped reading the
        partner, the constant answer ``w^`` (``A = 0``, ``c = w^``)."""
        f, refused = self.inner.affine(), self._refused()
        if f is None or not refused.any():
            return f
        A = np.where(refused[:, None, None], 0.0, f.A)
        return AffineMap(A, np.where(refused[:, None], self.own_estimate, f.c))

    def noise_covariance(self) -> np.ndarray | None:
        """The inner agent's noise, none where the play answers the constant ``w^``."""
        inner = noise_covariance(self.inner)
        return None if inner is None else np.where(self._refused()[:, None, None], 0.0, inner)


def _spread(U: np.ndarray) -> np.ndarray:
    """Condition number of the affine design ``[U, 1]`` per play."""
    return condition(affine_design(U))


def _chi2(d: int) -> float:
    from scipy.stats import chi2

    return float(chi2.ppf(PLAUSIBLE_QUANTILE, d))
