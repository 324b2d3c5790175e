"""Closed-form predictions for plays of affine agents (docs/theory.md §2).

Stack every agent's last output into ``s`` (length ``N d``). A turn of agent
``i`` reading agent ``j`` replaces block ``i`` by ``A_i s_j + c_i``; a round is
the composition ``s -> R s + r``. The play converges iff ``rho(R) < 1`` (blocks
overwritten before they are read add zero eigenvalues only), at rate ``rho``
per round, to the fixed point ``(I - R) s* = r``. A weighted read ``sum_j a_ij s_j`` makes a
turn's block row a mix of blocks; in simultaneous rounds every turn reads the previous round,
so ``R_ij = a_ij A_i`` and ``r_i = c_i`` (docs/theory.md §2, weighted reads and simultaneous
rounds).

Directions no prompt sees (docs/theory.md §2): when the prompts share a null
space ``N`` (``X_i v = 0`` for every agent, e.g. ``n_A + n_B < d``), every
``H_i`` vanishes on ``N`` and ``R`` has the eigenvalue 1 exactly. Where it is
semisimple and the affine part has no component along it (``P_1 r = 0``,
``P_1`` the spectral projection), the round acts there as the identity: the play
still converges, at the rate ``rho`` of the moving part ``R (I - P_1) = R - P_1``,
to ``s* = P_1 s_0 + (I - R + P_1)^{-1} r``, which depends on the start ``s_0``.
Equivalently ``(I - R) s* = r`` with ``L^T s* = L^T s_0``, the columns of ``L``
spanning the left null space of ``I - R``.

For two alternating agents this gives back ``M_B = (I - H_B)(I - H_A)``,
``v* = (I - M_B)^{-1} ((I - H_B) b_A + b_B)`` and the residuals
``e_B = (I - M_B)^{-1} (I - H_B) H_A delta``,
``e_A = -(I - M_A)^{-1} (I - H_A) H_B delta``, ``delta = w_A* - w_B*``;
``two_agent`` and ``two_agent_residuals`` compute those forms directly so the
general solver can be tested against them. All solves are linear solves,
never explicit inverses. Every array carries a leading batch axis ``B``.

Why one module: the round map, its fixed point, the residuals and the closed forms are
one derivation (docs/theory.md §2); each function uses the ones before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from misalign.model.agent import AffineMap
from misalign.model.play import Schedule


@dataclass(frozen=True)
class Prediction:
    """The predicted outcome of a batch of plays.

    Attributes:
        rho: spectral radius of the moving part of the round map, per play, shape ``(B,)``:
            of ``R`` itself, or of ``R - P_1`` where ``R`` acts as the identity on an
            eigenvalue-1 space (directions no prompt sees, docs/theory.md §2), on the part the
            play reaches (``reachable_radius``; unexcited modes out of the unit circle
            count). At least 1
            where the play does not converge; ``inf`` where a map is not finite (a
            language model's play that failed while its map was fitted).
        fixed_point: per agent, the predicted limit of its output, ``(B, d)``;
            NaN for plays that do not converge.
        residual: per agent with a target, ``fixed_point - target``, ``(B, d)``.
        covariance: with sampled agents, per agent the stationary covariance of its output,
            ``(B, d, d)`` (the mean is ``fixed_point``); empty without noise. NaN where the
            play does not converge; ``inf`` where the noise reaches the eigenvalue-1 space,
            along which the outputs then random-walk (their spread grows linearly with the
            rounds: there is no stationary covariance).
        depends_on_start: per play, whether the limit depends on the start ``s_0`` (the play
            converges and the round map has a nontrivial eigenvalue-1 space), ``(B,)``;
            all ``False`` by default.
    """

    rho: np.ndarray
    fixed_point: dict[str, np.ndarray]
    residual: dict[str, np.ndarray]
    covariance: dict[str, np.ndarray] = field(default_factory=dict)
    depends_on_start: np.ndarray = None  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.depends_on_start is None:
            object.__setattr__(self, "depends_on_start", np.zeros(np.shape(self.rho), bool))

    @property
    def converges(self) -> np.ndarray:
        """``rho < 1``, per play (``rho`` is the moving part's, so a play whose round map
        acts as the identity on an eigenvalue-1 space converges when the rest does)."""
        return self.rho < 1

    def rounds_to(self, tol: float = 1e-8) -> np.ndarray:
        """Rounds for the error to shrink by ``tol`` at the asymptotic rate ``rho`` (the moving
        part's, so the error of the part that moves; the eigenvalue-1 part never does): at least 1
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
    """The round map on the stacked outputs, blocks in ``schedule.agents`` order: the turns
    composed in order, or, in simultaneous rounds, each turn reading the previous round's outputs
    (``R_ij = a_ij A_i``, ``r_i = c_i``; each agent's noise then stays in its own block).

        Noise (docs/theory.md §6): an agent in ``noise`` adds ``eps ~ (0, Q_i)`` to each of its
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
    # simultaneous rounds read the previous round's outputs: the identity and no offset
    before = (np.eye(size, M.shape[-1]), np.zeros((batch, size))) if schedule.simultaneous else None
    for k, (name, reads) in enumerate(schedule.turns):
        f = maps[name]
        # s_i <- A_i s_j + c_i + keep_i s_i (+ eps_k), with s_j = R_j s + N_j eps + r_j block
        # j's current value (keep: a damped agent's weight on its own last output); a weighted
        # read takes sum_j a_ij s_j, a block row of weights (its weights sum to 1, so the
        # offsets mix like the outputs).
        Mk, rk = (M, r) if before is None else before
        read, offset = _mix(reads, Mk, rk, block)
        own = Mk[..., block[name], :], rk[:, block[name]]
        if f.keep is None:
            M[:, block[name]] = f.A @ read
            r[:, block[name]] = f(offset)
        else:
            M[:, block[name]] = f.A @ read + f.keep[:, None, None] * own[0]
            r[:, block[name]] = f(offset) + f.keep[:, None] * own[1]
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


def _mix(
    reads, M: np.ndarray, r: np.ndarray, block: Mapping[str, slice]
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``[R | N]`` and of ``r`` that a turn reads: block ``j``'s for one agent,
    ``sum_j a_j`` of them for a weighted read. ``M`` may be unbatched (the identity of a
    simultaneous round)."""
    if isinstance(reads, str):
        return M[..., block[reads], :], r[:, block[reads]]
    (first, a), *rest = reads
    read, offset = a * M[..., block[first], :], a * r[:, block[first]]
    for name, a in rest:
        read = read + a * M[..., block[name], :]
        offset = offset + a * r[:, block[name]]
    return read, offset


def stationary_covariance(R: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """The stationary covariance ``Sigma = R Sigma R^T + Q`` of ``s -> R s + r + xi``
    (``scipy.linalg.solve_discrete_lyapunov``, per play; needs ``rho(R) < 1``)."""
    from scipy.linalg import solve_discrete_lyapunov

    return np.stack([solve_discrete_lyapunov(a, q) for a, q in zip(R, Q, strict=True)])


def spectral_radius(M: np.ndarray) -> np.ndarray:
    """``max |eig(M)|`` per batch member."""
    return np.abs(np.linalg.eigvals(M)).max(axis=-1)


UNIT_TOL = 1e-10
"""Relative tolerance of the exact eigenvalue 1 (docs/theory.md §2).

A direction is in the null space of ``I - R`` when its singular value is at most ``max(UNIT_TOL
|I - R|_2, ROUNDING max(1, |I - R|_2))``: relative to ``I - R``, so that a play whose every
step is tiny (``eta = 1e-11``) is a slow play, not one that does not move, and never below the
rounding of ``R``'s ``O(1)`` entries. Directions no prompt sees leave ``I - R`` singular up to
rounding: at most ``2e-15`` relative over random plays with ``d <= 9``, up to three agents and
every preconditioner. A generic eigenvalue ``lambda`` leaves a singular value of about ``|1 -
lambda|`` (over the eigenvector condition number): the smallest seen over the same plays was
``1.5e-6``, and ``rho = 0.999`` or ``1 - 1e-8`` stay ordinary eigenvalues of the moving part.
The tolerance sits in the middle, about five orders from rounding and four from the slowest
generic play; only a play slower than ``1 - 1e-10`` per round would be taken for one that does
not move. The affine part has no component along the eigenvalue-1 space when ``|L^T r| <=
UNIT_TOL * max(1, |r|)`` (the floor 1 keeps the rounding of an ``r`` that is a cancelling sum
of ``O(1)`` terms from passing for a drift), the noise none when ``|L^T Q L|_2 <= UNIT_TOL *
|Q|_2`` (``Q`` is positive semidefinite: no cancellation)."""

ROUNDING = 1e-13
"""The absolute floor of a null singular value of ``I - R`` (``R = I - O(eta)``: its rounding
is absolute, about ``1e-16``, however small the steps)."""

SEMISIMPLE_TOL = 1e-6
"""The eigenvalue 1 is semisimple when the smallest singular value of ``L^T V_1`` (the
cosines between its left and right eigenspaces, orthonormal bases ``L`` and ``V_1``) exceeds
this: the spectral projection ``P_1 = V_1 (L^T V_1)^{-1} L^T`` then has norm below ``1e6``.
A Jordan block makes ``L^T V_1`` singular (left and right eigenvectors orthogonal)."""


class UnitSpace(NamedTuple):
    """The eigenvalue-1 space of a batch of round maps ``s -> R s + r`` (docs/theory.md §2).

    Attributes:
        dim: per play, the dimension ``k`` of the null space of ``I - R`` (``UNIT_TOL``), ``(B,)``.
        left: ``L``, orthonormal columns spanning the left null space of ``I - R``,
            ``(B, N d, k_max)``, zero columns past each play's ``k``.
        identity: per play, whether ``R`` acts as the identity on that space: the eigenvalue 1
            is semisimple (``SEMISIMPLE_TOL``) and ``L^T r = 0`` (``UNIT_TOL``); ``True`` where
            ``k = 0``. Where it is ``False`` and ``k > 0`` the play does not converge (a
            Jordan block grows polynomially, a drift ``L^T r`` linearly).
        projection: the spectral projection ``P_1 = V_1 (L^T V_1)^{-1} L^T`` where
            ``identity`` holds, zero elsewhere, ``(B, N d, N d)``.
    """

    dim: np.ndarray
    left: np.ndarray
    identity: np.ndarray
    projection: np.ndarray


def unit_space(R: np.ndarray, r: np.ndarray, fed: np.ndarray | None = None) -> UnitSpace:
    """Where a batch of round maps has the eigenvalue 1 exactly, from an SVD of ``I - R``.

    Only the blocks read before they are overwritten feed back: the other columns of ``R``
    are zero, ``R = [[R_FF, 0], [R_OF, 0]]`` (fed-back blocks ``F`` first), so the null
    spaces come from ``I - R_FF`` alone (``N`` times smaller for a cycle of ``N`` agents):
    right null vectors ``[x_F; R_OF x_F]``, left ones ``[y_F; 0]``. Plays with non-finite
    entries get ``k = 0`` (an SVD of inf may never return). Every play's numbers depend on
    it alone and on ``F`` (the bases are padded to ``|F|`` columns, not to the batch's
    largest ``k``), so with ``fed`` from the schedule a play predicts the same bits in any
    batch.

    Args:
        R: ``(B, N d, N d)``.
        r: ``(B, N d)``.
        fed: the columns ``F`` that may be non-zero, ``(N d,)`` (``fed_columns``); default:
            those non-zero in some play of the batch.

    Returns:
        The null spaces, whether ``R`` acts there as the identity, and the spectral projections.
    """
    batch, size, _ = R.shape
    fed = (R != 0).any(axis=(0, 1)) if fed is None else fed
    F, rest = np.flatnonzero(fed), np.flatnonzero(~fed)
    finite = np.isfinite(R).all(axis=(1, 2)) & np.isfinite(r).all(axis=1)
    # gathered blocks made C-ordered: numpy lays a gather out by the batch's size, and a
    # product of other layouts may round differently (a play's numbers would hang on its batch)
    M = np.eye(len(F)) - np.ascontiguousarray(R[:, F[:, None], F])
    if not finite.all():
        M[~finite] = 0.0
    dim = np.zeros(batch, dtype=int)
    maybe = np.flatnonzero(finite & ~_invertible(M))
    if len(maybe):
        dim[maybe] = _null_dim(np.linalg.svd(M[maybe], compute_uv=False))
    L = np.zeros((batch, size, 0))
    identity, P = dim == 0, np.zeros((batch, size, size))
    some = np.flatnonzero(dim > 0)
    if len(some) == 0:
        return UnitSpace(dim, L, identity, P)
    # singular vectors only where needed: a batched SVD with vectors costs far more
    U, sigma, Vh = np.linalg.svd(M[some])
    dim[some] = _null_dim(sigma)
    k = len(F)
    live = np.arange(k) >= (k - dim[some])[:, None]  # the last dim of the last k vectors
    Ls = np.zeros((len(some), size, k))
    Ls[:, F] = U[:, :, len(F) - k :] * live[:, None, :]
    V = np.zeros((len(some), size, k))
    V[:, F] = Vh[:, len(F) - k :, :].transpose(0, 2, 1) * live[:, None, :]
    V[:, rest] = np.ascontiguousarray(R[some][:, rest[:, None], F]) @ np.ascontiguousarray(V[:, F])
    G = Ls.transpose(0, 2, 1) @ V + np.eye(k) * ~live[:, :, None]  # identity on the padding
    semisimple = np.linalg.svd(G, compute_uv=False)[:, -1] > SEMISIMPLE_TOL
    drift = np.linalg.norm(np.einsum("bik,bi->bk", Ls, r[some]), axis=1)
    still = drift <= UNIT_TOL * np.maximum(1.0, np.linalg.norm(r[some], axis=1))
    G = np.where(semisimple[:, None, None], G, np.eye(k))  # keep the solve nonsingular
    Ps = V @ np.linalg.solve(G, Ls.transpose(0, 2, 1))
    ok = semisimple & still
    Ps[~ok] = 0.0
    L = np.zeros((batch, size, k))
    L[some], P[some], identity[some] = Ls, Ps, ok
    return UnitSpace(dim, L, identity | (dim == 0), P)


REACH_TOL = 1e-10
"""Relative tolerance of the reachable space (docs/theory.md §2, modes the play never excites).

The first difference ``v = s_1 - s_0 = (R - I) s_0 + r`` is computed from terms of size
``c = (|R|_F + 1) |s_0| + |r|``, so a mode it does not excite still carries about ``1e-16 c``
from rounding. ``v`` moves the play when ``|v| > REACH_TOL c``; the Arnoldi process on the
moving part then stops where its next residual is at most ``REACH_TOL |M|_F c / |v|`` (a
direction of ``v``'s relative weight ``REACH_TOL c / |v|`` carried through one step of ``M``):
six orders above rounding. A mode excited with less relative weight than ``REACH_TOL`` is left
out of the rate; one on the unit circle stays at that level for ever, and one outside it counts
anyway (``predict``)."""


def reachable_radius(M: np.ndarray, v: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, ...]:
    """The spectral radius of ``M`` on the Krylov space ``K(M, v) = span(v, M v, M^2 v, ...)``
    (docs/theory.md §2): Arnoldi with a second Gram-Schmidt pass builds an orthonormal basis
    ``Q_k`` and ``H_k = Q_k^T M Q_k``, stopping at ``REACH_TOL``; ``rho(H_k)`` is the radius.

    Every play's numbers depend on its own ``M``, ``v`` and ``scale`` alone (the same
    operations in any batch).

    Args:
        M: the moving part on the fed-back blocks, ``(B, m, m)``.
        v: the first difference of the play on those blocks, ``(B, m)``.
        scale: ``c``, the size of the terms ``v`` was computed from, ``(B,)``.

    Returns:
        ``rho(H_k)`` (``0`` where ``k = 0``: the play does not move; NaN where ``k = m``, the
        whole space, whose radius is ``rho(M)``), ``(B,)``, and ``k``, the dimension of the
        Krylov space, ``(B,)``.
    """
    batch, m = v.shape
    Q, H = np.zeros((batch, m, m)), np.zeros((batch, m, m))
    norm = np.linalg.norm(v, axis=1)
    alive = norm > REACH_TOL * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        Q[:, :, 0] = np.where(alive[:, None], v / norm[:, None], 0.0)
        stop = REACH_TOL * np.linalg.norm(M, axis=(1, 2)) * scale / norm
    k = np.zeros(batch, dtype=int)
    for j in range(m):
        w = (M @ Q[:, :, j, None])[..., 0]
        basis = Q[:, :, : j + 1]
        for _ in range(2):  # classical Gram-Schmidt, twice: orthogonal to rounding
            h = (basis.transpose(0, 2, 1) @ w[..., None])[..., 0]
            w = w - (basis @ h[..., None])[..., 0]
            H[:, : j + 1, j] += h
        k += alive
        if j + 1 < m:
            beta = np.linalg.norm(w, axis=1)
            alive = alive & (beta > stop)
            H[:, j + 1, j] = beta
            with np.errstate(divide="ignore", invalid="ignore"):
                Q[:, :, j + 1] = np.where(alive[:, None], w / beta[:, None], 0.0)
    rho, part = np.full(batch, np.nan), np.flatnonzero(k < m)
    inside = np.arange(m) < k[part, None]
    rho[part] = spectral_radius(H[part] * (inside[:, :, None] & inside[:, None, :]))
    return rho, k


def fed_columns(maps: Mapping[str, AffineMap], schedule: Schedule) -> np.ndarray:
    """The columns of the round map that may be non-zero, from the schedule alone: the blocks
    of the agents that feed back (``misalign.model.play.Schedule.feeds_back``) and of the damped
    agents (their weight on their own last output reads the block), ``(N d,)``."""
    d = maps[schedule.agents[0]].c.shape[1]
    fed = set(schedule.feeds_back) | {n for n in schedule.agents if maps[n].keep is not None}
    return np.repeat([name in fed for name in schedule.agents], d)


SCREEN = 1e3
"""``_invertible``'s margin: a play passes when the lower bound on the smallest singular value
of ``I - R`` exceeds the largest null tolerance by this factor."""


def _invertible(M: np.ndarray) -> np.ndarray:
    """Where ``M`` (``(B, n, n)``) is surely nonsingular at ``_null_dim``'s tolerance, from one
    inverse instead of an SVD: ``1 / |M^{-1}|_F`` is at most the smallest singular value and
    ``|M|_F`` at least the largest, so a play whose ``1 / |M^{-1}|_F`` exceeds ``SCREEN`` times
    the tolerance ``|M|_F`` allows has no null singular value (its inverse is then accurate, to
    a relative ``1e-7 * 1e-16 / UNIT_TOL``). Where it fails, ``M`` may be singular: ask the
    SVD. Plays with an exactly zero pivot (``det = 0``, where the inversion stops) fail."""
    try:
        inverse, rows = np.linalg.inv(M), slice(None)
    except np.linalg.LinAlgError:
        rows = np.flatnonzero(np.linalg.det(M) != 0)
        inverse = np.linalg.inv(M[rows])
    passed = np.zeros(len(M), dtype=bool)
    with np.errstate(all="ignore"):
        low = 1 / np.linalg.norm(inverse, axis=(1, 2))
        top = np.linalg.norm(M[rows], axis=(1, 2))
        passed[rows] = low > SCREEN * np.maximum(UNIT_TOL * top, ROUNDING * np.maximum(1.0, top))
    return passed


def _null_dim(sigma: np.ndarray) -> np.ndarray:
    """How many singular values are null (``UNIT_TOL``, ``ROUNDING``), ``sigma`` ``(B, n)``
    descending."""
    top = sigma[:, :1]
    return (sigma <= np.maximum(UNIT_TOL * top, ROUNDING * np.maximum(1.0, top))).sum(axis=1)


def predict(
    maps: Mapping[str, AffineMap],
    schedule: Schedule,
    targets: Mapping[str, np.ndarray],
    noise: Mapping[str, np.ndarray] | None = None,
    start: np.ndarray | None = None,
) -> Prediction:
    """Predict ``rho``, the fixed point and the residuals for any schedule, and with sampled
    agents the stationary covariance of every output (docs/theory.md §6).

    Directions no prompt sees (docs/theory.md §2): where ``R`` acts as the identity on its
    eigenvalue-1 space (``unit_space``), ``rho`` is the spectral radius of the moving part
    ``R - P_1`` and the limit ``s* = P_1 s_0 + (I - R + P_1)^{-1} (I - P_1) r`` (one linear
    solve; ``I - R + P_1`` is ``I - R`` on the moving part and the identity on the
    eigenvalue-1 space, so it is as well conditioned as the moving part allows) solves
    ``(I - R) s* = r`` with ``L^T s* = L^T s_0``: it depends on the start. Elsewhere it is
    the unique fixed point ``(I - R)^{-1} r`` (``P_1 = 0``, the same computation as without
    such directions). ``rho`` is the radius of ``R - P_1`` on the Krylov space the play's
    differences reach (``_rate``): modes on the unit circle it never excites (``-1`` for two
    agents reading each other, the cube roots of unity for a ring of three) do not decide it.
    With sampled agents, noise with a component along the eigenvalue-1
    space (``L^T Q L != 0``) makes the outputs random-walk there: their covariance is
    ``inf``. Noise that vanishes there (``Q L = 0``) leaves the stationary covariance
    ``Sigma = (R - P_1) Sigma (R - P_1)^T + Q`` on the complement.

    Args:
        maps: every scheduled agent's turn map.
        schedule: the round's turns.
        targets: the objective ``w*`` of every agent that has one (helpers do not), ``(B, d)``.
        noise: per sampled agent, its noise covariance ``Q_i``, ``(B, d, d)``.
        start: every agent's initial output ``v_0``, ``(B, d)`` (default zeros); only the
            limits of plays with an eigenvalue-1 space depend on it.

    Returns:
        The prediction.
    """
    batch, d = maps[schedule.agents[0]].c.shape
    if batch <= CHUNK:
        return _predict(maps, schedule, targets, noise, start)
    targets = {name: np.broadcast_to(t, (batch, d)) for name, t in targets.items()}
    start = None if start is None else np.broadcast_to(start, (batch, d))
    parts = []
    for first in range(0, batch, CHUNK):
        plays = slice(first, first + CHUNK)
        parts.append(
            _predict(
                {name: f[plays] for name, f in maps.items()},
                schedule,
                {name: t[plays] for name, t in targets.items()},
                None if noise is None else {name: q[plays] for name, q in noise.items()},
                None if start is None else start[plays],
            )
        )

    def joined(field: str) -> dict[str, np.ndarray]:
        return {
            k: np.concatenate([getattr(p, field)[k] for p in parts])
            for k in getattr(parts[0], field)
        }

    return Prediction(
        rho=np.concatenate([p.rho for p in parts]),
        fixed_point=joined("fixed_point"),
        residual=joined("residual"),
        covariance=joined("covariance"),
        depends_on_start=np.concatenate([p.depends_on_start for p in parts]),
    )


CHUNK = 2048
"""Plays predicted together: a large batch goes a chunk at a time, so that its temporaries
(several ``N d x N d`` matrices per play) are reused rather than faulted in afresh. A play's
numbers do not depend on the plays beside it (the blocks that feed back come from the
schedule, ``fed_columns``), so chunks change no bit."""


def _predict(
    maps: Mapping[str, AffineMap],
    schedule: Schedule,
    targets: Mapping[str, np.ndarray],
    noise: Mapping[str, np.ndarray] | None,
    start: np.ndarray | None,
) -> Prediction:
    """``predict`` on one chunk of plays."""
    names = schedule.agents
    R, r, Q = round_map(maps, schedule, noise)
    # a map that is not finite (a language model's play that failed while probed) predicts
    # nothing: solve a harmless stand-in (R = 0) and report rho = inf there
    unknown = ~(np.isfinite(R).all(axis=(1, 2)) & np.isfinite(r).all(axis=1))
    if Q is not None:
        unknown |= ~np.isfinite(Q).all(axis=(1, 2))
    if unknown.any():
        R, r = np.where(unknown[:, None, None], 0.0, R), np.where(unknown[:, None], 0.0, r)
        Q = None if Q is None else np.where(unknown[:, None, None], 0.0, Q)
    batch, size = r.shape
    d = size // len(names)
    start = np.zeros((batch, d)) if start is None else np.broadcast_to(start, (batch, d))
    s0 = np.concatenate([start] * len(names), axis=1)  # every agent's block starts at start
    fed = fed_columns(maps, schedule)
    unit = unit_space(R, r, fed)
    P = unit.projection
    moving = R - P  # P = 0 without an eigenvalue-1 space: exactly R
    full = _fed_radius(moving, fed)
    rho = _rate(moving, R, r, s0, fed, full)
    rho = np.where(unit.identity, rho, np.maximum(rho, 1.0))  # a Jordan block or a drift at 1
    rho[unknown] = np.inf
    ok = rho < 1
    s = np.full_like(r, np.nan)
    if ok.any():  # one computation for every play (P = 0: adds and subtracts exact zeros)
        Pk, rk = P[ok], r[ok][..., None]
        s[ok] = (Pk @ s0[ok][..., None] + np.linalg.solve(np.eye(size) - R[ok] + Pk, rk - Pk @ rk))[
            ..., 0
        ]
    blocks = {name: slice(k * d, (k + 1) * d) for k, name in enumerate(names)}
    fixed = {name: s[:, blocks[name]] for name in names}
    covariance = {}
    if Q is not None:
        sigma = np.full_like(R, np.nan)
        L = unit.left
        reach = (
            np.linalg.norm(L.transpose(0, 2, 1) @ Q @ L, ord=2, axis=(1, 2)) if L.shape[-1] else 0
        )
        walk = ok & (unit.dim > 0) & (reach > UNIT_TOL * np.linalg.norm(Q, ord=2, axis=(1, 2)))
        sigma[walk] = np.inf
        calm = ok & ~walk & (full < 1)  # else NaN: unexcited modes on the unit circle
        if calm.any():
            Pk, Qk = P[calm], Q[calm]
            unseen = (unit.dim[calm] > 0)[:, None, None]
            Qk = np.where(
                unseen,
                Qk - Pk @ Qk - Qk @ Pk.transpose(0, 2, 1) + Pk @ Qk @ Pk.transpose(0, 2, 1),
                Qk,
            )
            sigma[calm] = stationary_covariance(moving[calm], Qk)
        covariance = {name: sigma[:, blocks[name], blocks[name]] for name in names}
    return Prediction(
        rho=rho,
        fixed_point=fixed,
        residual={name: fixed[name] - targets[name] for name in names if name in targets},
        covariance=covariance,
        depends_on_start=ok & (unit.dim > 0),
    )


def _fed_radius(moving: np.ndarray, fed: np.ndarray) -> np.ndarray:
    """``rho(R - P_1)`` from its fed-back blocks ``F`` alone: its other columns are zero (those
    of ``R`` by ``fed_columns``, those of ``P_1 = V (L^T V)^{-1} L^T`` because the left null
    vectors vanish there, ``unit_space``), so in the order ``F`` first it is block triangular
    with a zero block, and its eigenvalues are those of the ``F x F`` block and zeros: for two
    agents alternating, a ``d x d`` eigenvalue problem instead of ``2 d x 2 d``."""
    F = np.flatnonzero(fed)
    if len(F) == 0:
        return np.zeros(len(moving))
    if len(F) == moving.shape[-1]:
        return spectral_radius(moving)
    return spectral_radius(np.ascontiguousarray(moving[:, F[:, None], F]))


def _rate(
    moving: np.ndarray,
    R: np.ndarray,
    r: np.ndarray,
    s0: np.ndarray,
    fed: np.ndarray,
    full: np.ndarray,
) -> np.ndarray:
    """The rate of the moving part that the play reaches (docs/theory.md §2): the differences
    ``s_{t+1} - s_t = R^t v``, ``v = (R - I) s_0 + r``, live in ``K(R - P_1, v)`` (``P_1 v``
    stays put and ``(R - P_1) P_1 = 0``), on the fed-back blocks ``F``. Where that space is all
    of ``F``, or its radius is ``full = rho(R - P_1)`` up to ``SAME_RATE``, the rate is ``full``
    (the same bits as without this rule); elsewhere ``reachable_radius``, except that modes
    outside the unit circle (``full > 1 + UNIT_TOL``) count though unexcited: rounding seeds
    them and they grow.

    Args:
        moving: ``R - P_1``, ``(B, N d, N d)``.
        R, r: the round map.
        s0: the start of every block, ``(B, N d)``.
        fed: the fed-back columns ``F``, ``(N d,)``.
        full: ``rho(R - P_1)``, ``(B,)``.

    Returns:
        ``rho``, ``(B,)``.
    """
    F = np.flatnonzero(fed)
    v = (R @ s0[..., None])[..., 0] - s0 + r
    scale = (np.linalg.norm(R, axis=(1, 2)) + 1) * np.linalg.norm(s0, axis=1)
    scale = scale + np.linalg.norm(r, axis=1)
    part = np.flatnonzero(np.isfinite(full) & (full <= 1 + UNIT_TOL))
    reached, k = reachable_radius(
        np.ascontiguousarray(moving[part][:, F[:, None], F]),
        np.ascontiguousarray(v[part][:, F]),
        scale[part],
    )
    rho = full.copy()
    rho[part] = np.where((k < len(F)) & (reached < full[part] - SAME_RATE), reached, full[part])
    return rho


SAME_RATE = 1e-12
"""``_rate``: a reachable radius within this of ``rho(R - P_1)`` is the same rate, up to the
rounding of the two eigenvalue computations (``1e-15`` for a well-conditioned eigenvalue);
``rho(R - P_1)`` is reported. Only a reachable mode within ``1e-12`` of an unexcited one on the
unit circle (a play that takes ``10^13`` rounds) would be reported at ``1 +- ulp``."""


def two_agent(A: AffineMap, B: AffineMap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed form of the alternating play ``u_t = f_A(v_{t-1})``, ``v_t = f_B(u_t)``.

    Returns:
        ``M_B = (I - H_B)(I - H_A)``, ``v* = (I - M_B)^{-1}((I - H_B) b_A + b_B)``
        and ``u* = f_A(v*)`` (docs/theory.md §2).
    """
    M_B = B.A @ A.A
    eye = np.eye(M_B.shape[-1])
    v = np.linalg.solve(eye - M_B, B.A @ A.c[..., None] + B.c[..., None])[..., 0]
    return M_B, v, A(v)


def two_agent_residuals(
    H_A: np.ndarray, H_B: np.ndarray, delta: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Equilibrium residuals of two noise-free agents from the objective gap (docs/theory.md §2).

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
    (docs/theory.md §3, the residual ``e`` of section 2 vanishes). The cases, in
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
