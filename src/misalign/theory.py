"""Closed-form predictions for plays of affine agents (MODEL.md section 2).

Stack every agent's last output into ``s`` (length ``N d``). A turn of agent
``i`` reading agent ``j`` replaces block ``i`` by ``A_i s_j + c_i``; a round is
the composition ``s -> R s + r``. The play converges iff ``rho(R) < 1`` (blocks
overwritten before they are read add zero eigenvalues only), at rate ``rho``
per round, to the fixed point ``(I - R) s* = r``.

For two alternating agents this gives back ``M_B = (I - H_B)(I - H_A)``,
``v* = (I - M_B)^{-1} ((I - H_B) b_A + b_B)`` and the residuals
``e_B = (I - M_B)^{-1} (I - H_B) H_A delta``,
``e_A = -(I - M_A)^{-1} (I - H_A) H_B delta``, ``delta = w_A* - w_B*``;
``two_agent`` and ``two_agent_residuals`` compute those forms directly so the
general solver can be tested against them. All solves are linear solves,
never explicit inverses. Every array carries a leading batch axis ``B``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from misalign.agent import AffineMap
from misalign.play import Schedule


@dataclass(frozen=True)
class Prediction:
    """The predicted outcome of a batch of plays.

    Attributes:
        rho: spectral radius of the round map, per play, shape ``(B,)``.
        fixed_point: per agent, the predicted limit of its output, ``(B, d)``;
            NaN for plays that do not converge.
        residual: per agent with a target, ``fixed_point - target``, ``(B, d)``.
        covariance: with sampled agents, per agent the stationary covariance of its output,
            ``(B, d, d)`` (the mean is ``fixed_point``); empty without noise.
    """

    rho: np.ndarray
    fixed_point: dict[str, np.ndarray]
    residual: dict[str, np.ndarray]
    covariance: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def converges(self) -> np.ndarray:
        """``rho < 1``, per play."""
        return self.rho < 1

    def rounds_to(self, tol: float = 1e-8) -> np.ndarray:
        """Rounds for the error to shrink by ``tol`` at the asymptotic rate ``rho``: at least 1
        (a nilpotent round map, ``rho = 0``, still takes a round), ``inf`` where the play
        does not converge."""
        with np.errstate(divide="ignore"):
            rounds = np.log(tol) / np.log(np.clip(self.rho, 1e-300, None))
        return np.where(self.rho < 1, np.maximum(1.0, np.ceil(rounds)), np.inf)


class RoundMap(NamedTuple):
    """One round as an affine map of the stacked outputs, ``s -> R s + r + xi``.

    Attributes:
        R: ``(B, N d, N d)``.
        r: ``(B, N d)``.
        Q: covariance of the round's noise ``xi``, ``(B, N d, N d)``; ``None`` without noise.
    """

    R: np.ndarray
    r: np.ndarray
    Q: np.ndarray | None


def round_map(
    maps: Mapping[str, AffineMap],
    schedule: Schedule,
    noise: Mapping[str, np.ndarray] | None = None,
) -> RoundMap:
    """The round map on the stacked outputs, blocks in ``schedule.agents`` order.

    Noise (MODEL.md section 6): an agent in ``noise`` adds ``eps ~ (0, Q_i)`` to each of its
    answers. Each turn's ``eps`` enters as an extra input column block that the later turns
    of the round carry along exactly as they carry ``s`` (the same recursion), so the
    round's noise is ``xi = N eps`` and ``Q = N diag(Q_k) N^T``. Two alternating agents give
    ``Q_v = (I - H_B) Q_A (I - H_B)^T + Q_B`` on ``B``'s block.

    Args:
        maps: every scheduled agent's turn map.
        schedule: the round's turns.
        noise: per sampled agent, its noise covariance ``Q_i``, ``(B, d, d)``.

    Returns:
        ``R``, ``r`` and ``Q``.
    """
    names, noise = schedule.agents, noise or {}
    batch, d = maps[names[0]].c.shape
    size = len(names) * d
    block = {name: slice(k * d, (k + 1) * d) for k, name in enumerate(names)}
    noisy = [k for k, (name, _) in enumerate(schedule.turns) if name in noise]
    M = np.zeros((batch, size, size + d * len(noisy)))  # [R | N]
    M[:, :, :size] = np.eye(size)
    r = np.zeros((batch, size))
    for k, (name, reads) in enumerate(schedule.turns):
        f = maps[name]
        # s_i <- A_i s_j + c_i (+ eps_k), with s_j = R_j s + N_j eps + r_j block j's current value.
        M[:, block[name]], r[:, block[name]] = f.A @ M[:, block[reads]], f(r[:, block[reads]])
        if k in noisy:
            column = size + d * noisy.index(k)
            M[:, block[name], column : column + d] += np.eye(d)
    R, N = M[:, :, :size], M[:, :, size:]
    if not noisy:
        return RoundMap(R, r, None)
    Q = sum(
        N[:, :, d * m : d * (m + 1)]
        @ noise[schedule.turns[k][0]]
        @ N[:, :, d * m : d * (m + 1)].transpose(0, 2, 1)
        for m, k in enumerate(noisy)
    )
    return RoundMap(R, r, Q)


def stationary_covariance(R: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """The stationary covariance ``Sigma = R Sigma R^T + Q`` of ``s -> R s + r + xi``
    (``scipy.linalg.solve_discrete_lyapunov``, per play; needs ``rho(R) < 1``)."""
    from scipy.linalg import solve_discrete_lyapunov

    return np.stack([solve_discrete_lyapunov(a, q) for a, q in zip(R, Q, strict=True)])


def spectral_radius(M: np.ndarray) -> np.ndarray:
    """``max |eig(M)|`` per batch member."""
    return np.abs(np.linalg.eigvals(M)).max(axis=-1)


def predict(
    maps: Mapping[str, AffineMap],
    schedule: Schedule,
    targets: Mapping[str, np.ndarray],
    noise: Mapping[str, np.ndarray] | None = None,
) -> Prediction:
    """Predict ``rho``, the fixed point and the residuals for any schedule, and with sampled
    agents the stationary covariance of every output (MODEL.md section 6).

    Args:
        maps: every scheduled agent's turn map.
        schedule: the round's turns.
        targets: the objective ``w*`` of every agent that has one (helpers do not), ``(B, d)``.
        noise: per sampled agent, its noise covariance ``Q_i``, ``(B, d, d)``.

    Returns:
        The prediction.
    """
    names = schedule.agents
    R, r, Q = round_map(maps, schedule, noise)
    rho = spectral_radius(R)
    s = np.full_like(r, np.nan)
    ok = rho < 1
    if ok.any():
        eye = np.eye(R.shape[-1])
        s[ok] = np.linalg.solve(eye - R[ok], r[ok][..., None])[..., 0]
    d = r.shape[-1] // len(names)
    blocks = {name: slice(k * d, (k + 1) * d) for k, name in enumerate(names)}
    fixed = {name: s[:, blocks[name]] for name in names}
    covariance = {}
    if Q is not None:
        sigma = np.full_like(R, np.nan)
        if ok.any():
            sigma[ok] = stationary_covariance(R[ok], Q[ok])
        covariance = {name: sigma[:, blocks[name], blocks[name]] for name in names}
    return Prediction(
        rho=rho,
        fixed_point=fixed,
        residual={name: fixed[name] - targets[name] for name in names if name in targets},
        covariance=covariance,
    )


def two_agent(A: AffineMap, B: AffineMap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed form of the alternating play ``u_t = f_A(v_{t-1})``, ``v_t = f_B(u_t)``.

    Returns:
        ``M_B = (I - H_B)(I - H_A)``, ``v* = (I - M_B)^{-1}((I - H_B) b_A + b_B)``
        and ``u* = f_A(v*)`` (MODEL.md section 2).
    """
    M_B = B.A @ A.A
    eye = np.eye(M_B.shape[-1])
    v = np.linalg.solve(eye - M_B, B.A @ A.c[..., None] + B.c[..., None])[..., 0]
    return M_B, v, A(v)


def two_agent_residuals(
    H_A: np.ndarray, H_B: np.ndarray, delta: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Equilibrium residuals of two noise-free agents from the objective gap (MODEL.md section 2).

    Args:
        H_A, H_B: step matrices, ``(B, d, d)``.
        delta: ``w_A* - w_B*``, ``(B, d)``.

    Returns:
        ``e_A = -(I - M_A)^{-1} (I - H_A) H_B delta`` and
        ``e_B = (I - M_B)^{-1} (I - H_B) H_A delta``.
    """
    eye = np.eye(H_A.shape[-1])
    M_A, M_B = (eye - H_A) @ (eye - H_B), (eye - H_B) @ (eye - H_A)
    e_A = -np.linalg.solve(eye - M_A, (eye - H_A) @ H_B @ delta[..., None])[..., 0]
    e_B = np.linalg.solve(eye - M_B, (eye - H_B) @ H_A @ delta[..., None])[..., 0]
    return e_A, e_B


def exactness(
    H_self: np.ndarray, H_other: np.ndarray, delta: np.ndarray, tol: float = 1e-9
) -> str | None:
    """Why an agent ends exactly on its target against one noise-free partner, or ``None``.

    The agent (``self``) is exact iff ``(I - H_self) H_other delta = 0``
    (MODEL.md section 3, the residual ``e`` of section 2 vanishes). The cases, in
    the order they are reported: no gap; a full (Newton) step ``H_self = I``; a gap
    invisible to the partner's prompt ``H_other delta = 0`` (e.g. ``delta`` in the
    null space of ``X_other`` when ``n_other < d``); a full step along
    ``H_other delta``.

    Args:
        H_self, H_other: step matrices of one play, ``(d, d)``.
        delta: the objective gap ``w_other* - w_self*`` (its sign does not matter), ``(d,)``.
        tol: relative tolerance.

    Returns:
        A short reason naming the condition, or ``None`` when the agent is biased.
    """
    eye = np.eye(len(delta))
    gap = np.linalg.norm(delta)
    if gap <= tol:
        return "no objective gap (delta = 0)"
    seen = H_other @ delta
    if np.linalg.norm(eye - H_self, ord=2) <= tol:
        return "full Newton step (H = I)"
    if np.linalg.norm(seen) <= tol * gap * max(1.0, np.linalg.norm(H_other, ord=2)):
        return "gap invisible to the partner's prompt (H_partner delta = 0)"
    if np.linalg.norm((eye - H_self) @ seen) <= tol * gap * max(1.0, np.linalg.norm(seen)):
        return "full step along the gap the partner sees ((I - H) H_partner delta = 0)"
    return None
