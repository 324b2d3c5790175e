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
from dataclasses import dataclass

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
    """

    rho: np.ndarray
    fixed_point: dict[str, np.ndarray]
    residual: dict[str, np.ndarray]

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


def round_map(maps: Mapping[str, AffineMap], schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """The round map ``s -> R s + r`` on the stacked outputs, blocks in ``schedule.agents`` order.

    Args:
        maps: every scheduled agent's turn map.
        schedule: the round's turns.

    Returns:
        ``R`` of shape ``(B, N d, N d)`` and ``r`` of shape ``(B, N d)``.
    """
    names = schedule.agents
    first = maps[names[0]]
    batch, d = first.c.shape
    block = {name: slice(k * d, (k + 1) * d) for k, name in enumerate(names)}
    R = np.broadcast_to(np.eye(len(names) * d), (batch, len(names) * d, len(names) * d)).copy()
    r = np.zeros((batch, len(names) * d))
    for name, reads in schedule.turns:
        f = maps[name]
        # s_i <- A_i s_j + c_i, with s_j = R_j s + r_j the current value of block j.
        R[:, block[name]], r[:, block[name]] = f.A @ R[:, block[reads]], f(r[:, block[reads]])
    return R, r


def spectral_radius(M: np.ndarray) -> np.ndarray:
    """``max |eig(M)|`` per batch member."""
    return np.abs(np.linalg.eigvals(M)).max(axis=-1)


def predict(
    maps: Mapping[str, AffineMap], schedule: Schedule, targets: Mapping[str, np.ndarray]
) -> Prediction:
    """Predict ``rho``, the fixed point and the residuals for any schedule.

    Args:
        maps: every scheduled agent's turn map.
        schedule: the round's turns.
        targets: the objective ``w*`` of every agent that has one (helpers do not), ``(B, d)``.

    Returns:
        The prediction.
    """
    names = schedule.agents
    R, r = round_map(maps, schedule)
    rho = spectral_radius(R)
    s = np.full_like(r, np.nan)
    ok = rho < 1
    if ok.any():
        eye = np.eye(R.shape[-1])
        s[ok] = np.linalg.solve(eye - R[ok], r[ok][..., None])[..., 0]
    d = r.shape[-1] // len(names)
    fixed = {name: s[:, k * d : (k + 1) * d] for k, name in enumerate(names)}
    return Prediction(
        rho=rho,
        fixed_point=fixed,
        residual={name: fixed[name] - targets[name] for name in names if name in targets},
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
