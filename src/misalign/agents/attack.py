"""Attackers: agents that engineer one-sided success (docs/theory.md §3).

The attacker ``B`` plays against a victim ``A`` in the alternating play
``u_t = f_A(v_{t-1})``, ``v_t = f_B(u_t)``, and wants ``v* = w_B*`` exactly
while ``A`` stays biased. Each attack keeps ``B``'s own preconditioner
``Gamma_B`` and ``k`` steps per turn; ``H_B`` below is the ``k``-step matrix
``I - (I - Gamma_B S_B)^k`` and ``f_A(w) = (I - H_A) w + b_A`` the victim's
turn map (noise-free, ``b_A = H_A w_A*``).

- ``decoy`` (white box: knows ``H_A`` and ``b_A``): honest updates on a crafted
  target ``w~`` (its prompt relabelled ``y~ = X_B w~``).
- ``geometry`` (needs nothing of ``A``): a crafted prompt with
  ``Gamma_B S_B = I``.
- ``per-turn`` (needs ``H_B`` and ``u_t`` only): a fresh target every turn.
- gray-box ``decoy``: fit ``A``'s map from ``d + 1`` probe turns, then decoy.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from misalign.config import ConfigError
from misalign.model.agent import AffineMap, GradientAgent, Turn, affine_lstsq, condition
from misalign.model.prompt import Prompt

CONDITION_LIMIT = 1e10
"""``H_B`` with a larger condition number counts as singular."""


def decoy_target(victim: AffineMap, honest: AffineMap, target: np.ndarray) -> np.ndarray:
    """The decoy target ``w~ = H_B^{-1} ((I - M_B) w_B* - (I - H_B) b_A)``.

    Proof sketch: B's honest map on target ``w~`` is ``f_B(u) = (I - H_B) u + H_B w~``.
    The play's fixed point solves ``v* = (I - H_B)((I - H_A) v* + b_A) + H_B w~``,
    i.e. ``(I - M_B) v* = (I - H_B) b_A + H_B w~``; substituting ``w~`` gives
    ``(I - M_B) v* = (I - M_B) w_B*``, so ``v* = w_B*`` whenever ``I - M_B`` is
    invertible (``rho < 1``). A then sits at ``u* = f_A(w_B*)``, biased by
    ``e_A = -(I - H_A) delta`` when noise-free. With ``b_A = H_A w_A*`` this is
    docs/theory.md §3's ``H_B^{-1}((I - M_B) w_B* - (I - H_B) H_A w_A*)``. Exact at the
    equilibrium only, not turn by turn.

    Args:
        victim: A's turn map (``A_A = I - H_A``, ``c_A = b_A``), exact or fitted.
        honest: B's own ``k``-step map; only ``A_B = I - H_B`` is used.
        target: ``w_B*``, ``(B, d)``.

    Returns:
        ``w~``, ``(B, d)``.
    """
    eye = np.eye(target.shape[-1])
    M_B = honest.A @ victim.A
    rhs = (eye - M_B) @ target[..., None] - honest.A @ victim.c[..., None]
    return np.linalg.solve(eye - honest.A, rhs)[..., 0]


def _require_invertible(H: np.ndarray, name: str, method: str, prompts: list[Prompt]) -> None:
    cond = condition(H)
    if not (cond < CONDITION_LIMIT).all():
        n, d = prompts[0].n, prompts[0].d
        hint = f"n = {n} < d = {d}" if n < d else f"condition number {cond.max():.3g}"
        raise ConfigError(
            f"attack.method: {method} needs an invertible H_{name}, got a singular one ({hint})"
        )


def _step_matrix(gamma: np.ndarray, prompts: list[Prompt], steps: int) -> AffineMap:
    """B's honest ``k``-step map with zero labels: only ``A = (I - Gamma S)^k`` matters."""
    S = np.stack([p.second_moment for p in prompts])
    one = np.linalg.matrix_power(np.eye(S.shape[-1]) - gamma @ S, steps)
    return AffineMap(one, np.zeros(S.shape[:2]))


def _relabelled(
    name: str, gamma: np.ndarray, prompts: list[Prompt], steps: int, new_target: np.ndarray
) -> tuple[GradientAgent, list[Prompt]]:
    """B's honest agent on prompts relabelled ``y~ = X w~`` (targets stay ``w_B*``)."""
    prompts = [replace(p, y=p.X @ w) for p, w in zip(prompts, new_target, strict=True)]
    return GradientAgent.on_prompts(name, gamma, prompts, steps), prompts


def decoy(
    name: str, gamma: np.ndarray, prompts: list[Prompt], steps: int, victim: AffineMap
) -> tuple[GradientAgent, list[Prompt]]:
    """The white-box decoy: B's honest agent on its prompt relabelled with ``w~``.

    Raises:
        ConfigError: ``H_B`` is singular (e.g. ``n_B < d``).
    """
    honest = _step_matrix(gamma, prompts, steps)
    _require_invertible(honest.H, name, "decoy", prompts)
    target = np.stack([p.target for p in prompts])
    return _relabelled(name, gamma, prompts, steps, decoy_target(victim, honest, target))


def geometry(
    name: str, kind: str, eta: float, gamma: np.ndarray, prompts: list[Prompt], steps: int
) -> tuple[GradientAgent, list[Prompt]]:
    """Crafted geometry: a prompt with ``Gamma_B S_B = I``, so ``H_B = I`` and B is exact.

    Proof sketch: with ``H_B = I`` B's map is ``f_B(u) = b_B = Gamma_B X^T y / n``;
    noise-free labels ``y = X w_B*`` give ``b_B = Gamma_B S_B w_B* = w_B*``, so
    ``v_t = w_B*`` from the first turn on, for any ``k``. Construction: take the
    orthonormal basis ``Q`` of the sampled ``X``'s column space and set
    ``X = sqrt(n) Q Gamma_B^{-1/2}``, so ``S_B = Gamma_B^{-1}``; this needs rank
    ``d``, i.e. ``n_B >= d``. A Newton agent has ``Gamma S = eta I`` for every
    full-rank prompt, so it needs ``eta = 1`` and keeps its prompt.

    Raises:
        ConfigError: ``n_B < d``, or a Newton agent with ``eta != 1``.
    """
    n, d = prompts[0].n, prompts[0].d
    if n < d:
        raise ConfigError(f"attack.method: geometry needs n_{name} >= d (n = {n}, d = {d})")
    if kind == "newton" and eta != 1.0:
        raise ConfigError(
            f"attack.method: geometry with a newton agent needs eta = 1 (eta = {eta})"
        )
    crafted = []
    for p, g in zip(prompts, gamma, strict=True):
        X = p.X
        if kind != "newton":
            values, vectors = np.linalg.eigh(g)
            q = np.linalg.qr(p.X)[0]
            X = np.sqrt(n) * q @ (vectors / np.sqrt(values)) @ vectors.T
        crafted.append(replace(p, X=X, y=X @ p.target))
    if kind == "newton":
        gamma = np.stack([eta * np.linalg.pinv(p.second_moment, hermitian=True) for p in crafted])
    return GradientAgent.on_prompts(name, gamma, crafted, steps), crafted


class PerTurnAttacker:
    """The adaptive attacker: each turn it relabels its prompt with
    ``w~_t = H_B^{-1} (w_B* - (I - H_B) u_t)`` and takes its honest step.

    Proof sketch: the honest step on target ``w~_t`` is ``(I - H_B) u_t + H_B w~_t
    = w_B*``, so ``v_t = w_B*`` from the first turn on, whatever A does; it needs
    only ``H_B`` and the input ``u_t``. Its effective turn map is the constant
    ``f_B(u) = w_B*`` (``A = 0``), which is what ``affine`` reports to the theory.

    Args:
        name: the attacker's name.
        gamma: B's preconditioners, ``(B, d, d)``.
        prompts: B's prompts (their targets are ``w_B*``).
        steps: B's steps per turn.

    Raises:
        ConfigError: ``H_B`` is singular.
    """

    def __init__(self, name: str, gamma: np.ndarray, prompts: list[Prompt], steps: int) -> None:
        self.name = name
        self._gamma = gamma
        self._honest = _step_matrix(gamma, prompts, steps)
        _require_invertible(self._honest.H, name, "per-turn", prompts)
        self._target = np.stack([p.target for p in prompts])

    @property
    def gamma(self) -> np.ndarray:
        return self._gamma

    def start(self, batch: int) -> None:
        pass

    def respond(self, w: np.ndarray, turn: Turn) -> np.ndarray:
        H, carried = self._honest.H, (self._honest.A @ w[..., None])[..., 0]
        decoy_t = np.linalg.solve(H, (self._target - carried)[..., None])[..., 0]
        return carried + (H @ decoy_t[..., None])[..., 0]

    def affine(self) -> AffineMap:
        return AffineMap(np.zeros_like(self._honest.A), self._target.copy())


class GrayBoxDecoy:
    """The gray-box decoy: probe the victim, fit its map, then decoy.

    Probe turns cycle through ``w_B* + s e_1, ..., w_B* + s e_d, w_B*`` (affinely
    independent by construction). The victim answers probe ``t`` with
    ``u_{t+1} = f_A(p_t)``, so after the ``probe_turns`` (at least ``d + 1``) the pairs
    ``(p_t, u_{t+1})`` determine ``(I - H_A, b_A)`` by least squares: exactly for a
    noise-free affine victim; for a sampled victim (answers ``f_A(p) + eps``) the fit's
    error falls as ``1 / sqrt(probe_turns / (d + 1))``, each probe point being answered
    that many times. From then on it plays the white-box decoy with the fitted map.

    Args:
        name: the attacker's name.
        gamma: B's preconditioners, ``(B, d, d)``.
        prompts: B's prompts.
        steps: B's steps per turn.
        scale: probe size ``s``.
        settles_to: the white-box decoy map it converges to once its fit is exact,
            reported by ``affine`` for the theory (the agent never reads it).
        probe_turns: turns spent probing (default ``d + 1``).
    """

    def __init__(
        self,
        name: str,
        gamma: np.ndarray,
        prompts: list[Prompt],
        steps: int,
        scale: float,
        settles_to: AffineMap,
        probe_turns: int | None = None,
    ) -> None:
        self.name = name
        self._gamma = gamma
        self._prompts = prompts
        self._steps = steps
        self._honest = _step_matrix(gamma, prompts, steps)
        _require_invertible(self._honest.H, name, "decoy", prompts)
        self._target = np.stack([p.target for p in prompts])
        self._scale = scale
        self._settles_to = settles_to
        d = self._target.shape[-1]
        self.probe_turns = d + 1 if probe_turns is None else probe_turns
        if self.probe_turns < d + 1:
            raise ValueError(f"the gray box needs at least d + 1 = {d + 1} probe turns")
        self._attack: GradientAgent | None = None
        self.fitted: AffineMap | None = None

    @property
    def gamma(self) -> np.ndarray:
        return self._gamma

    def start(self, batch: int) -> None:
        self._attack, self.fitted = None, None

    def respond(self, w: np.ndarray, turn: Turn) -> np.ndarray:
        mine = turn.outputs(self.name)
        d = w.shape[-1]
        if len(mine) < self.probe_turns:
            probe, k = self._target.copy(), len(mine) % (d + 1)
            if k < d:
                probe[:, k] += self._scale
            return probe
        if self._attack is None:
            probes, answers = turn.pairs(turn.reads, self.name)
            self.fitted = affine_lstsq(probes[-len(mine) :], answers[-len(mine) :])
            wt = decoy_target(self.fitted, self._honest, self._target)
            self._attack, _ = _relabelled(self.name, self._gamma, self._prompts, self._steps, wt)
        return self._attack.respond(w, turn)

    def affine(self) -> AffineMap:
        """The decoy it plays once it has fitted the victim (after a play), else the exact
        decoy it settles to when the fit is exact (a noise-free, undamped victim)."""
        return self._settles_to if self._attack is None else self._attack.affine()
