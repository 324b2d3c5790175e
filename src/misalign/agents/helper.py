"""The Newton helper: a partner that makes the agent it serves converge in a few rounds
(docs/theory.md §4).

The served agent ``A`` takes one gradient step per turn, ``f_A(x) = (I - H_A) x + b_A``,
whose fixed point is its own solution ``w^ = H_A^{-1} b_A`` (``w_A*`` for noise-free
labels). With a small step it crawls: plain alternation needs ``O(kappa log 1/eps)``
rounds. The helper re-picks its own output each turn so that ``A``'s next input is
the next iterate of Newton's method on ``A``'s objective. The derivation: the
Newton step from ``A``'s last output ``u_t`` is

    u_t - H_A^{-1} (u_t - f_A(u_t)) = u_t - H_A^{-1} H_A (u_t - w^) = w^,

so an input of ``w^`` puts ``A`` on ``w^`` the next round (``f_A(w^) = w^``): one
round. ``A`` may read the helper directly, or read an agent ``C`` that reads the
helper (``A -> helper -> C -> A``); the helper then outputs ``f_C^{-1}(w^)``.

Modes:
- ``white-box``: knows ``f_A`` (and ``f_C``) and applies the formula above.
- ``secant``: sees only the play. It fits ``A``'s affine map (and ``C``'s) by least
  squares on the recorded (input, output) pairs, probing ``start + s e_k`` until the
  pairs span an affine basis, and outputs the fitted map's fixed point: a
  multisecant (Anderson-type) method that lands ``A`` in ``d + 2`` rounds when it
  reads the helper. Safeguards: a fit is used only while its design and
  ``I - A_fit`` are well conditioned; otherwise the helper probes a new direction,
  or, once it has a good answer, keeps it. Rank-one Broyden updates are not used
  (``2d + 1`` rounds in exact arithmetic, far more in float64; docs/theory.md §4).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from misalign.model.agent import AffineMap, Turn, affine_design, affine_lstsq, condition

CONDITION_LIMIT = 1e10
"""Fits whose design or fixed-point system is worse conditioned than this are not used."""


def newton_input(served: AffineMap, via: AffineMap | None) -> np.ndarray:
    """The helper output that puts the served agent on its fixed point next round.

    Args:
        served: ``f_A``.
        via: ``f_C`` when ``A`` reads ``C`` which reads the helper, else ``None``.

    Returns:
        ``w^ = H_A^{-1} b_A``, or ``f_C^{-1}(w^) = A_C^{-1}(w^ - c_C)``; ``(B, d)``.
    """
    target = np.linalg.solve(served.H, served.c[..., None])[..., 0]
    if via is None:
        return target
    return np.linalg.solve(via.A, (target - via.c)[..., None])[..., 0]


class Helper:
    """The helper agent.

    Args:
        name: the helper's name.
        serves: the served agent ``A``.
        serves_reads: the agent ``A`` reads (the helper, or ``via``).
        via: the agent ``C`` between the helper and ``A``, or ``None``.
        mode: ``white-box`` or ``secant``.
        maps: the true maps of ``A`` and ``C`` (white box only; ``None`` for secant).
        settles_to: the constant output the play settles to, reported by ``affine``
            to the theory (the agent itself never reads it).
        probe_scale: size ``s`` of the secant probes.
    """

    def __init__(
        self,
        name: str,
        serves: str,
        serves_reads: str,
        via: str | None,
        mode: Literal["white-box", "secant"],
        maps: dict[str, AffineMap] | None,
        settles_to: np.ndarray,
        probe_scale: float = 1.0,
    ) -> None:
        self.name, self.serves, self.serves_reads, self.via = name, serves, serves_reads, via
        self.mode, self.maps, self.probe_scale = mode, maps, probe_scale
        self._settles_to = settles_to

    gamma = None

    def start(self, batch: int) -> None:
        self._best = np.full_like(self._settles_to, np.nan)

    def affine(self) -> AffineMap:
        batch, d = self._settles_to.shape
        return AffineMap(np.zeros((batch, d, d)), self._settles_to.copy())

    def respond(self, w: np.ndarray, turn: Turn) -> np.ndarray:
        if self.mode == "white-box":
            return self._white_box(turn)
        return self._secant(turn)

    def _white_box(self, turn: Turn) -> np.ndarray:
        """Newton from ``A``'s last output ``u_t``: ``u_t - H_A^{-1}(u_t - f_A(u_t))``."""
        served = self.maps[self.serves]
        done = turn.outputs(self.serves)
        u = turn.start if len(done) == 0 else done[-1]
        step = np.linalg.solve(served.H, (u - served(u))[..., None])[..., 0]
        newton = u - step
        if self.via is None:
            return newton
        via = self.maps[self.via]
        return np.linalg.solve(via.A, (newton - via.c)[..., None])[..., 0]

    def _secant(self, turn: Turn) -> np.ndarray:
        """The fitted fixed point where the fits are sound, the last sound answer where they
        are not, and a probe where there has been none yet."""
        d = turn.start.shape[-1]
        ok, fits = self._fits(turn, d)
        if ok.any():
            served, via = fits
            self._best[ok] = newton_input(served[ok], None if via is None else via[ok])
        known = ~np.isnan(self._best[:, 0])
        return np.where(known[:, None], self._best, self._probe(turn, d))

    def _fits(self, turn: Turn, d: int) -> tuple[np.ndarray, tuple[AffineMap, AffineMap | None]]:
        """The fitted maps of ``A`` (and ``C``) and where both are sound."""
        served, ok = self._fit(turn, self.serves, self.serves_reads, d)
        via = None
        if served is not None and self.via is not None:
            via, via_ok = self._fit(turn, self.via, self.name, d)
            ok = ok & via_ok if via is not None else np.zeros_like(ok)
        if served is not None:
            ok &= condition(served.H) < CONDITION_LIMIT
        if via is not None:
            ok &= condition(via.A) < CONDITION_LIMIT
        return ok, (served, via)

    def _fit(
        self, turn: Turn, name: str, reads: str, d: int
    ) -> tuple[AffineMap | None, np.ndarray]:
        """Fit agent ``name``'s map on its recorded pairs; ``ok`` where the design is sound."""
        inputs, outputs = turn.pairs(name, reads)
        batch = turn.start.shape[0]
        if len(inputs) < d + 1:
            return None, np.zeros(batch, dtype=bool)
        ok = condition(affine_design(inputs)) < CONDITION_LIMIT
        return affine_lstsq(inputs, outputs), ok

    def _probe(self, turn: Turn, d: int) -> np.ndarray:
        """Probe ``k``: ``start + s e_{k mod d}``, the sign flipping every ``d`` probes."""
        k = len(turn.outputs(self.name))
        probe = turn.start.copy()
        probe[:, k % d] += self.probe_scale * (-1) ** (k // d)
        return probe
