"""Agents: maps from the incoming estimate ``w`` to the agent's next output.

Every agent, analytic or not, answers a batch of independent plays at once:
``respond(w, turn)`` takes ``w`` of shape ``(B, d)`` and returns ``(B, d)``.
An agent may be a black box (``affine()`` returns ``None``), may keep state
across turns (``start`` resets it; ``turn`` carries the play's history) and may
be slow (one call per turn serves the whole batch, so it can fan out itself).

The analytic agent takes ``k`` preconditioned gradient steps on its prompt
(docs/theory.md §1)::

    f(w) = w - Gamma X^T (X w - y) / n = (I - H) w + b,   H = Gamma S,  b = Gamma X^T y / n

and ``k`` steps compose to ``A = (I - H)^k``, ``c = sum_{j<k} (I - H)^j b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from misalign.model.philox import SAMPLING, normals
from misalign.model.prompt import Prompt
from misalign.runtime import device

Preconditioner = Literal["identity", "lsa-optimal", "newton"]


EINSUM_D = 16
"""``AffineMap.__call__`` multiplies with ``einsum`` up to this dimension, ``matmul`` above."""


@dataclass(frozen=True)
class AffineMap:
    """A batch of affine maps ``f(w) = A w + c``.

    A turn of agent ``i`` reading agent ``j`` is ``s_i <- A s_j + c + keep s_i``: ``keep``
    weighs the agent's own last output, as a damped agent does (``misalign.agents.defence.Damped``);
    ``__call__`` gives ``A w + c``.

    Attributes:
        A: shape ``(B, d, d)``.
        c: shape ``(B, d)``.
        keep: per play, the weight on the agent's own last output, ``(B,)``; ``None``: 0.
    """

    A: np.ndarray
    c: np.ndarray
    keep: np.ndarray | None = None

    @property
    def H(self) -> np.ndarray:
        """``H = I - A``: the agent's step matrix (docs/theory.md §1); with ``keep``,
        ``(1 - keep) I - A``, so that the fixed points solve ``H w = c`` either way (a damped
        agent's ``H`` is ``beta`` times its undamped one)."""
        eye = device.eye(self.A.shape[-1], self.A)
        kept = 0.0 if self.keep is None else self.keep[:, None, None] * eye
        return eye - kept - self.A

    def __call__(self, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``A w + c`` for a batch ``w`` of shape ``(B, d)``, written into ``out`` when given.

        The product is ``einsum``'s up to ``EINSUM_D`` dimensions (on a large batch, 3x
        ``matmul``'s speed at ``d = 2``, 1.9x at 4, 1.1x at 10, measured on numpy 2.4) and
        ``matmul``'s above it (where ``einsum`` falls behind): chosen by ``d`` alone, so a
        play's numbers do not depend on the batch around it. On torch tensors, ``baddbmm``
        (``c + A w`` in one kernel)."""
        if not device.is_numpy(w):  # c + A w in one kernel, into out
            out = self.c.new_empty(self.c.shape) if out is None else out
            torch = device.namespace(w)
            torch.baddbmm(self.c[..., None], self.A, w[..., None], out=out[..., None])
            return out
        out = np.empty_like(self.c) if out is None else out
        if w.shape[-1] <= EINSUM_D:
            np.einsum("bij,bj->bi", self.A, w, out=out)
        else:
            np.matmul(self.A, w[..., None], out=out[..., None])
        out += self.c
        return out

    def __getitem__(self, plays) -> AffineMap:
        """The maps of a subset of the plays (any numpy index on the batch axis)."""
        return AffineMap(
            self.A[plays], self.c[plays], None if self.keep is None else self.keep[plays]
        )

    def host(self) -> AffineMap:
        """The maps as numpy arrays (itself when they are; tensors are copied off their
        device)."""
        if device.is_numpy(self.A):
            return self
        keep = None if self.keep is None else device.host(self.keep)
        return AffineMap(device.host(self.A), device.host(self.c), keep)

    def power(self, k: int) -> AffineMap:
        """The ``k``-fold composition ``f o ... o f`` (its first factor is ``f`` itself: ``A I``
        and ``A 0 + c`` are ``A`` and ``c``, the same numbers)."""
        if k == 0:
            xp = device.namespace(self.A)
            eye = xp.zeros_like(self.A) + device.eye(self.A.shape[-1], self.A)
            return AffineMap(eye, xp.zeros_like(self.c))
        A, c = self.A, self.c
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is checked by the caller
            for _ in range(k - 1):
                A, c = self.A @ A, self(c)
        return AffineMap(A, c)


@dataclass(frozen=True)
class Turn:
    """What an agent may see when it takes a turn.

    Attributes:
        round: the round index, from 0.
        position: the turn's index within the round's schedule.
        reads: the name of the agent whose last output is the input, or a weighted mix
            ``((agent, weight), ...)`` of several (``misalign.model.play.Mix``).
        past: the output of every earlier turn of the play, shape ``(turns_so_far, B, d)``.
        order: the agent taking each turn of a round, in schedule order.
        out: where the play records this turn's output, shape ``(B, d)``; an agent may
            write its answer there and return it, saving a copy.
        start: every agent's initial output ``v_0``, shape ``(B, d)``.
    """

    round: int
    position: int
    reads: str | tuple[tuple[str, float], ...]
    past: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0)))
    order: tuple[str, ...] = ()
    out: np.ndarray | None = None
    start: np.ndarray | None = None

    def outputs(self, name: str) -> np.ndarray:
        """Every earlier output of agent ``name``, shape ``(turns, B, d)``."""
        per_round = len(self.order)
        positions = [k for k, agent in enumerate(self.order) if agent == name]
        if len(positions) == 1:
            return self.past[positions[0] :: per_round]  # a view, no copy
        rows = [r for r in range(len(self.past)) if self.order[r % per_round] == name]
        return self.past[rows]

    def pairs(self, name: str, reads: str) -> tuple[np.ndarray, np.ndarray]:
        """Every earlier ``(input, output)`` pair of agent ``name``, which reads agent ``reads``.

        Each output of ``name`` is paired with the latest output of ``reads`` before it
        (``start`` while ``reads`` has not moved yet): the data to fit ``name``'s map.

        Returns:
            ``inputs`` and ``outputs``, each ``(pairs, B, d)``.
        """
        per_round, last = len(self.order), None
        inputs, outputs = [], []
        for row in range(len(self.past)):
            who = self.order[row % per_round]
            if who == name and (last is not None or self.start is not None):
                inputs.append(self.start if last is None else self.past[last])
                outputs.append(self.past[row])
            if who == reads:
                last = row
        if not outputs:
            return self.past[:0], self.past[:0]
        return np.stack(inputs), np.stack(outputs)


@runtime_checkable
class Agent(Protocol):
    """What every agent implements: analytic, trained, language model, attacker, helper."""

    name: str

    def start(self, batch: int) -> None:
        """Reset any state before a play of ``batch`` independent instances."""

    def respond(self, w: np.ndarray, turn: Turn) -> np.ndarray:
        """The agent's output for the incoming estimates ``w`` (shape ``(B, d)``)."""

    def affine(self) -> AffineMap | None:
        """The agent's turn map ``f(w) = A w + c`` when it has one, else ``None`` (black box)."""

    @property
    def gamma(self) -> np.ndarray | None:
        """The effective preconditioner ``Gamma`` (``(B, d, d)``), or ``None`` for black boxes."""


def preconditioner(
    kind: Preconditioner, prompt: Prompt, eta: float | np.ndarray = 1.0
) -> np.ndarray:
    """The preconditioner ``Gamma`` of an analytic agent (docs/theory.md §1).

    Args:
        kind: ``identity`` (``eta I``), ``newton`` (``eta S^+``: with ``n >= d`` the
            Newton step ``H = eta I``; with ``n < d`` ``H`` projects on the row space of ``X``),
            or ``lsa-optimal``, the optimum of a trained linear self-attention layer,
            ``eta ((n+1)/n Lambda + tr(Lambda)/n I)^{-1}`` (isotropic: ``eta n/(n+d+1) I``).
        prompt: the agent's prompt, or a batch of them (``misalign.model.prompt.sample_prompts``);
            ``Lambda`` is its population covariance.
        eta: step scale, one or one per play of a batch.

    Returns:
        ``Gamma``, shape ``(d, d)``, or ``(B, d, d)`` for a batch.
    """
    n, d, like = prompt.n, prompt.d, prompt.X
    eta = device.on(np.reshape(eta, (*np.shape(eta), 1, 1)), like)
    xp = device.namespace(like)
    if kind == "identity":
        return eta * device.broadcast(np.eye(d), prompt.covariance.shape, like)
    if kind == "newton":
        if xp is np:
            return eta * np.linalg.pinv(prompt.second_moment, hermitian=True)
        # numpy's cutoff (rcond 1e-15), not torch's default d * eps
        return eta * xp.linalg.pinv(prompt.second_moment, hermitian=True, rtol=1e-15)
    if kind == "lsa-optimal":
        covariance = prompt.covariance
        if covariance.ndim == 3 and device.shared(covariance):  # one for the batch: one solve
            return eta * device.broadcast(
                lsa_optimal_gamma(covariance[0], n), covariance.shape, like
            )
        return eta * lsa_optimal_gamma(covariance, n)
    raise ValueError(f"unknown preconditioner {kind!r}")


def lsa_optimal_gamma(covariance: np.ndarray, n: int) -> np.ndarray:
    """``Gamma* = ((n+1)/n Lambda + tr(Lambda)/n I)^{-1}``: the preconditioner of a linear
    self-attention layer trained on ``x ~ N(0, Lambda)``, ``w ~ N(0, I)`` (docs/theory.md §1);
    of each covariance of a stack ``(B, d, d)``, one solve each.

    It minimises the ICL loss ``L(Gamma) = E (x_q^T (Gamma S - I) w)^2``, whose gradient
    vanishes at ``Gamma E[S^2] = Lambda`` with the Wishart moment
    ``E[S^2] = (n+1)/n Lambda^2 + tr(Lambda)/n Lambda``.
    """
    eye = device.eye(covariance.shape[-1], covariance)
    trace = covariance.diagonal(0, -2, -1).sum(-1)[..., None, None]
    moment = (n + 1) / n * covariance + trace / n * eye
    xp = device.namespace(covariance)
    return xp.linalg.solve(moment, device.broadcast(eye, moment.shape, covariance))


def icl_loss(gamma: np.ndarray, covariance: np.ndarray, n: int) -> float:
    """The exact ICL loss ``E (x_q^T (Gamma S - I) w)^2`` of the prediction
    ``x_q^T Gamma X^T y / n``, ``x ~ N(0, Lambda)``, ``w ~ N(0, I)``, noise-free labels:
    ``tr(Lambda Gamma E[S^2] Gamma^T) - 2 tr(Lambda Gamma Lambda) + tr(Lambda)``. At
    ``Gamma*`` it is ``tr(Lambda) - tr(Lambda Gamma* Lambda)``; isotropic: ``d(d+1)/(n+d+1)``."""
    Lam = covariance
    second = (n + 1) / n * Lam @ Lam + np.trace(Lam) / n * Lam
    return float(
        np.trace(Lam @ gamma @ second @ gamma.T) - 2 * np.trace(Lam @ gamma @ Lam) + np.trace(Lam)
    )


class GradientAgent:
    """An analytic agent: ``steps_per_turn`` preconditioned gradient steps on its own prompt.

    Args:
        name: the agent's name.
        gamma: preconditioners, shape ``(B, d, d)``.
        second_moment: ``S = X^T X / n`` per play, shape ``(B, d, d)``.
        moment: ``X^T y / n`` per play, shape ``(B, d)``.
        steps_per_turn: ``k``, the number of steps per turn.
    """

    def __init__(
        self,
        name: str,
        gamma: np.ndarray,
        second_moment: np.ndarray,
        moment: np.ndarray,
        steps_per_turn: int = 1,
    ) -> None:
        self.name = name
        self._gamma = gamma
        xp, A = device.namespace(gamma), gamma @ second_moment
        xp.subtract(device.eye(gamma.shape[-1], gamma), A, out=A)  # I - Gamma S, in place
        step = AffineMap(A=A, c=xp.einsum("bij,bj->bi", gamma, moment))
        self._map = step.power(steps_per_turn)

    @classmethod
    def on_prompts(
        cls, name: str, gamma: np.ndarray, prompts: Sequence[Prompt], steps_per_turn: int = 1
    ) -> GradientAgent:
        """The agent whose play ``i`` holds ``prompts[i]`` and preconditioner ``gamma[i]``."""
        return cls(
            name,
            gamma,
            np.stack([p.second_moment for p in prompts]),
            np.stack([p.moment for p in prompts]),
            steps_per_turn,
        )

    @property
    def gamma(self) -> np.ndarray:
        return self._gamma

    def start(self, batch: int) -> None:
        if batch != self._map.c.shape[0]:
            raise ValueError(f"agent {self.name} holds {self._map.c.shape[0]} plays, not {batch}")

    def respond(self, w: np.ndarray, turn: Turn) -> np.ndarray:
        return self._map(w, out=turn.out)

    def affine(self) -> AffineMap:
        return self._map


class Wrapper:
    """An agent around another: what the agent beneath declares (an attacker's
    ``probe_turns``, its preconditioner...) stays visible through it."""

    inner: Agent

    def __getattr__(self, key: str):
        if key == "inner":  # not set yet: no recursion
            raise AttributeError(key)
        return getattr(self.inner, key)


class Sampled(Wrapper):
    """A sampled agent: answers ``f(w) + eps``, ``eps ~ N(0, std^2 I)`` independent across
    turns and plays (docs/theory.md §6), around any agent with a map ``f``.

    The noise of play ``i``'s ``k``-th answer since ``start`` is the counter-based draw of
    ``(seeds[i], name, SAMPLING, k)`` (``misalign.model.philox``): independent across plays
    and turns, and play ``i`` of a batch is the single run of its seed, bit for bit.

    Args:
        inner: the agent whose answers are perturbed.
        std: the noise's standard deviation.
        seeds: the plays' seeds, ``(B,)``.
    """

    def __init__(self, inner: Agent, std: float, seeds: Sequence[int]) -> None:
        self.inner, self.name, self.std, self.seeds = inner, inner.name, std, seeds
        self._answers = 0

    @property
    def gamma(self) -> np.ndarray | None:
        return self.inner.gamma

    def noise_covariance(self) -> np.ndarray:
        """``Q = std^2 I`` per play, ``(B, d, d)``, plus any noise of the agent beneath."""
        batch, d = self.inner.affine().c.shape
        own = np.broadcast_to(self.std**2 * np.eye(d), (batch, d, d))
        inner = noise_covariance(self.inner)
        return own if inner is None else own + inner

    def start(self, batch: int) -> None:
        self.inner.start(batch)
        self._answers = 0

    def respond(self, w: np.ndarray, turn: Turn) -> np.ndarray:
        answer = self.inner.respond(w, turn)
        on = None if device.is_numpy(answer) else answer.device
        noise = normals(
            self.seeds, self.name, SAMPLING, answer.shape[1:], turn=self._answers, device=on
        )
        self._answers += 1
        return answer + self.std * noise

    def affine(self) -> AffineMap | None:
        return self.inner.affine()


@dataclass(frozen=True)
class Fitted:
    """A black box's fitted map and answer noise (``misalign.llm.fit``)."""

    map: AffineMap
    noise: np.ndarray | None


class BlackBox:
    """An agent whose map is not known but fitted from probes (docs/theory.md §7): a language
    model (``misalign.llm.agent.LLMAgent``) or a learned nonlinear model
    (``misalign.agents.transformer.TransformerAgent``).

    What the fit (``misalign.llm.fit``) reads of it: ``name``; ``config.probes``,
    ``config.samples``, ``config.refits``; ``seeds`` (one per play); ``ask`` (answers to
    ``(play, estimate, slot)`` requests); ``history`` (the play's turns since ``start``:
    inputs read and answers, ``(B, d)`` each); ``deterministic`` (its answers do not vary,
    so a check allows no noise). It sets ``fitted``; ``affine`` and ``noise_covariance`` then
    give the fitted map and noise.
    """

    fitted: Fitted | None = None
    deterministic: bool = False
    history: list[tuple[np.ndarray, np.ndarray]]

    @property
    def gamma(self) -> None:
        return None

    def default_probes(self, d: int) -> int:
        """Probes per fit where ``probes`` is not set: ``2 d``, the two-sided star of one
        rotation (``misalign.llm.fit``)."""
        return 2 * d

    def affine(self) -> AffineMap | None:
        """The fitted map, or ``None`` before the fit."""
        return None if self.fitted is None else self.fitted.map

    def noise_covariance(self) -> np.ndarray | None:
        """The fitted covariance of the answers around the map (``samples > 1``)."""
        return None if self.fitted is None else self.fitted.noise


def black_boxes(agents: dict[str, Agent]) -> dict[str, BlackBox]:
    """The black boxes among ``agents``, beneath any wrapper.

    Args:
        agents: a game's agents by name.

    Returns:
        The black boxes by name, in the order of ``agents``.
    """
    found = {}
    for name, agent in agents.items():
        while isinstance(agent, Wrapper):
            agent = agent.inner
        if isinstance(agent, BlackBox):
            found[name] = agent
    return found


def noise_covariance(agent: Agent) -> np.ndarray | None:
    """The covariance ``Q_i`` of the noise an agent adds to its answers, ``(B, d, d)``, through
    any wrappers (each declares what the agent beneath it does); ``None`` for a noise-free agent."""
    declared = getattr(agent, "noise_covariance", None)
    return None if declared is None else declared()


def fit_affine(
    agent: Agent, d: int, batch: int, probes: int | None = None, seed: int = 0
) -> AffineMap:
    """Fit ``f(w) ~ A w + c`` to a black-box agent by least squares on random probes.

    Each probe is answered as a fresh one-turn play (``start`` is called first),
    so the fit is exact for a stateless affine agent and a least-squares
    estimate for a noisy one (docs/theory.md §1, language-model agents).

    Args:
        agent: the agent to probe.
        d: dimension.
        batch: the number of plays the agent holds.
        probes: number of probe inputs (at least ``d + 1``; default ``2 (d + 1)``).
        seed: seed of the probe inputs.

    Returns:
        The fitted map, batched like the agent.
    """
    probes = 2 * (d + 1) if probes is None else probes
    if probes < d + 1:
        raise ValueError(f"need at least d + 1 = {d + 1} probes, got {probes}")
    W = np.random.default_rng(seed).standard_normal((probes, batch, d))
    F = np.empty_like(W)
    for p in range(probes):
        agent.start(batch)
        F[p] = agent.respond(W[p], Turn(round=0, position=0, reads="probe"))
    return affine_lstsq(W, F)


def affine_lstsq(inputs: np.ndarray, outputs: np.ndarray) -> AffineMap:
    """Least-squares affine map ``outputs ~ A inputs + c``, one per play (minimum-norm where
    fewer than ``d + 1`` affinely independent inputs leave it underdetermined; NaN where a
    play's data are not finite).

    Args:
        inputs: ``(P, B, d)``, ``P`` pairs per play.
        outputs: ``(P, B, d)``.

    Returns:
        The fitted map, ``A`` of shape ``(B, d, d)``.
    """
    d = inputs.shape[-1]
    design = affine_design(inputs)
    targets = outputs.transpose(1, 0, 2)
    bad = ~(np.isfinite(design).all(axis=(1, 2)) & np.isfinite(targets).all(axis=(1, 2)))
    if bad.any():  # an SVD of inf never returns: fit only the finite plays
        design, targets = (
            np.where(bad[:, None, None], 0.0, design),
            np.where(bad[:, None, None], 0.0, targets),
        )
    coef = np.linalg.pinv(design) @ targets  # batched; minimum-norm where rank-deficient
    coef[bad] = np.nan
    return AffineMap(A=coef[:, :d, :].transpose(0, 2, 1), c=coef[:, d, :])


def affine_design(inputs: np.ndarray) -> np.ndarray:
    """``[inputs, 1]`` per play: ``(P, B, d)`` pairs give ``(B, P, d + 1)``."""
    return np.concatenate([inputs, np.ones((*inputs.shape[:2], 1))], axis=-1).transpose(1, 0, 2)


def condition(matrices: np.ndarray) -> np.ndarray:
    """Condition numbers of a batch of matrices; ``inf`` where an entry is not finite
    (where LAPACK's SVD may never return)."""
    finite = np.isfinite(matrices).all(axis=(-2, -1))
    with np.errstate(all="ignore"):
        cond = np.linalg.cond(np.where(finite[..., None, None], matrices, 0.0))
    return np.where(finite, cond, np.inf)
