"""From a configuration to a play and its prediction: the Python API behind the CLI.

    >>> from misalign import load_config, setup, simulate, predict
    >>> config = load_config("examples/two_agents.toml")
    >>> game = setup(config)                 # or setup(config, seeds=range(1000)) for a batch
    >>> trajectory = simulate(game)
    >>> prediction = predict(game)

A batch holds independent plays, one per seed (or per configuration of the
same dimension and schedule); play ``i`` of a batch is bit for bit the play a
single run of its configuration gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from misalign import attack as attack_
from misalign import defence as defence_
from misalign.agent import Agent, GradientAgent, preconditioner
from misalign.config import AgentConfig, AttackConfig, DefenceConfig, PlayConfig
from misalign.play import Schedule, Trajectory, play
from misalign.prompt import Prompt, agent_rng, sample_prompt
from misalign.theory import Prediction, exactness
from misalign.theory import predict as predict_maps


@dataclass(frozen=True)
class Game:
    """Everything a batch of plays needs.

    Attributes:
        configs: one configuration per play.
        agents: the agents, each holding the whole batch.
        prompts: per agent, one prompt per play.
        schedule: the round's turns.
        start: every agent's initial output, ``(B, d)``.
    """

    configs: tuple[PlayConfig, ...]
    agents: dict[str, Agent]
    prompts: dict[str, list[Prompt]]
    schedule: Schedule
    start: np.ndarray

    @property
    def targets(self) -> dict[str, np.ndarray]:
        """Every agent's objective ``w*``, ``(B, d)``."""
        return {name: np.stack([p.target for p in ps]) for name, ps in self.prompts.items()}


def setup(config: PlayConfig | Sequence[PlayConfig], seeds: Sequence[int] | None = None) -> Game:
    """Sample the prompts and build the agents of a batch of plays.

    Args:
        config: one configuration, or one per play (same ``d``, agents and schedule).
        seeds: with one configuration, play it once per seed (default: its own seed).

    Returns:
        The game.
    """
    if isinstance(config, PlayConfig):
        seeds = [config.seed] if seeds is None else seeds
        configs = tuple(config.model_copy(update={"seed": int(s)}) for s in seeds)
    else:
        configs = tuple(config)
    first = configs[0]
    for other in configs[1:]:
        if _shape(other) != _shape(first):
            raise ValueError("a batch needs one d, agent list, schedule, attack and defence")
    prompts = {
        name: [_prompt(c.seed, name, c.agents[name], c.d) for c in configs] for name in first.agents
    }
    agents = {
        name: _agent(name, [c.agents[name] for c in configs], prompts[name])
        for name in first.agents
    }
    schedule = Schedule.build(first.order, {name: a.reads for name, a in first.agents.items()})
    if first.attack is not None:
        name = first.attack.agent
        agents[name], prompts[name] = _attacker(
            first.attack,
            [c.agents[name] for c in configs],
            agents,
            prompts[name],
            victim=dict(schedule.turns)[name],
        )
    if first.defence is not None:
        name = first.defence.agent
        agents[name] = _defended(first.defence, agents[name], prompts[name])
    start = np.stack([np.zeros(c.d) if c.start is None else np.asarray(c.start) for c in configs])
    return Game(configs, agents, prompts, schedule, start)


def _shape(config: PlayConfig) -> tuple:
    """What every play of a batch must share."""
    return config.d, config.order, list(config.agents), config.attack, config.defence


def _prompt(seed: int, name: str, agent: AgentConfig, d: int) -> Prompt:
    return sample_prompt(
        agent_rng(seed, name),
        d=d,
        n=agent.n,
        spectrum=agent.spectrum,
        rotate=agent.rotate,
        target=agent.target,
        noise=agent.noise,
    )


def _agent(name: str, configs: list[AgentConfig], prompts: list[Prompt]) -> Agent:
    """One agent over the batch; plays may differ in all but kind and steps per turn."""
    if len({(c.kind, c.steps_per_turn) for c in configs}) > 1:
        raise ValueError(f"agent {name}: a batch needs one kind and steps_per_turn")
    gamma = [
        preconditioner(c.preconditioner, p, c.eta) for c, p in zip(configs, prompts, strict=True)
    ]
    return GradientAgent.on_prompts(name, np.stack(gamma), prompts, configs[0].steps_per_turn)


def _attacker(
    attack: AttackConfig,
    configs: list[AgentConfig],
    agents: dict[str, Agent],
    prompts: list[Prompt],
    victim: str,
) -> tuple[Agent, list[Prompt]]:
    """The attacker of ``misalign.attack`` named by the ``[attack]`` table."""
    name, gamma, steps = attack.agent, agents[attack.agent].gamma, configs[0].steps_per_turn
    if attack.method == "geometry":
        kinds = {(c.preconditioner, c.eta) for c in configs}
        if len(kinds) > 1:
            raise ValueError(f"agent {name}: a geometry attack needs one preconditioner and eta")
        kind, eta = kinds.pop()
        return attack_.geometry(name, kind, eta, gamma, prompts, steps)
    if attack.method == "per-turn":
        return attack_.PerTurnAttacker(name, gamma, prompts, steps), prompts
    white, relabelled = attack_.decoy(name, gamma, prompts, steps, agents[victim].affine())
    if attack.knowledge == "white-box":
        return white, relabelled
    gray = attack_.GrayBoxDecoy(
        name, gamma, prompts, steps, attack.probe_scale, settles_to=white.affine()
    )
    return gray, prompts


def _defended(defence: DefenceConfig, agent: Agent, prompts: list[Prompt]) -> Agent:
    """The victim wrapped in the guard of ``misalign.defence`` named by ``[defence]``."""
    if defence.method == "damping":
        return defence_.Damped(agent, defence.damping)
    if defence.method == "monitor":
        return defence_.Monitor(agent)
    own = np.stack([p.least_squares() for p in prompts])
    return defence_.Predictive(agent, own, defence.budget)


def simulate(game: Game, rounds: int | None = None, progress: bool = False) -> Trajectory:
    """Play the game.

    Args:
        game: from ``setup``.
        rounds: rounds to play (default: the configuration's).
        progress: show a progress bar on stderr.

    Returns:
        Every output of every play.
    """
    rounds = game.configs[0].rounds if rounds is None else rounds
    return play(game.agents, game.schedule, rounds, game.start, progress=progress)


def predict(game: Game) -> Prediction:
    """The theory's prediction for the game (MODEL.md section 2).

    Raises:
        ValueError: an agent is a black box (it exposes no affine map).
    """
    maps = {}
    for name in game.schedule.agents:
        f = game.agents[name].affine()
        if f is None:
            raise ValueError(f"agent {name} is a black box: fit its affine map first")
        maps[name] = f
    return predict_maps(maps, game.schedule, game.targets)


def report(
    game: Game, prediction: Prediction, trajectory: Trajectory | None = None, play: int = 0
) -> dict[str, Any]:
    """The JSON report of one play of the batch (the ``--json`` contract).

    Keys: ``config`` (resolved), ``config_hash``, ``agents.<name>`` (``X``, ``y``,
    ``gamma``, ``target``), ``prediction`` (``<name>`` fixed point, ``rho``,
    ``converges``, ``rounds_to_tol``, ``residual.<name>`` predicted distance to
    target, ``on_target.<name>``, ``one_sided`` (the one agent that ends exactly on
    target while another does not, else ``null``), ``why.<name>`` for exact agents);
    with a trajectory also ``outputs.<name>`` (one list of ``d`` floats per
    round), ``residual.<name>`` (distance of the final output to its target),
    ``rounds_played`` and ``diverged_at`` (round, or ``null``). With an attack,
    ``attack`` (its table, plus ``probe_turns`` for the gray box); with a
    defence after a run, ``defence`` (``flagged_at``, ``score``, ``refused_at``).
    """
    config = game.configs[play]
    converges = bool(prediction.converges[play])
    out: dict[str, Any] = {
        "config": config.model_dump(mode="json", exclude_none=True),
        "config_hash": config.digest(),
        "agents": {},
        "prediction": {
            "rho": float(prediction.rho[play]),
            "converges": converges,
            "rounds_to_tol": int(prediction.rounds_to()[play]) if converges else None,
            "residual": {
                name: float(np.linalg.norm(e[play])) if converges else None
                for name, e in prediction.residual.items()
            },
        },
    }
    for name, agent in game.agents.items():
        prompt = game.prompts[name][play]
        gamma = agent.gamma
        out["agents"][name] = {
            "X": prompt.X.tolist(),
            "y": prompt.y.tolist(),
            "gamma": None if gamma is None else gamma[play].tolist(),
            "target": prompt.target.tolist(),
        }
        fixed = prediction.fixed_point[name][play]
        out["prediction"][name] = fixed.tolist() if converges else None
    if converges:
        out["prediction"].update(_one_sided(game, prediction, play))
    if config.attack is not None:
        out["attack"] = config.attack.model_dump(mode="json")
        probes = getattr(game.agents[config.attack.agent], "probe_turns", None)
        if probes is not None:
            out["attack"]["probe_turns"] = probes
    if trajectory is not None and config.defence is not None:
        guard = game.agents[config.defence.agent]
        out["defence"] = {
            key: _play_value(getattr(guard, key), play)
            for key in ("flagged_at", "score", "refused_at")
            if hasattr(guard, key)
        }
    if trajectory is not None:
        targets = game.targets
        stop = trajectory.diverged_at[play]
        rounds = trajectory.rounds if stop < 0 else int(stop)  # keep only finite rounds
        out["rounds_played"] = rounds
        out["diverged_at"] = None if stop < 0 else int(stop)
        out["outputs"] = {
            name: trajectory.outputs(name)[:rounds, play].tolist() for name in game.schedule.agents
        }
        out["residual"] = {
            name: float(trajectory.distance(name, targets[name])[rounds - 1, play])
            if rounds
            else None
            for name in game.schedule.agents
        }
    return out


def _describe(attack: AttackConfig) -> str:
    """``decoy (gray-box)``, ``per-turn``: the knowledge matters to the decoy only."""
    return f"{attack.method} ({attack.knowledge})" if attack.method == "decoy" else attack.method


def _play_value(values: np.ndarray | None, play: int) -> float | int | None:
    """One play's entry of a per-play statistic, ``None`` where absent or negative (never)."""
    if values is None or values[play] < 0:
        return None
    return values[play].item()


EXACT = 1e-9
"""A predicted residual below ``EXACT * max(1, |w*|)`` counts as exactly on target."""


def _one_sided(game: Game, prediction: Prediction, play: int) -> dict[str, Any]:
    """Which agents the theory puts exactly on target, and why (MODEL.md section 3)."""
    targets, names = game.targets, game.schedule.agents
    exact = {
        name: bool(
            np.linalg.norm(prediction.residual[name][play])
            <= EXACT * max(1.0, np.linalg.norm(targets[name][play]))
        )
        for name in names
    }
    attack = game.configs[play].attack
    why: dict[str, str] = {}
    for name in (n for n in names if exact[n]):
        if attack is not None and attack.agent == name:
            why[name] = f"attack: {_describe(attack)}"
            continue
        reason = None
        if len(names) == 2 and attack is None:
            other = names[1 - names.index(name)]
            H_self = game.agents[name].affine().H[play]
            H_other = game.agents[other].affine().H[play]
            reason = exactness(H_self, H_other, targets[other][play] - targets[name][play])
        why[name] = reason or "its predicted residual vanishes"
    winners = [n for n in names if exact[n]]
    return {
        "on_target": exact,
        "one_sided": winners[0] if len(winners) == 1 and len(names) > 1 else None,
        "why": why,
    }
