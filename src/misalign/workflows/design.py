"""Design advice from the theory (``misalign design``): what to change in a play so that one
agent, ``A``, ends closer to its own target, each change verified by re-simulating it.

Four items, all computed from the round map (docs/theory.md §2-3) on play 0 of the game:

- ``stability``: per agent ``i``, every interval of multipliers ``s`` of its ``eta`` (of
  ``Gamma_i``) with ``rho < 1``, the others fixed, over the whole range ``scale_range`` (every
  ``s`` keeping ``s eta`` a valid ``eta``, both directions from 1), each edge to a relative
  ``EDGE_TOL``; and the margin ``1 - rho`` now. ``Design.scan`` searches a log grid of ``rho``
  (dips between grid points, ``Design.dips``; each edge refined by batched bisection);
  ``Design.intervals`` finds the same from the scales where an eigenvalue of the round map
  crosses the circle (``Design.crossings``: one eigendecomposition per agent, then ``d x d``
  problems along the circle), with a few predictions per agent instead of thousands, and
  falls back on the grid where that does not apply. Every edge is verified by playing
  ``0.99 e`` and ``1.01 e`` (every agent's edges together, ``Design.rates``): the measured
  rate (``|s_T - s_{T-1}| / |s_{T/2} - s_{T/2-1}|`` to the power ``2 / T``, from a seeded
  random start so that every eigenvector is excited) is below 1 inside and at least 1 outside.
- ``bias``: the multiplier of ``A``'s ``eta`` over every interval of ``rho < RHO_CAP`` (so
  that the check converges in a bounded number of rounds) that minimises ``|e_A|``, A's
  distance to its target at the equilibrium (searched on A's answer at the fixed point,
  ``Design.solver``: a ``d x d`` solve per scale); verified by playing the changed configuration
  (``agents.A.eta`` set, prompts re-sampled by ``setup`` from the same seed: the same prompts)
  with its neighbours ``0.99 s`` and ``1.01 s``.
- ``prompt``: ``K`` in-context examples added to ``A``'s prompt, chosen greedily: each step
  adds the candidate input (norm ``norm``, default the typical norm ``sqrt(tr Lambda_A)``)
  whose addition gives the smallest predicted ``|e_A|``. Candidates: the eigenvectors of
  ``Lambda_A`` and ``S_A``, the right singular vectors of ``H_A`` and of every partner's
  ``H``, the gap ``w_A* - w_j*`` to every agent, the present residual ``e_A`` and
  ``(I - H_A) delta``, and ``candidates`` seeded random directions, recomputed each step
  (only those that may give the least predicted, ``Design.least``).
  An example ``x`` is labelled by A's own target, ``y = x^T w_A*`` (no noise). The prompt
  then has ``n + K`` rows: ``S_A = X^T X / (n + K)``, ``X^T y / (n + K)``, and the
  preconditioner is recomputed by the agent's own rule on the augmented prompt
  (``misalign.model.agent.preconditioner`` with ``n + K`` and the same ``eta`` and population
  covariance ``Lambda_A``: ``lsa-optimal`` changes with ``n``, ``newton`` with ``S_A``,
  ``identity`` not at all); the check plays exactly that agent. Baseline: ``K`` random
  directions of the same norm, over ``seeds`` seeds.
- ``exposure``: what a white-box attacker reading ``A`` could impose: the decoy of
  docs/theory.md §3 (``misalign.agents.attack.decoy``) puts its partner ``B`` exactly on target and
  leaves ``A`` at ``f_A(w_B*)``, so the exposure is ``|f_A(w_B*) - w_A*|``; and the ``K``
  examples (same rule as ``prompt``) that most reduce it, against the random baseline.
  Verified by playing the decoy attack on the changed configuration. Needs a two-agent
  alternating play and an invertible ``H_B``; skipped with the reason otherwise.

Scope: every agent an analytic ``gd`` agent, noise-free answers (``sampling_std = 0``), no
``[attack]`` or ``[defence]`` table (the exposure item simulates the decoy itself).

Why one module: each advice item (stability, bias, prompt, exposure) shares the batched
prediction of candidate changes and its re-simulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from misalign.agents import attack as attack_
from misalign.api import Game, predict, setup, simulate
from misalign.config import (
    MAGNITUDE,
    ConfigError,
    GradientAgentConfig,
    PlayConfig,
    parse_config,
)
from misalign.model.agent import AffineMap, GradientAgent, preconditioner
from misalign.model.prompt import Prompt
from misalign.model.theory import fed_columns, round_map
from misalign.model.theory import predict as predict_maps
from misalign.runtime.text import plural

RHO_CAP = 0.999
"""The bias item searches scales with ``rho`` at most this: the check then converges to
``1e-14`` within ``MAX_ROUNDS`` rounds."""
MAX_ROUNDS = 50_000
"""The most rounds a check plays."""
PER_DECADE = 40
"""Points per decade of scale of the first search (log-spaced over ``scale_range``)."""
EDGE_TOL = 1e-12
"""Every edge of an interval of convergence is refined to this relative width."""
DIP = 0.05
"""A local minimum of ``rho`` on the grid this close above a level is searched for a dip below
it (``Design.dips``)."""
ZOOM = 17
"""Points per refinement step (one batched prediction each)."""
TOL = 1e-8
"""Predicted and simulated values agree to this."""
BELOW, ABOVE = 0.99, 1.01
"""The stability boundary is checked at these multiples of it."""
SHORTLIST = 8
"""Candidate examples predicted together while looking for the least (``Design.least``)."""
SAMPLES = 1024
"""Points of the circle ``|lambda| = level`` (``Design.crossings``), clustered at its real ends
(``theta = 0`` and ``pi``) and refined around every eigenvalue of the round map near it."""
COND = 1e10
"""``Design.crossings`` needs the round map's eigenvectors conditioned at most this (else the
grid of ``Design.scan`` decides)."""
FIXED = 1e-9
"""A mode of the round map that agent ``i``'s step neither moves nor reads, to this relative
size, is fixed: its eigenvalue does not depend on the scale."""


def scale_range(eta: float) -> tuple[float, float]:
    """The multipliers ``s`` of a step scale ``eta`` searched: every ``s`` that keeps
    ``s eta`` a valid ``eta`` (``1 / MAGNITUDE <= s eta <= MAGNITUDE``, ``misalign.config``),
    less 2% at each end so that the checks at ``BELOW`` and ``ABOVE`` times an edge stay valid.
    ``Gamma`` is linear in ``eta`` for every preconditioner
    (``misalign.model.agent.preconditioner``),
    so this is the whole range of valid ``Gamma = s eta G``.

    Args:
        eta: the configured step scale.

    Returns:
        ``(lowest, highest)`` scale.
    """
    return 1.02 / (MAGNITUDE * eta), MAGNITUDE / (1.02 * eta)


def check(config: PlayConfig, agent: str) -> None:
    """Refuse what the advice does not cover, as one line naming the field or option.

    Raises:
        ConfigError: ``--agent`` names no agent; an agent is not ``gd`` (a language model is a
            black box, an lsa or helper agent is not a preconditioned step the advice can
            rescale); an agent is sampled; the play has an attack or a defence.
    """
    if agent not in config.agents:
        raise ConfigError(
            f"--agent: names no agent: {agent!r} (agents: {', '.join(config.agents)})"
        )
    for name, a in config.agents.items():
        if not isinstance(a, GradientAgentConfig):
            what = {
                "llm": "a black box (kind llm) without a fitted map",
                "lsa": "a trained lsa model",
                "helper": "a helper",
            }.get(a.kind, a.kind)
            raise ConfigError(f"agents.{name}.kind: {name} is {what}; design needs gd agents")
        if a.sampling_std > 0:
            raise ConfigError(
                f"agents.{name}.sampling_std: design needs noise-free answers "
                f"(got {a.sampling_std})"
            )
    for key in ("attack", "defence"):
        if getattr(config, key) is not None:
            raise ConfigError(
                f"{key}: design advises on the honest play; remove [{key}] (the exposure item "
                "simulates the decoy attack itself)"
            )


@dataclass(frozen=True)
class Line:
    """The round map as a function of one agent's turn map ``f(w) = A w + c``:
    ``R = R0 + U A V``, ``r = r0 + U (A v + c)`` (``Design.line``).

    Attributes:
        R0, r0: the round map where the agent answers 0, ``(N d, N d)`` and ``(N d,)``.
        U: where the agent's answer goes, ``(N d, d)`` (the identity on its own block).
        V, v: what the agent reads, ``(d, N d)`` and ``(d,)``.
        fed: the columns of the round map that may be non-zero (``theory.fed_columns``).
    """

    R0: np.ndarray
    r0: np.ndarray
    U: np.ndarray
    V: np.ndarray
    v: np.ndarray
    fed: np.ndarray


class Design:
    """The advice for agent ``agent`` of one play (``config``, its own seed).

    Args:
        config: the play (``check`` passes).
        agent: the agent advised, ``A``.
        norm: the norm of added examples; default ``sqrt(tr Lambda_A)``.
        seeds: random-baseline seeds.
        candidates: random candidate directions per greedy step.
    """

    def __init__(
        self,
        config: PlayConfig,
        agent: str,
        norm: float | None = None,
        seeds: int = 20,
        candidates: int = 64,
    ) -> None:
        check(config, agent)
        self.config, self.name = config, agent
        self.game = setup(config)
        self.names = self.game.schedule.agents
        self.seeds, self.candidates = seeds, candidates
        prompt = self.game.prompts[agent][0]
        self.norm = float(np.sqrt(np.trace(prompt.covariance))) if norm is None else float(norm)
        self.partner = dict(self.game.schedule.turns)[agent]
        self.random_start = np.random.default_rng([config.seed, 13]).standard_normal(config.d)
        self._lines: dict[str, Line | None] = {}
        self._modes: dict[str, tuple | None] = {}
        self._solver: tuple | None = None
        self._round = round_map(self._maps(1), self.game.schedule)[:2]

    # -- the maps of a batch of variants -----------------------------------------------------

    def _maps(
        self,
        size: int,
        scale: dict[str, np.ndarray] | None = None,
        prompts: Sequence[Prompt] | None = None,
    ) -> dict[str, AffineMap]:
        """Every agent's map over ``size`` variants: agent ``i``'s ``Gamma`` times
        ``scale[i]``, and A on ``prompts`` (one per variant) when given."""
        scale = scale or {}
        return {
            name: self._map(name, size, scale.get(name), prompts if name == self.name else None)
            for name in self.names
        }

    def _map(
        self,
        name: str,
        size: int,
        scale: np.ndarray | None = None,
        prompts: Sequence[Prompt] | None = None,
    ) -> AffineMap:
        """Agent ``name``'s map over ``size`` variants, its ``Gamma`` times ``scale`` and on
        ``prompts`` when given."""
        cfg = self.config.agents[name]
        if prompts is not None:
            gamma, S, m = _arrays(cfg, prompts)
        else:
            p = self.game.prompts[name][0]
            gamma = np.broadcast_to(self.game.agents[name].gamma[0], (size, *p.covariance.shape))
            S = np.broadcast_to(p.second_moment, gamma.shape)
            m = np.broadcast_to(p.moment, (size, p.d))
        if scale is not None:
            gamma = gamma * np.asarray(scale, dtype=float)[:, None, None]
        return GradientAgent(
            name, np.array(gamma), np.array(S), np.array(m), cfg.steps_per_turn
        ).affine()

    def _predict(self, maps: dict[str, AffineMap]):
        """The theory's prediction for a batch of variants of play 0 (its targets and start)."""
        size = maps[self.name].c.shape[0]
        targets = {
            n: np.broadcast_to(t[0], (size, t.shape[1])) for n, t in self.game.targets.items()
        }
        start = np.broadcast_to(self.game.start[0], (size, self.config.d))
        return predict_maps(maps, self.game.schedule, targets, start=start)

    def residual(self, maps: dict[str, AffineMap]) -> np.ndarray:
        """``|e_A|`` per variant; ``inf`` where the play does not converge."""
        p = self._predict(maps)
        value = np.linalg.norm(p.residual[self.name], axis=-1)
        return np.where(p.converges, value, np.inf)

    def exposure(self, maps: dict[str, AffineMap]) -> np.ndarray:
        """``|f_A(w_B*) - w_A*|`` per variant (the decoy's bias on A, docs/theory.md §3);
        ``inf`` where the play does not converge."""
        p = self._predict(maps)
        t = self.game.targets
        f = maps[self.name](np.broadcast_to(t[self.partner][0], maps[self.name].c.shape).copy())
        value = np.linalg.norm(f - t[self.name][0], axis=-1)
        return np.where(p.converges, value, np.inf)

    def rho(self, name: str, scales: np.ndarray) -> np.ndarray:
        """``rho`` with agent ``name``'s ``Gamma`` times each of ``scales``."""
        return self._predict(self._maps(len(scales), {name: scales})).rho

    # -- stability ---------------------------------------------------------------------------

    def scales(self, name: str) -> np.ndarray:
        """The scales ``s`` searched for agent ``name``: ``PER_DECADE`` log-spaced points per
        decade over ``scale_range(eta_name)``, and ``s = 1`` (the present play)."""
        lo, hi = scale_range(self.config.agents[name].eta)
        count = math.ceil(PER_DECADE * math.log10(hi / lo)) + 1
        return np.unique(np.append(np.geomspace(lo, hi, count), 1.0))

    def refine(self, name: str, brackets: np.ndarray, level: float) -> np.ndarray:
        """Each bracket ``(a, b)`` of scales with ``rho(a) < level`` on one side only, narrowed
        by batched zooms (``ZOOM`` points per bracket and step, every bracket in one
        prediction) until ``b / a - 1 <= EDGE_TOL``.

        Args:
            name: the agent whose ``Gamma`` is scaled.
            brackets: ``(E, 2)`` scales ``a < b`` with ``rho < level`` at exactly one of them.
            level: the level crossed: 1 (stability) or ``RHO_CAP`` (the bias item's range).

        Returns:
            ``(E, 2)``: per edge, the scale just inside (``rho < level``) and just outside.
        """
        a, b = brackets[:, 0].copy(), brackets[:, 1].copy()
        while len(a) and (b / a - 1 > EDGE_TOL).any():
            points = np.geomspace(a, b, ZOOM, axis=1)  # (E, ZOOM)
            inside = (self.rho(name, points.ravel()) < level).reshape(points.shape)
            flip = np.argmax(inside[:, 1:] != inside[:, :1], axis=1) + 1  # first change of side
            rows = np.arange(len(a))
            a, b = points[rows, flip - 1], points[rows, flip]
        inside_a = self.rho(name, a) < level
        return np.stack([np.where(inside_a, a, b), np.where(inside_a, b, a)], axis=1)

    def dips(self, name: str, grid: np.ndarray, rho: np.ndarray, level: float) -> np.ndarray:
        """Scales of ``rho < level`` between grid points: an interval narrower than the grid's
        step shows as a local minimum of ``rho`` on the grid just above ``level`` (two
        eigenvalues crossing, one falling and one rising through it); each such minimum
        (``level <= rho < level + DIP``) is zoomed into (batched, ``ZOOM`` points per step)
        until a point below ``level`` turns up or its bracket is narrower than ``1e-9``.

        Args:
            name: the agent whose ``Gamma`` is scaled.
            grid: the scales, increasing.
            rho: ``rho`` on ``grid``.
            level: the level.

        Returns:
            One scale of ``rho < level`` per dip found (none at a grid point).
        """
        middle = rho[1:-1]
        k = 1 + np.flatnonzero(
            (middle < rho[:-2]) & (middle <= rho[2:]) & (middle >= level) & (middle < level + DIP)
        )
        a, b = grid[k - 1], grid[k + 1]
        found = []
        while len(a) and (b / a - 1 > 1e-9).any():
            points = np.geomspace(a, b, ZOOM, axis=1)
            r = self.rho(name, points.ravel()).reshape(points.shape)
            below = (r < level).any(axis=1)
            found += [p[np.argmax(q < level)] for p, q in zip(points[below], r[below], strict=True)]
            j = np.argmin(r, axis=1)[~below]
            points, rows = points[~below], np.arange(len(j))
            a, b = points[rows, np.maximum(j - 1, 0)], points[rows, np.minimum(j + 1, ZOOM - 1)]
        return np.array(found, dtype=float)

    def scan(self, name: str, level: float = 1.0) -> list[tuple[float | None, float | None]]:
        """Every interval of scales ``s`` of agent ``name``'s ``Gamma`` (the others fixed) with
        ``rho(s) < level``, found on a grid (docs/theory.md §8): ``rho`` on ``scales(name)``,
        ``dips`` between its points, each change of side refined by ``refine`` to a relative
        ``EDGE_TOL``. ``intervals`` finds the same from the crossings and falls back on this.

        Args:
            name: the agent whose ``Gamma`` is scaled.
            level: 1 (the play converges) or ``RHO_CAP``.

        Returns:
            ``(lower, upper)`` per interval, in increasing order; each edge the scale just
            inside it; ``None`` where the interval reaches the end of ``scale_range``. Empty
            when no scale searched gives ``rho < level``.
        """
        grid = self.scales(name)
        rho = self.rho(name, grid)
        dips = self.dips(name, grid, rho, level)
        grid, order = np.unique(np.concatenate([grid, dips]), return_index=True)
        inside = np.concatenate([rho < level, np.ones(len(dips), bool)])[order]
        flips = np.flatnonzero(inside[1:] != inside[:-1])
        edges = self.refine(name, np.stack([grid[flips], grid[flips + 1]], axis=1), level)
        return _spans(inside, edges[:, 0])

    def intervals(self, name: str, level: float = 1.0) -> list[tuple[float | None, float | None]]:
        """Every interval of scales ``s`` of agent ``name``'s ``Gamma`` (the others fixed) with
        ``rho(s) < level``, as ``scan`` finds them, from the scales where an eigenvalue of the
        round map crosses the circle ``|lambda| = level`` (``crossings``): between two of
        them the side does not change, so one prediction in each stretch tells it (at its
        geometric middle; in the stretches reaching an end of the range, at most a factor 100
        from their crossing, where the prediction needs no singular value decomposition; at
        ``s = 1`` without crossings), and each
        crossing between stretches of different sides is an edge, checked by predicting just
        inside and just outside it (a relative ``EDGE_TOL`` apart; ``refine`` from a wider
        bracket where that check fails). Falls back on ``scan`` where ``crossings`` does not
        apply or a crossing cannot be bracketed.

        Args:
            name: the agent whose ``Gamma`` is scaled.
            level: 1 (the play converges) or ``RHO_CAP``.

        Returns:
            As ``scan``.
        """
        cuts = self.crossings(name, level)
        if cuts is None:
            return self.scan(name, level)
        lo, hi = scale_range(self.config.agents[name].eta)
        ends = np.concatenate([[lo], cuts, [hi]])
        middle = np.sqrt(ends[:-1] * ends[1:])  # the end stretches nearer their crossing
        if len(cuts):
            middle[0], middle[-1] = max(middle[0], cuts[0] / 100), min(middle[-1], cuts[-1] * 100)
        inside = self.rho(name, middle if len(cuts) else np.ones(1)) < level
        flips = np.flatnonzero(inside[1:] != inside[:-1])
        edges = self._bracket(name, cuts[flips], inside[flips], level)
        return self.scan(name, level) if edges is None else _spans(inside, edges)

    def _bracket(
        self, name: str, cuts: np.ndarray, upper: np.ndarray, level: float
    ) -> np.ndarray | None:
        """The scale just inside each edge: ``cut`` times ``1 -+ 0.4 EDGE_TOL`` where the
        prediction is inside there and outside at ``1 +- 0.4 EDGE_TOL``, else ``refine``d from
        ``cut (1 -+ 1e-7)``; ``None`` where even that does not straddle ``level``.

        Args:
            name: the agent whose ``Gamma`` is scaled.
            cuts: the crossings that are edges.
            upper: per edge, whether the interval lies below it.
            level: the level.
        """

        def straddle(width: float, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            near = np.stack([cuts[rows] * (1 - width), cuts[rows] * (1 + width)], axis=1)
            near = np.where(upper[rows, None], near, near[:, ::-1])  # (inside, outside)
            rho = self.rho(name, near.ravel()).reshape(near.shape)
            return near, (rho[:, 0] < level) & (rho[:, 1] >= level)

        tight, ok = straddle(0.4 * EDGE_TOL, np.arange(len(cuts)))
        edges, redo = tight[:, 0].copy(), np.flatnonzero(~ok)
        if len(redo):
            wide, straddles = straddle(1e-7, redo)
            if not straddles.all():
                return None
            edges[redo] = self.refine(name, np.sort(wide, axis=1), level)[:, 0]
        return edges

    # -- where the eigenvalues cross the circle ----------------------------------------------

    def line(self, name: str) -> Line | None:
        """Where agent ``name``'s turn map ``f(w) = A w + c`` enters the round map
        (``Line``; docs/theory.md §2: a turn replaces the agent's block by ``A`` times what it
        reads plus ``c``, and the later turns of the round are linear in that block), read off
        ``misalign.model.theory.round_map`` on ``d + 2`` variants of the agent's map (``A = 0`` with
        ``c = 0`` and ``c = e_p``; ``A = I``) and checked against the present round map.

        Args:
            name: the agent.

        Returns:
            The decomposition (cached); ``None`` where it does not hold (an agent with several
            turns a round).
        """
        if name not in self._lines:
            self._lines[name] = self._line(name)
        return self._lines[name]

    def _line(self, name: str) -> Line | None:
        d, schedule = self.config.d, self.game.schedule
        present = self._maps(1)
        size = d + 2
        maps = {n: AffineMap(f.A.repeat(size, 0), f.c.repeat(size, 0)) for n, f in present.items()}
        A, c = np.zeros((size, d, d)), np.zeros((size, d))
        c[1 : d + 1], A[-1] = np.eye(d), np.eye(d)
        maps[name] = AffineMap(A, c)
        R, r, _ = round_map(maps, schedule)
        k = self.names.index(name)
        block = slice(k * d, (k + 1) * d)
        U = (r[1 : d + 1] - r[0]).T
        line = Line(R[0], r[0], U, R[-1][block], r[-1][block], fed_columns(present, schedule))
        f, (R1, r1) = present[name], self._round
        rebuilt = line.R0 + U @ f.A[0] @ line.V
        again = line.r0 + U @ (f.A[0] @ line.v + f.c[0])
        scale = 1 + np.abs(R1).max() + np.abs(r1).max()
        if max(np.abs(rebuilt - R1[0]).max(), np.abs(again - r1[0]).max()) > 1e-12 * scale:
            return None
        return line

    def modes(self, name: str) -> tuple[np.ndarray, ...] | None:
        """The modes of the round map ``C`` of agent ``name`` answering with the identity
        (``A = I``, ``c = 0``; on the fed-back columns): ``R(s) = C + U ((I - s H)^k - I) V``
        with ``H = E F`` (``F`` the row space of ``H``, of rank ``q``), so
        ``det(lambda - R(s)) = det(lambda - C) det(I - G(s) J(lambda))`` with
        ``J(lambda) = F V (lambda - C)^{-1} U E = sum_m a_m b_m^T / (lambda - nu_m)``.

        Args:
            name: the agent.

        Returns:
            ``nu`` (``(M,)``), ``a`` (``(q, M)``), ``b`` (``(M, q)``), ``F E`` (``(q, q)``) and
            whether each mode is fixed (``FIXED``: ``a_m`` or ``b_m`` vanishes, its eigenvalue
            is one of every ``R(s)``), cached; ``None`` where ``line`` is, or the eigenvectors
            of ``C`` are worse conditioned than ``COND``.
        """
        if name not in self._modes:
            self._modes[name] = self._modes_of(name)
        return self._modes[name]

    def _modes_of(self, name: str) -> tuple[np.ndarray, ...] | None:
        line = self.line(name)
        if line is None:
            return None
        F = np.flatnonzero(line.fed)
        U, V = line.U[F], line.V[:, F]
        C = line.R0[np.ix_(F, F)] + U @ V
        nu, Z = np.linalg.eig(C)
        if not np.isfinite(nu).all():
            return None
        Zi = np.linalg.inv(Z)
        if np.linalg.norm(Z) * np.linalg.norm(Zi) > COND:  # Frobenius: at least the 2-norm's
            return None
        H = self.game.agents[name].gamma[0] @ self.game.prompts[name][0].second_moment
        left, sigma, right = np.linalg.svd(H)
        q = int((sigma > 1e-12 * sigma[0]).sum()) if sigma[0] > 0 else 0
        E, Fr = left[:, :q] * sigma[:q], right[:q]
        a, b = Fr @ V @ Z, Zi @ U @ E
        size = np.linalg.norm(Fr @ V, 2) * np.linalg.norm(U @ E, 2) * np.linalg.norm(Zi, axis=1)
        fixed = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=1) <= FIXED * size
        return nu, a, b, Fr @ E, fixed

    def crossings(self, name: str, level: float) -> np.ndarray | None:
        """The scales ``s`` in ``scale_range`` at which an eigenvalue of the round map crosses
        the circle ``|lambda| = level`` as agent ``name``'s ``Gamma`` becomes ``s Gamma``:
        ``det(I - G(s) J(lambda)) = 0`` (``modes``) is a matrix polynomial of degree ``k``
        (steps per turn) in ``t = 1 / s``, whose roots are the eigenvalues of its companion
        matrix. At ``lambda = +-level`` (``J`` real) its real roots are crossings; in between,
        a root crossing the positive real axis is one, found between ``SAMPLES`` points of the
        half circle and bisected (``_Roots.complex``).

        Args:
            name: the agent.
            level: the radius.

        Returns:
            The crossings, increasing, one per ``1e-9`` (relative); ``None`` where ``modes``
            is, where a fixed mode lies on or outside the circle (the eigenvalue 1 of
            directions no prompt sees, docs/theory.md §2), or a mode of ``C`` on it (a crossing
            at ``s = 0``) or on the unit circle (for small ``s`` the theory's rate then
            leaves out what the play never excites, or the eigenvalue 1 it does not move
            along: ``misalign.model.theory.predict``).
        """
        modes = self.modes(name)
        if modes is None:
            return None
        nu, a, b, FE, fixed = modes
        gap = np.abs(nu) / level - 1
        unit = np.abs(np.abs(nu) - 1) < 1e-6
        if (gap[fixed] >= -1e-6).any() or (np.abs(gap) < 1e-9).any() or unit.any():
            return None
        lo, hi = scale_range(self.config.agents[name].eta)
        steps = self.config.agents[name].steps_per_turn
        live = ~fixed
        roots = _Roots(nu[live], a[:, live], b[live], FE, steps, level)
        turning = roots.complex(lo, hi)
        if turning is None:
            return None
        t = np.concatenate([roots.real(), turning])
        t = t[(t > 0) & (t >= 1 / hi) & (t <= 1 / lo)]
        cuts = np.sort(1 / t)
        keep = np.concatenate([[True], cuts[1:] / cuts[:-1] - 1 > 1e-9]) if len(cuts) else []
        return cuts[keep]

    # -- bias ----------------------------------------------------------------------------------

    def best_scale(self) -> tuple[float, bool] | None:
        """The multiplier of A's ``eta`` that minimises ``|e_A|`` over every interval of
        ``rho < RHO_CAP`` (``intervals(A, RHO_CAP)``, edges refined): the least value over
        ``scales(A)`` and the refined edges, then batched zooms around it to a relative
        ``EDGE_TOL``.

        Returns:
            The scale and whether it is an edge of those intervals (within ``1e-9``); 1 (no
            change) when no scale beats the present one by a relative ``1e-9`` (a residual that
            does not depend on the scale, as against a Newton partner with ``n >= d``);
            ``None`` when no scale searched has ``rho < RHO_CAP``.
        """
        bounds = self.intervals(self.name, RHO_CAP)
        if not bounds:
            return None
        lo, hi = scale_range(self.config.agents[self.name].eta)
        lower = np.array([lo if a is None else a for a, _ in bounds])
        upper = np.array([hi if b is None else b for _, b in bounds])
        edges = np.concatenate([lower, upper])
        residual = self._capped_residual
        if self.solver() is not None:

            def residual(scales: np.ndarray) -> np.ndarray:  # inside: between the edges
                inside = ((scales[:, None] >= lower) & (scales[:, None] <= upper)).any(axis=1)
                z = self.answer(self._map(self.name, int(inside.sum()), scales[inside]))
                value = np.full(len(scales), np.inf)
                value[inside] = np.linalg.norm(z - self.game.targets[self.name][0], axis=-1)
                return value

        grid = np.union1d(self.scales(self.name), edges)
        v = residual(grid)
        k = int(np.argmin(v))
        a, b, best = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)], grid[k]
        while b / a - 1 > EDGE_TOL:
            points = np.geomspace(a, b, ZOOM)
            j = int(np.argmin(residual(points)))
            best, a, b = points[j], points[max(j - 1, 0)], points[min(j + 1, ZOOM - 1)]
        now, value = self._capped_residual(np.array([1.0, best]))
        if np.isfinite(now) and value >= now * (1 - 1e-9):
            return 1.0, False  # no scale does measurably better than the present one
        return float(best), bool((np.abs(edges / best - 1) < 1e-9).any())

    def _capped_residual(self, scales: np.ndarray) -> np.ndarray:
        """``|e_A|`` with A's ``Gamma`` times each of ``scales``; ``inf`` where
        ``rho >= RHO_CAP``."""
        p = self._predict(self._maps(len(scales), {self.name: scales}))
        value = np.linalg.norm(p.residual[self.name], axis=-1)
        return np.where(p.rho < RHO_CAP, value, np.inf)

    def solver(self) -> tuple[np.ndarray, np.ndarray] | None:
        """A's answer at the fixed point as a function of A's map alone, the others' fixed:
        with ``R = R0 + U A V`` and ``r = r0 + U (A v + c)`` (``line``), the fixed point is
        ``x = x0 + Y z`` (``(I - R0) [x0, Y] = [r0, U]``), and A's block of it is
        ``z = A (V x + v) + c``, so ``(I - A Phi) z = A q + c`` with ``Phi = V Y`` and
        ``q = V x0 + v`` (``answer``): one ``d x d`` solve per variant of A's map once
        ``I - R0`` is factorised.

        Returns:
            ``Phi`` and ``q``, cached; ``None`` where ``line`` is, ``I - R0`` or ``I - R`` is
            singular, or ``z`` of the present map differs from A's block of the solve of
            ``(I - R) x = r`` by more than a relative ``1e-9`` (an ill-conditioned ``I - R0``).
        """
        if self._solver is None:
            self._solver = (self._solver_of(),)
        return self._solver[0]

    def _solver_of(self) -> tuple[np.ndarray, np.ndarray] | None:
        line = self.line(self.name)
        if line is None:
            return None
        d, k = self.config.d, self.names.index(self.name)
        R, r = self._round
        eye = np.eye(len(r[0]))
        try:
            X = np.linalg.solve(eye - line.R0, np.column_stack([line.r0, line.U]))
            direct = np.linalg.solve(eye - R[0], r[0])[k * d : (k + 1) * d]
        except np.linalg.LinAlgError:
            return None
        solver = line.V @ X[:, 1:], line.V @ X[:, 0] + line.v
        z = _answer(*solver, self._map(self.name, 1))[0]
        if not np.linalg.norm(z - direct) <= 1e-9 * max(1.0, np.linalg.norm(direct)):
            return None
        return solver

    def answer(self, f: AffineMap) -> np.ndarray:
        """A's answer at the fixed point with A's map ``f`` (``solver``, which must not be
        ``None``).

        Args:
            f: A's maps, ``(P, d, d)`` and ``(P, d)``.

        Returns:
            ``z``, ``(P, d)``; NaN where ``I - A Phi`` is singular (so is ``I - R``).
        """
        return _answer(*self.solver(), f)

    # -- examples ------------------------------------------------------------------------------

    def augmented(self, extra: np.ndarray) -> list[Prompt]:
        """A's prompt with the rows ``extra`` (``(P, K, d)``) added, labelled ``y = x^T w_A*``:
        one prompt of ``n + K`` rows per variant."""
        p = self.game.prompts[self.name][0]
        out = []
        for rows in extra:
            X = np.concatenate([p.X, rows])
            out.append(replace(p, X=X, y=np.concatenate([p.y, rows @ p.target])))
        return out

    def directions(self, chosen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Unit candidate directions for the next example, given the ``chosen`` rows so far."""
        p = self.augmented(chosen[None])[0]
        maps = self._maps(1, prompts=[p])
        t = self.game.targets
        eye = np.eye(self.config.d)
        H = {n: eye - maps[n].A[0] for n in self.names}
        found = [np.linalg.eigh(p.covariance)[1].T, np.linalg.eigh(p.second_moment)[1].T]
        found += [np.linalg.svd(H[n])[2] for n in self.names]
        for n in self.names:
            if n != self.name:
                gap = t[self.name][0] - t[n][0]
                found += [gap[None], ((eye - H[self.name]) @ gap)[None]]
        e = self._predict(maps).residual[self.name]
        if np.isfinite(e).all():
            found.append(e)
        found.append(rng.standard_normal((self.candidates, self.config.d)))
        units = np.concatenate(found)
        size = np.linalg.norm(units, axis=1)
        return units[size > 1e-12] / size[size > 1e-12, None]

    def greedy(self, k: int, objective: Callable) -> tuple[np.ndarray, np.ndarray]:
        """``k`` examples added one at a time, each the candidate of smallest ``objective``
        (fewer when every candidate would make the play diverge).

        Returns:
            The rows ``(j, d)`` and the objective after each prefix, ``(j + 1,)``, ``j <= k``.
        """
        rng = np.random.default_rng([self.config.seed, 17])
        d = self.config.d
        chosen = np.zeros((0, d))
        curve = [float(objective(self._maps(1, prompts=self.augmented(chosen[None])))[0])]
        for _ in range(k):
            cand = self.norm * self.directions(chosen, rng)
            extra = np.concatenate(
                [np.broadcast_to(chosen, (len(cand), *chosen.shape)), cand[:, None]], axis=1
            )
            values = self.least(objective, self.augmented(extra))
            if not np.isfinite(values).any():  # every candidate makes the play diverge: stop
                break
            j = int(np.argmin(values))
            chosen = extra[j]
            curve.append(float(values[j]))
        return chosen, np.array(curve)

    def least(self, objective: Callable, prompts: Sequence[Prompt]) -> np.ndarray:
        """``objective`` on A's prompt changed to each of ``prompts`` where it may be least,
        ``inf`` elsewhere, so that its least and the first candidate reaching it are those of
        ``objective`` on every prompt. For ``residual``, ``|e_A|`` is first estimated for
        every candidate from A's answer at the fixed point (``solver``, whether or not the
        play converges); ``objective`` then predicts the candidates in increasing estimate,
        ``SHORTLIST`` at a time, until one converges, and every candidate estimated within a
        relative ``1e-9`` of the least value found. Other objectives, or without ``solver``,
        predict every candidate.

        Args:
            objective: ``residual`` or ``exposure``.
            prompts: A's prompt per candidate.

        Returns:
            The value per candidate.
        """
        if objective != self.residual or self.solver() is None:
            return objective(self._maps(len(prompts), prompts=prompts))
        z = self.answer(self._map(self.name, len(prompts), prompts=prompts))
        estimate = np.linalg.norm(z - self.game.targets[self.name][0], axis=-1)
        estimate = np.where(np.isfinite(estimate), estimate, np.inf)
        values, done = np.full(len(prompts), np.inf), np.zeros(len(prompts), dtype=bool)

        def predict_(rows: np.ndarray) -> None:
            if not len(rows):
                return
            chosen = [prompts[i] for i in rows]
            values[rows] = objective(self._maps(len(rows), prompts=chosen))
            done[rows] = True

        order = np.argsort(estimate, kind="stable")
        for first in range(0, len(order), SHORTLIST):
            predict_(order[first : first + SHORTLIST])
            if np.isfinite(values).any():
                least = values[np.isfinite(values)].min()
                predict_(np.flatnonzero(~done & (estimate <= least * (1 + 1e-9))))
                break
        return values

    def random(self, k: int, objective: Callable) -> tuple[np.ndarray, np.ndarray]:
        """The baseline: ``k`` examples of random directions (norm ``norm``) per seed.

        Returns:
            The rows ``(seeds, k, d)`` and the objective after each prefix, ``(seeds, k + 1)``.
        """
        rows = np.stack(
            [
                np.random.default_rng([self.config.seed, 19, s]).standard_normal((k, self.config.d))
                for s in range(self.seeds)
            ]
        )
        rows *= self.norm / np.linalg.norm(rows, axis=-1, keepdims=True)
        curve = np.empty((self.seeds, k + 1))
        for j in range(k + 1):
            curve[:, j] = objective(self._maps(self.seeds, prompts=self.augmented(rows[:, :j])))
        return rows, curve

    # -- the checks ----------------------------------------------------------------------------

    def changed_game(self, extra: np.ndarray, decoy: bool = False) -> Game:
        """The game set up from the configuration once per variant, with A's agent replaced by
        the agent on its augmented prompt (``extra``: ``(P, K, d)``); with ``decoy``, A's
        partner plays the white-box decoy against it (``misalign.agents.attack.decoy``, as
        ``[attack] method = "decoy"`` sets it up)."""
        size = len(extra)
        game = setup(self.config, seeds=[self.config.seed] * size)
        prompts = self.augmented(extra)
        cfg = self.config.agents[self.name]
        gamma, S, m = _arrays(cfg, prompts)
        agents = dict(game.agents)
        agents[self.name] = GradientAgent(self.name, gamma, S, m, cfg.steps_per_turn)
        game_prompts = dict(game.prompts) | {self.name: prompts}
        if decoy:
            b = self.partner
            agents[b], game_prompts[b] = attack_.decoy(
                b,
                agents[b].gamma,
                game.prompts[b],
                self.config.agents[b].steps_per_turn,
                agents[self.name].affine(),
            )
        return replace(game, agents=agents, prompts=game_prompts)

    def scaled_game(self, name: str, scales: Sequence[float]) -> Game:
        """The configuration with ``agents.<name>.eta`` times each of ``scales``, set up as one
        batch (the same seed: the same prompts)."""
        return setup(self._scaled([(name, s) for s in scales]))

    def _scaled(self, changes: Sequence[tuple[str, float]]) -> list[PlayConfig]:
        """The configuration with ``agents.<name>.eta`` times ``s``, per ``(name, s)``."""
        configs = []
        for name, s in changes:
            data = self.config.model_dump(mode="json", exclude_none=True)
            data["agents"][name]["eta"] = float(self.config.agents[name].eta * s)
            configs.append(parse_config(data))
        return configs

    def verify(self, game: Game) -> tuple[np.ndarray, np.ndarray, int]:
        """Predicted and simulated final ``|s_A - w_A*|`` per play, and the rounds played:
        enough for the error to shrink by ``1e-15`` at the slowest converging play's rate."""
        p = predict(game)
        rounds = _rounds(p.rho, self.config)
        trajectory = simulate(game, rounds=rounds)
        target = game.targets[self.name]
        predicted = np.where(p.converges, np.linalg.norm(p.residual[self.name], axis=-1), np.nan)
        simulated = trajectory.distance(self.name, target)[-1]
        simulated = np.where(trajectory.diverged_at >= 0, np.nan, simulated)
        return predicted, simulated, rounds

    def rates(
        self, pairs: Sequence[tuple[str, Sequence[float]]]
    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """The checks of stability edges: per pair of scales of one agent's ``eta``, each
        scale's ``rho`` (predicted) and rate per round measured by playing it from the seeded
        random start, ``(|s_T - s_{T-1}| / |s_{T/2} - s_{T/2-1}|)^(2 / T)``, over ``T`` rounds:
        ``30 / |log rho|`` of the pair's slower play, from 200 to 20,000 and at most what the
        record of a pair fits in 200 MB. The pairs are played together, in batches that fit in
        200 MB, each pair's rate read off its first ``T`` rounds (and, where both of its plays
        have diverged, up to the round where the last one did, as a play of the pair alone
        stops there): the same numbers as playing each pair alone.

        Args:
            pairs: ``(agent, (s1, s2))``.

        Returns:
            Per pair: ``rho`` and the measured rate of each scale, ``(2,)``, and ``T``.
        """
        configs = self._scaled([(name, s) for name, scales in pairs for s in scales])
        rho = predict(setup(configs)).rho.reshape(len(pairs), 2)
        slow = np.abs(np.log(np.clip(rho, 1e-300, None))).min(axis=1)
        rounds = np.clip(np.ceil(30 / np.maximum(slow, 1e-300)), 200, 20_000).astype(int)
        rounds = np.minimum(rounds, _memory_rounds(2, self.config))
        pair_round = 2 * len(self.config.order) * self.config.d * 8  # bytes a round of a pair
        measured = np.empty_like(rho)
        order, first = np.argsort(-rounds, kind="stable"), 0
        while first < len(order):  # the longest first, as many as fit beside it in 200 MB
            fit = max(1, int(2e8 // (rounds[order[first]] * pair_round)))
            batch = order[first : first + fit]
            first += len(batch)
            game = setup([configs[2 * k + j] for k in batch for j in (0, 1)])
            start = np.broadcast_to(self.random_start, game.start.shape).copy()
            t = simulate(replace(game, start=start), rounds=int(rounds[batch].max()))
            for i, k in enumerate(batch):
                gone = t.diverged_at[2 * i : 2 * i + 2]
                played = min(rounds[k], gone.max() + 1) if (gone >= 0).all() else rounds[k]
                half = (played - 1) // 2  # the steps s_{j+1} - s_j, j < played - 1
                at = [half - 1, half, played - 2, played - 1]
                s = np.concatenate([t.outputs(n)[at, 2 * i : 2 * i + 2] for n in self.names], -1)
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                    early, late = np.linalg.norm(s[[1, 3]] - s[[0, 2]], axis=-1)
                    measured[k] = (late / early) ** (1 / (played - 1 - half))
        return [(rho[k], measured[k], int(rounds[k])) for k in range(len(pairs))]


def _answer(Phi: np.ndarray, q: np.ndarray, f: AffineMap) -> np.ndarray:
    """``z = (I - A Phi)^{-1} (A q + c)`` per variant of ``f`` (``Design.solver``), NaN where
    ``I - A Phi`` is singular."""
    M = np.eye(len(q)) - f.A @ Phi
    z = np.full(f.c.shape, np.nan)
    with np.errstate(over="ignore", invalid="ignore"):
        ok = np.linalg.det(M) != 0
    z[ok] = np.linalg.solve(M[ok], (f.A[ok] @ q + f.c[ok])[..., None])[..., 0]
    return z


def _spans(inside: np.ndarray, edges: np.ndarray) -> list[tuple[float | None, float | None]]:
    """The intervals of ``Design.scan`` and ``Design.intervals``.

    Args:
        inside: per point or stretch of scales, in increasing order, whether ``rho < level``.
        edges: per change of side, the scale just inside it.

    Returns:
        ``(lower, upper)`` per interval, ``None`` where it reaches the end of the range.
    """
    flips = np.flatnonzero(inside[1:] != inside[:-1])
    out, lower = [], None
    for k, edge in zip(flips, edges, strict=True):
        if inside[k]:  # inside -> outside: an upper edge
            out.append((lower, float(edge)))
        else:
            lower = float(edge)
    if inside[-1]:
        out.append((lower, None))
    return out


class _Roots:
    """The roots ``t = 1 / s`` of ``det(I - G(s) J(lambda))`` (``Design.modes``) on the
    circle ``|lambda| = level``: with ``(I - s H)^k - I = E G(s) F``,
    ``G(s) = sum_j C(k, j) (-s)^j (F E)^(j - 1)``, so ``t^k det(I - G(s) J)`` is the monic
    matrix polynomial ``t^k I - sum_j C(k, j) (-1)^j t^(k - j) (F E)^(j - 1) J``.

    Args:
        nu, a, b: the modes that are not fixed (``Design.modes``).
        FE: ``F E``, ``(q, q)``.
        steps: ``k``.
        level: the radius.
    """

    def __init__(
        self, nu: np.ndarray, a: np.ndarray, b: np.ndarray, FE: np.ndarray, steps: int, level: float
    ) -> None:
        self.nu, self.a, self.b, self.FE, self.steps, self.level = nu, a, b, FE, steps, level

    def at(self, theta: np.ndarray) -> np.ndarray:
        """The ``k q`` roots at ``lambda = level e^(i theta)`` per angle, ``(P, k q)``."""
        lam = self.level * np.exp(1j * np.asarray(theta, dtype=float))
        return np.linalg.eigvals(self._companion(self._J(lam)))

    def real(self) -> np.ndarray:
        """The real roots at ``lambda = level`` and ``-level`` (``J`` is real there)."""
        if not len(self.FE):
            return np.zeros(0)
        t = np.linalg.eigvals(self._companion(self._J(self.level * np.array([1.0, -1.0])).real))
        return np.real(t[np.imag(t) == 0])

    def _J(self, lam: np.ndarray) -> np.ndarray:
        """``J(lambda) = sum_m a_m b_m^T / (lambda - nu_m)`` per ``lambda``, ``(P, q, q)``."""
        return np.einsum("pm,lm,mr->lpr", self.a, 1 / (lam[:, None] - self.nu), self.b)

    def _companion(self, J: np.ndarray) -> np.ndarray:
        """The block companion matrix of the polynomial in ``t`` per ``J``, ``(P, k q, k q)``:
        its first block row ``C(k, j) (-1)^j (F E)^(j - 1) J``, identities below it."""
        q, k = len(self.FE), self.steps
        L = np.zeros((len(J), k * q, k * q), dtype=J.dtype)
        power = np.eye(q)
        for j in range(1, k + 1):
            L[:, :q, (j - 1) * q : j * q] = math.comb(k, j) * (-1) ** j * power @ J
            power = power @ self.FE
            if j < k:
                L[:, j * q : (j + 1) * q, (j - 1) * q : j * q] = np.eye(q)
        return L

    def complex(self, lo: float, hi: float) -> np.ndarray | None:
        """The real value of every root that crosses the positive real axis, with ``1 / t``
        about within ``(lo, hi)``, as ``theta`` goes over ``(0, pi)``: ``SAMPLES`` angles
        clustered at both ends, more around the angle of every ``nu`` near the circle; the
        roots at the two ends of each interval of angles are paired by nearness (the interval
        halved while a root moves by more than a third of the roots' spacing), an interval where
        a root changes side is halved down to ``1e-9`` and the root's crossing read off by
        linear interpolation (to ``1e-18`` where the root moves smoothly); ``None`` where the
        pairing stays unsure over more than ``16 SAMPLES`` intervals."""
        if not len(self.FE):
            return np.zeros(0)
        theta = np.pi * (1 - np.cos(np.pi * np.arange(1, SAMPLES) / SAMPLES)) / 2
        gap = np.abs(np.abs(self.nu) / self.level - 1)
        close = gap < 0.1
        spread = np.maximum(gap[close], 1e-9)[:, None] * np.linspace(-8, 8, 33)
        theta = np.concatenate(
            [theta, (np.abs(np.angle(self.nu[close]))[:, None] + spread).ravel()]
        )
        theta = np.unique(theta[(theta > 0) & (theta < np.pi)])
        t = self.at(theta)
        a, b, ta, tb = theta[:-1], theta[1:], t[:-1], t[1:]
        found = []
        for _ in range(60):
            if not len(a):
                return np.concatenate(found) if found else np.zeros(0)
            if len(a) > 16 * SAMPLES:
                break
            tb, crossed, unsure = _paired(ta, tb, lo, hi)
            narrow = b - a <= 1e-9
            done = crossed.any(axis=1) & narrow
            if done.any():
                found.append(_interpolated(ta[done], tb[done], crossed[done]))
            split = (crossed.any(axis=1) & ~narrow) | (unsure & (b - a > 1e-13))
            a, b, ta, tb = a[split], b[split], ta[split], tb[split]
            mid = (a + b) / 2
            tm = self.at(mid)
            a, b = np.concatenate([a, mid]), np.concatenate([mid, b])
            ta, tb = np.concatenate([ta, tm]), np.concatenate([tm, tb])
        return None


def _paired(ta: np.ndarray, tb: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, ...]:
    """``tb`` reordered to pair each root of ``ta`` with the nearest, which roots
    cross the positive real axis between the two (with ``1 / t`` about in ``(lo, hi)``), and
    where the pairing is unsure: a root moving by more than a third of the least spacing of
    distinct roots (``1e-8`` relative apart).

    Args:
        ta, tb: the roots at the two ends of each interval of angles, ``(P, n)``.
        lo, hi: the range of scales.

    Returns:
        ``tb`` reordered; per interval and root, whether it crosses, ``(P, n)``; per interval,
        whether the pairing is unsure.
    """
    distance = np.abs(ta[:, :, None] - tb[:, None, :])
    rows, pair = np.arange(len(ta)), np.zeros(ta.shape, dtype=int)
    taken = np.zeros(ta.shape, dtype=bool)
    for j in range(ta.shape[1]):  # greedily, each root of ta to the nearest root left in tb
        pair[:, j] = np.argmin(np.where(taken, np.inf, distance[:, j]), axis=1)
        taken[rows, pair[:, j]] = True
    tb = np.take_along_axis(tb, pair, axis=1)
    moved = np.abs(tb - ta).max(axis=1)
    apart = np.abs(tb[:, :, None] - tb[:, None, :])
    size = np.abs(tb).max(axis=1)[:, None, None]
    spacing = np.where(apart > 1e-8 * size, apart, np.inf).min(axis=(1, 2))
    unsure = moved > spacing / 3
    t = (ta + tb) / 2
    near = (t.real > 0) & (np.abs(t) >= 0.5 / hi) & (np.abs(t) <= 2 / lo)
    return tb, near & (np.sign(ta.imag) != np.sign(tb.imag)), unsure


def _interpolated(ta: np.ndarray, tb: np.ndarray, crossed: np.ndarray) -> np.ndarray:
    """Where each crossing root meets the real axis, by linear interpolation between its two
    values (``_paired``)."""
    a, b = ta[crossed], tb[crossed]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(a.imag != b.imag, a.imag / (a.imag - b.imag), 0.5)
    return a.real + w * (b.real - a.real)


def _arrays(cfg: GradientAgentConfig, prompts: Sequence[Prompt]):
    """``Gamma``, ``S`` and ``X^T y / n`` of an agent on each prompt, by its own rule."""
    gamma = np.stack([preconditioner(cfg.preconditioner, p, cfg.eta) for p in prompts])
    S = np.stack([p.second_moment for p in prompts])
    m = np.stack([p.moment for p in prompts])
    return gamma, S, m


def _memory_rounds(plays: int, config: PlayConfig) -> int:
    """Rounds whose record fits in 200 MB."""
    per_round = len(config.order) * plays * config.d * 8
    return max(100, int(2e8 // per_round))


def _rounds(rho: np.ndarray, config: PlayConfig) -> int:
    """Rounds for the slowest converging play's error to shrink by ``1e-15`` (half as many
    again for transients), at least the configuration's, at most ``MAX_ROUNDS`` and what fits
    in memory."""
    ok = rho[rho < 1]
    worst = float(ok.max()) if len(ok) else 0.5
    need = 100 if worst <= 0 else math.ceil(1.5 * math.log(1e-15) / math.log(worst)) + 100
    cap = min(MAX_ROUNDS, _memory_rounds(len(rho), config))
    return int(min(max(config.rounds, need), cap))


def advise(
    config: PlayConfig,
    agent: str,
    examples: int = 3,
    norm: float | None = None,
    seeds: int = 20,
    candidates: int = 64,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Every advice item for ``agent``, each verified by re-simulation (module docstring).

    Args:
        config: the play.
        agent: the agent advised.
        examples: ``K``, examples added by the prompt and exposure items.
        norm: the added examples' norm; default ``sqrt(tr Lambda_A)``.
        seeds: random-baseline seeds.
        candidates: random candidate directions per greedy step.
        progress: called as each step starts with its name, the steps done and the steps in
            all: one per agent's stability search, the bias, the checks of the stability
            edges, the prompt and the exposure items.

    Returns:
        One JSON-ready object: ``baseline``, ``stability``, ``bias``, ``prompt``, ``exposure``.

    Raises:
        ConfigError: what ``check`` refuses, or what ``setup`` refuses.
    """
    design = Design(config, agent, norm, seeds, candidates)
    steps, done = len(design.names) + 4, 0

    def say(what: str) -> None:
        nonlocal done
        if progress is not None:
            progress(what, done, steps)
        done += 1

    a = agent
    game = design.game
    base = predict(game)
    rho0 = float(base.rho[0])
    out: dict[str, Any] = {
        "agent": a,
        "partner": design.partner,
        "examples": examples,
        "norm": design.norm,
        "seeds": seeds,
        "config_hash": config.digest(),
        "tolerance": TOL,
    }
    pred0, sim0, rounds0 = design.verify(game)
    out["baseline"] = {
        "rho": rho0,
        "converges": bool(rho0 < 1),
        "predicted": _f(pred0[0]),
        "simulated": _f(sim0[0]),
        "difference": _diff(pred0[0], sim0[0]),
        "rounds": rounds0,
    }

    bounds = {}
    for k, name in enumerate(design.names):
        say(f"stability: rho against {name}'s step scale ({k + 1} of {len(design.names)})")
        bounds[name] = design.intervals(name)

    say("bias: the step scale of least residual")
    found = design.best_scale() if bounds[a] else None
    best = None if found is None else found[0]
    if not bounds[a]:
        bias: dict[str, Any] = {"skipped": f"no scale of agents.{a}.eta makes the play converge"}
    elif found is None:
        bias = {"skipped": f"rho >= {RHO_CAP} for every scale of agents.{a}.eta"}
    else:
        best, edge = found
        scales = [1.0, best, BELOW * best, ABOVE * best]
        predicted, simulated, rounds = design.verify(design.scaled_game(a, scales))
        before = _f(predicted[0])
        bias = {
            "scale": best,
            "eta": config.agents[a].eta * best,
            "on_edge": edge,
            "before": {"predicted": before, "simulated": _f(simulated[0])},
            "predicted": _f(predicted[1]),
            "simulated": _f(simulated[1]),
            "difference": _diff(predicted[1], simulated[1]),
            "gain": _gain(before, predicted[1]),
            "neighbours": [
                {"scale": s, "predicted": _f(p), "simulated": _f(q)}
                for s, p, q in zip(scales[2:], predicted[2:], simulated[2:], strict=True)
            ],
            "rounds": rounds,
        }
    say(f"stability: checking {plural(sum(map(len, bounds.values())), 'interval')} by playing")
    checks = _checks(design, bounds)
    out["stability"] = {
        name: _stability(design, name, bounds[name], rho0, best if name == a else None, checks)
        for name in design.names
    }
    out["bias"] = bias

    if rho0 >= 1:
        why = f"the play does not converge (rho = {rho0:.6g}): see stability and bias"
        out["prompt"] = out["exposure"] = {"skipped": why}
        return out

    say(f"prompt: {plural(examples, 'example')}, greedy against {seeds} random seeds")
    out["prompt"] = _examples(design, examples, design.residual, decoy=False)

    say("exposure: the decoy's bias and the examples that reduce it")
    two = len(config.agents) == 2
    try:
        if not two:
            raise ConfigError("needs a two-agent alternating play (the decoy of §3)")
        data = config.model_dump(mode="json", exclude_none=True)
        parse_config(data | {"attack": {"agent": design.partner, "method": "decoy"}})
        out["exposure"] = _examples(design, examples, design.exposure, decoy=True)
    except ConfigError as exc:
        out["exposure"] = {"skipped": str(exc)}
    return out


def _checks(
    design: Design, bounds: dict[str, list[tuple[float | None, float | None]]]
) -> dict[tuple[str, tuple[float, float]], tuple]:
    """Every edge of every agent's intervals checked at once (``Design.rates``), keyed by
    the agent and the two scales played: ``ABOVE`` and ``BELOW`` times a lower edge (inside
    first), ``BELOW`` and ``ABOVE`` times an upper one."""
    pairs = []
    for name, spans in bounds.items():
        for lower, upper in spans:
            pairs += [] if lower is None else [(name, (ABOVE * lower, BELOW * lower))]
            pairs += [] if upper is None else [(name, (BELOW * upper, ABOVE * upper))]
    return dict(zip(pairs, design.rates(pairs) if pairs else [], strict=True))


def _stability(
    design: Design,
    name: str,
    bounds: list[tuple[float | None, float | None]],
    rho: float,
    advised: float | None,
    checks: dict[tuple[str, tuple[float, float]], tuple],
) -> dict[str, Any]:
    """The stability row of agent ``name``: every interval of convergence, each edge checked
    by playing ``BELOW`` and ``ABOVE`` times it; ``scale``, ``upper``, ``lower`` (and
    ``checks``) of the interval holding the present scale 1, else the ``advised`` one, else
    the first; ``scale = 0`` when there is none.

    Args:
        design: the advice.
        name: the agent whose ``eta`` is scaled.
        bounds: ``design.intervals(name)``.
        rho: ``rho`` of the present play.
        advised: the bias item's scale (agent A), or ``None``.
        checks: ``_checks``.

    Returns:
        The JSON-ready row.
    """
    eta = design.config.agents[name].eta
    intervals = [_checked(design, name, lower, upper, checks) for lower, upper in bounds]
    held = [i for i, (lo, hi) in enumerate(bounds) if _holds(lo, hi, 1.0)]
    held = held or [i for i, (lo, hi) in enumerate(bounds) if _holds(lo, hi, advised)]
    chosen = intervals[(held or [0])[0]] if intervals else {"lower": None, "upper": 0.0}
    upper = chosen["upper"]
    row = {
        "eta": eta,
        "scale": upper,
        "upper": upper,
        "eta_max": None if upper is None else eta * upper,
        "lower": chosen["lower"],
        "rho": rho,
        "margin": 1 - rho,
        "range": list(scale_range(eta)),
        "intervals": intervals,
    }
    if intervals:
        row["checks"] = chosen["checks"]
        row["rounds"] = max(i["rounds"] for i in intervals)
        row["verified"] = all(i["verified"] for i in intervals)
    return row


def _holds(lower: float | None, upper: float | None, scale: float | None) -> bool:
    """Whether the interval ``(lower, upper)`` (``None``: open to the end of the range)
    holds ``scale``."""
    if scale is None:
        return False
    return (lower is None or lower <= scale) and (upper is None or scale <= upper)


def _checked(
    design: Design,
    name: str,
    lower: float | None,
    upper: float | None,
    checks: dict[tuple[str, tuple[float, float]], tuple],
) -> dict[str, Any]:
    """One interval of convergence of agent ``name``'s scale and the checks of its edges
    (``_checks``): the measured rate per round below 1 just inside the edge (``ABOVE`` times
    a lower edge, ``BELOW`` times an upper one) and at least 1 just outside."""
    eta = design.config.agents[name].eta
    out: dict[str, Any] = {
        "lower": lower,
        "upper": upper,
        "eta_lower": None if lower is None else eta * lower,
        "eta_upper": None if upper is None else eta * upper,
        "checks": [],
        "rounds": 0,
    }
    for edge, at in (("lower", lower), ("upper", upper)):
        if at is None:
            continue
        scales = (ABOVE * at, BELOW * at) if edge == "lower" else (BELOW * at, ABOVE * at)
        rho, measured, rounds = checks[name, scales]
        out["rounds"] = max(out["rounds"], rounds)
        out["checks"] += [
            {
                "edge": edge,
                "scale": s,
                "inside": inside,
                "rho": float(r),
                "rate": _f(m),
                "difference": _diff(r, m),
                "converges": bool(m < 1),
            }
            for s, inside, r, m in zip(scales, (True, False), rho, measured, strict=True)
        ]
    out["verified"] = all(c["converges"] == c["inside"] for c in out["checks"])
    return out


def _examples(design: Design, k: int, objective: Callable, decoy: bool) -> dict[str, Any]:
    """The greedy examples against the random baseline, checked by playing the unchanged
    prompt, the greedy one and every seed's (the seeds as one batch)."""
    chosen, curve = design.greedy(k, objective)
    rows, baseline = design.random(k, objective)
    d = design.config.d
    # the unchanged prompt: the same game without rows (a zero row would change n)
    p0, s0, _ = design.verify(design.changed_game(np.zeros((1, 0, d)), decoy))
    p1, s1, rounds = design.verify(design.changed_game(chosen[None], decoy))
    p2, s2, more = design.verify(design.changed_game(rows, decoy))
    predicted, simulated = np.concatenate([p1, p2]), np.concatenate([s1, s2])
    rounds = max(rounds, more)
    before = float(curve[0])
    target = design.game.prompts[design.name][0].target
    final = baseline[:, -1]
    ok = np.isfinite(final)  # random examples may make the play diverge: counted apart
    good = np.isfinite(baseline)
    columns = list(zip(baseline.T, good.T, strict=True))
    curve_mean = [_f(np.mean(c[g])) if g.any() else None for c, g in columns]
    curve_std = [_f(np.std(c[g])) if g.any() else None for c, g in columns]
    checked = ok & np.isfinite(simulated[1:])
    stopped = len(chosen) < k
    return {
        "examples": chosen.tolist(),
        "stopped": f"after {len(chosen)}: every further example makes the play diverge"
        if stopped
        else None,
        "labels": (chosen @ target).tolist(),
        "preconditioner": design.config.agents[design.name].preconditioner,
        "gamma": "recomputed by the agent's own rule on the augmented prompt (n + K rows)",
        "before": {"predicted": _f(p0[0]), "simulated": _f(s0[0]), "theory": before},
        "predicted": _f(predicted[0]),
        "simulated": _f(simulated[0]),
        "difference": _diff(predicted[0], simulated[0]),
        "gain": _gain(before, predicted[0]),
        "greedy_curve": [_f(v) for v in curve],
        "baseline": {
            "seeds": design.seeds,
            "diverging": int((~ok).sum()),
            "mean": _f(np.mean(final[ok])) if ok.any() else None,
            "std": _f(np.std(final[ok])) if ok.any() else None,
            "gain_mean": _f(before - np.mean(final[ok])) if ok.any() else None,
            "curve_mean": curve_mean,
            "curve_std": curve_std,
            "simulated_mean": _f(np.mean(simulated[1:][checked])) if checked.any() else None,
            "max_difference": _f(np.max(np.abs(predicted[1:] - simulated[1:])[checked]))
            if checked.any()
            else None,
        },
        "theory_vs_check": _diff(curve[-1], predicted[0]),
        "rounds": rounds,
    }


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _diff(a, b) -> float | None:
    return _f(abs(float(a) - float(b)))


def _gain(before, after) -> dict[str, float | None]:
    """Distance before and after a change, and by how much it fell (``None``: not finite,
    as where the play diverged before the change)."""
    before, after = (math.nan if x is None else float(x) for x in (before, after))
    return {
        "before": _f(before),
        "after": _f(after),
        "absolute": _f(before - after),
        "relative": _f((before - after) / before) if before > 0 else None,
    }


COLUMNS = ("item", "change", "predicted", "simulated", "|difference|", "gain")
"""The columns of the ``misalign design`` table."""


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """The ``misalign design`` table: one row per item (per agent for stability)."""
    a, base = result["agent"], result["baseline"]
    rows = [
        (
            "now",
            f"the configuration (rho = {base['rho']:.4g})",
            _text(base["predicted"]) if base["converges"] else "diverges",
            _text(base["simulated"], missing="diverged"),
            _text(base["difference"], ".1e"),
            "-",
        )
    ]
    for name, row in result["stability"].items():
        rows.append(_stability_row(name, row))
    bias = result["bias"]
    if "skipped" in bias:
        rows.append(("bias", bias["skipped"], "-", "-", "-", "-"))
    else:
        edge = " (edge of the range searched)" if bias["on_edge"] else ""
        rows.append(
            (
                "bias",
                f"eta_{a} = {bias['eta']:.4g} (x{bias['scale']:.4g}){edge}",
                _text(bias["predicted"]),
                _text(bias["simulated"]),
                _text(bias["difference"], ".1e"),
                _gain_text(bias["gain"]),
            )
        )
    for item in ("prompt", "exposure"):
        row = result[item]
        if "skipped" in row:
            rows.append((item, row["skipped"], "-", "-", "-", "-"))
            continue
        b = row["baseline"]
        rows.append(
            (
                item,
                f"+{plural(len(row['examples']), 'greedy example')} in {a}'s prompt"
                + ("" if row["stopped"] is None else f" (stopped {row['stopped']})")
                + (f" (against {result['partner']}'s decoy)" if item == "exposure" else ""),
                _text(row["predicted"]),
                _text(row["simulated"]),
                _text(row["difference"], ".1e"),
                f"{_gain_text(row['gain'])}; random {_text(b['mean'], '.4g')} "
                f"± {_text(b['std'], '.2g')}"
                + (f" ({b['diverging']} of {b['seeds']} diverge)" if b["diverging"] else ""),
            )
        )
    return rows


def _stability_row(name: str, row: dict[str, Any]) -> tuple[str, ...]:
    """The table row of one agent's stability: its intervals of convergence, and the checks
    of the upper edge of the interval reported (of its lower edge when it has none)."""
    item = f"stability {name}"
    if not row["intervals"]:
        change = f"no eta_{name} makes the play converge (the others fixed)"
        return (item, change, "-", "-", "-", "-")
    eta = row["eta"]
    spans = [_span(name, eta, i["lower"], i["upper"]) for i in row["intervals"]]
    change = (
        spans[0] if len(spans) == 1 else f"rho < 1 on {len(spans)} intervals: " + ", ".join(spans)
    )
    if not row["checks"]:
        return (item, change, "-", "-", "-", f"margin {row['margin']:.3g}")
    edge = "upper" if row["upper"] is not None else "lower"
    inside, outside = (c for c in row["checks"] if c["edge"] == edge)
    low, high = sorted((inside, outside), key=lambda c: c["scale"])
    return (
        item,
        f"{change}; checked at x{BELOW:g}, x{ABOVE:g}"
        + ("" if edge == "upper" else " of the lower edge"),
        f"rho {low['rho']:.4f}, {high['rho']:.4f}",
        f"rate {_text(low['rate'], '.4f')}, {_text(high['rate'], '.4f')}"
        + ("" if row["verified"] else " (NOT VERIFIED)"),
        _text(max(_or_inf(low["difference"]), _or_inf(high["difference"])), ".1e"),
        f"margin 1 - rho = {row['margin']:.3g}",
    )


def _span(name: str, eta: float, lower: float | None, upper: float | None) -> str:
    """An interval of convergence as text: ``eta_A < 2.73 (x2.73)``, ``eta_A > ...`` or
    ``0.51 < eta_A < 1.0 (x1.32 to x2.6)``."""
    if lower is None and upper is None:
        return f"eta_{name}: rho < 1 at every valid eta"
    if lower is None:
        return f"eta_{name} < {eta * upper:.4g} (x{upper:.4g})"
    if upper is None:
        return f"eta_{name} > {eta * lower:.4g} (x{lower:.4g})"
    return f"{eta * lower:.4g} < eta_{name} < {eta * upper:.4g} (x{lower:.4g} to x{upper:.4g})"


def _or_inf(x: float | None) -> float:
    """A difference ready for ``max``.

    Args:
        x: a difference, ``None`` where it is not finite.

    Returns:
        ``x`` (an exact 0 stays 0), ``inf`` for ``None``.
    """
    return math.inf if x is None else x


def _text(x, fmt: str = ".6g", missing: str = "-") -> str:
    return missing if x is None else format(x, fmt)


def _gain_text(gain: dict[str, float | None]) -> str:
    rel = gain["relative"]
    tail = "" if rel is None else f" ({-rel:+.0%})"
    return f"{_text(gain['before'], '.4g')} -> {_text(gain['after'], '.4g')}{tail}"


def plot_design(result: dict[str, Any], path) -> Any:
    """The figure of ``misalign design``: A's residual before and after each change (theory
    bars, simulated markers), and the greedy examples against the random baseline over ``K``.

    Returns:
        The path written.
    """
    from misalign.outputs.figure import new_figure, save_figure

    fig, (bars, curves) = new_figure(2, (11, 4.2))
    a = result["agent"]
    labels, theory, simulated = (
        ["now"],
        [result["baseline"]["predicted"]],
        [result["baseline"]["simulated"]],
    )
    if "skipped" not in result["bias"]:
        labels.append("bias\n(eta)")
        theory.append(result["bias"]["predicted"])
        simulated.append(result["bias"]["simulated"])
    for item, name in (("prompt", "prompt"), ("exposure", "decoy")):
        row = result[item]
        if "skipped" in row:
            continue
        if item == "exposure":
            labels.append("decoy\nnow")
            theory.append(row["before"]["predicted"])
            simulated.append(row["before"]["simulated"])
        labels += [f"{name}\ngreedy", f"{name}\nrandom"]
        theory += [row["predicted"], row["baseline"]["mean"]]
        simulated += [row["simulated"], row["baseline"]["simulated_mean"]]
    x = np.arange(len(labels))
    t = np.array([np.nan if v is None else v for v in theory], dtype=float)
    s = np.array([np.nan if v is None else v for v in simulated], dtype=float)
    bars.bar(x, t, color="0.75", label="theory")
    bars.plot(x, s, "o", color="C3", label="simulated")
    bars.set_xticks(x, labels, fontsize="small")
    bars.set(ylabel=f"{a}'s final distance to its target", title=f"{a}'s residual per change")
    k = np.arange(result["examples"] + 1)
    for item, color, style in (("prompt", "C0", "-"), ("exposure", "C1", "--")):
        row = result[item]
        if "skipped" in row:
            continue
        what = f"|e_{a}|" if item == "prompt" else "decoy exposure"
        greedy = [np.nan if v is None else v for v in row["greedy_curve"]]
        shown = k[: len(greedy)]
        curves.plot(shown, greedy, style, color=color, marker="o", label=f"{what} greedy")
        mean, std = (
            np.array([np.nan if v is None else v for v in row["baseline"][key]], dtype=float)
            for key in ("curve_mean", "curve_std")
        )
        curves.plot(k, mean, ":", color=color, label=f"{what} random (mean ± std)")
        curves.fill_between(k, mean - std, mean + std, color=color, alpha=0.15)
    curves.set_xticks(k)
    curves.set(
        xlabel="examples added (K)",
        ylabel="predicted distance",
        title=f"greedy vs random examples ({result['seeds']} seeds)",
    )
    return save_figure(fig, path)
