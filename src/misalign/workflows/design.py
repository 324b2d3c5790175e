"""Design advice from the theory (``misalign design``): what to change in a play so that one
agent, ``A``, ends closer to its own target, each change verified by re-simulating it.

Four items, all computed from the round map (docs/theory.md §2-3) on play 0 of the game:

- ``stability``: per agent ``i``, every interval of multipliers ``s`` of its ``eta`` (of
  ``Gamma_i``) with ``rho < 1``, the others fixed, over the whole range ``scale_range`` (every
  ``s`` keeping ``s eta`` a valid ``eta``, both directions from 1): ``rho`` on a log grid,
  dips between grid points (``Design.dips``), each edge refined by batched bisection to a
  relative ``EDGE_TOL``; and the margin ``1 - rho`` now. Every edge is verified by playing
  ``0.99 e`` and ``1.01 e``: the measured rate
  (``|s_T - s_{T-1}| / |s_{T/2} - s_{T/2-1}|`` to the power ``2 / T``, from a seeded random
  start so that every eigenvector is excited) is below 1 inside and at least 1 outside.
- ``bias``: the multiplier of ``A``'s ``eta`` over every interval of ``rho < RHO_CAP`` (so
  that the check converges in a bounded number of rounds) that minimises ``|e_A|``, A's
  distance to its target at the equilibrium; verified by playing the changed configuration
  (``agents.A.eta`` set, prompts re-sampled by ``setup`` from the same seed: the same prompts)
  with its neighbours ``0.99 s`` and ``1.01 s``.
- ``prompt``: ``K`` in-context examples added to ``A``'s prompt, chosen greedily: each step
  adds the candidate input (norm ``norm``, default the typical norm ``sqrt(tr Lambda_A)``)
  whose addition gives the smallest predicted ``|e_A|``. Candidates: the eigenvectors of
  ``Lambda_A`` and ``S_A``, the right singular vectors of ``H_A`` and of every partner's
  ``H``, the gap ``w_A* - w_j*`` to every agent, the present residual ``e_A`` and
  ``(I - H_A) delta``, and ``candidates`` seeded random directions, recomputed each step.
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
from dataclasses import replace
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
        maps = {}
        for name in self.names:
            cfg = self.config.agents[name]
            if name == self.name and prompts is not None:
                gamma, S, m = _arrays(cfg, prompts)
            else:
                p = self.game.prompts[name][0]
                gamma = np.broadcast_to(
                    self.game.agents[name].gamma[0], (size, *p.covariance.shape)
                )
                S = np.broadcast_to(p.second_moment, gamma.shape)
                m = np.broadcast_to(p.moment, (size, p.d))
            if name in scale:
                gamma = gamma * np.asarray(scale[name], dtype=float)[:, None, None]
            maps[name] = GradientAgent(
                name, np.array(gamma), np.array(S), np.array(m), cfg.steps_per_turn
            ).affine()
        return maps

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

    def intervals(self, name: str, level: float = 1.0) -> list[tuple[float | None, float | None]]:
        """Every interval of scales ``s`` of agent ``name``'s ``Gamma`` (the others fixed) with
        ``rho(s) < level``: ``rho`` on the grid ``scales(name)``, each change of side refined by
        ``refine`` to a relative ``EDGE_TOL``.

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
        out, lower = [], None
        for k, (edge, _) in zip(flips, edges, strict=True):
            if inside[k]:  # inside -> outside: an upper edge
                out.append((lower, float(edge)))
            else:
                lower = float(edge)
        if inside[-1]:
            out.append((lower, None))
        return out

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
        edges = np.array(
            [lo if a is None else a for a, _ in bounds]
            + [hi if b is None else b for _, b in bounds]
        )
        grid = np.union1d(self.scales(self.name), edges)
        v = self._capped_residual(grid)
        k = int(np.argmin(v))
        a, b, best = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)], grid[k]
        while b / a - 1 > EDGE_TOL:
            points = np.geomspace(a, b, ZOOM)
            j = int(np.argmin(self._capped_residual(points)))
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
            values = objective(self._maps(len(cand), prompts=self.augmented(extra)))
            if not np.isfinite(values).any():  # every candidate makes the play diverge: stop
                break
            j = int(np.argmin(values))
            chosen = extra[j]
            curve.append(float(values[j]))
        return chosen, np.array(curve)

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
        data = self.config.model_dump(mode="json", exclude_none=True)
        configs = []
        for s in scales:
            data["agents"][name]["eta"] = float(self.config.agents[name].eta * s)
            configs.append(parse_config(data))
        return setup(configs)

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

    def rate(self, game: Game, rho: np.ndarray) -> tuple[np.ndarray, int]:
        """The measured rate per round of every play, from the seeded random start."""
        game = replace(game, start=np.broadcast_to(self.random_start, game.start.shape).copy())
        slow = np.abs(np.log(np.clip(rho, 1e-300, None)))
        rounds = int(np.clip(np.ceil(30 / max(slow.min(), 1e-300)), 200, 20_000))
        rounds = min(rounds, _memory_rounds(len(game.configs), self.config))
        t = simulate(game, rounds=rounds)
        s = np.concatenate([t.outputs(n) for n in self.names], axis=-1)
        step = np.linalg.norm(np.diff(s, axis=0), axis=-1)  # (rounds - 1, plays)
        half = len(step) // 2
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            measured = (step[-1] / step[half - 1]) ** (1 / (len(step) - half))
        return measured, rounds


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
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every advice item for ``agent``, each verified by re-simulation (module docstring).

    Args:
        config: the play.
        agent: the agent advised.
        examples: ``K``, examples added by the prompt and exposure items.
        norm: the added examples' norm; default ``sqrt(tr Lambda_A)``.
        seeds: random-baseline seeds.
        candidates: random candidate directions per greedy step.
        progress: called with the name of each stage as it starts.

    Returns:
        One JSON-ready object: ``baseline``, ``stability``, ``bias``, ``prompt``, ``exposure``.

    Raises:
        ConfigError: what ``check`` refuses, or what ``setup`` refuses.
    """
    say = progress or (lambda _: None)
    design = Design(config, agent, norm, seeds, candidates)
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

    say("stability: rho against each agent's step scale")
    bounds = {name: design.intervals(name) for name in design.names}

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
    out["stability"] = {
        name: _stability(design, name, bounds[name], rho0, best if name == a else None)
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


def _stability(
    design: Design,
    name: str,
    bounds: list[tuple[float | None, float | None]],
    rho: float,
    advised: float | None,
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

    Returns:
        The JSON-ready row.
    """
    eta = design.config.agents[name].eta
    intervals = [_checked(design, name, lower, upper) for lower, upper in bounds]
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


def _checked(design: Design, name: str, lower: float | None, upper: float | None) -> dict[str, Any]:
    """One interval of convergence of agent ``name``'s scale and the checks of its edges, one
    play of each edge's two checks (so that both run the rounds their ``rho`` needs): the
    measured rate per round (``Design.rate``) below 1 just inside the edge (``ABOVE`` times a
    lower edge, ``BELOW`` times an upper one) and at least 1 just outside."""
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
        scales = [ABOVE * at, BELOW * at] if edge == "lower" else [BELOW * at, ABOVE * at]
        checked = design.scaled_game(name, scales)
        rho = predict(checked).rho
        measured, rounds = design.rate(checked, rho)
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
        what = "|e_A|" if item == "prompt" else "decoy exposure"
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
