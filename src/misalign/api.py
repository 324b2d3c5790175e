"""From a configuration to a play and its prediction: the Python API behind the CLI.

    >>> from misalign import load_config, setup, simulate, predict
    >>> config = load_config("examples/two_agents.toml")
    >>> game = setup(config)                 # or setup(config, seeds=range(1000)) for a batch
    >>> trajectory = simulate(game)
    >>> prediction = predict(game)

With language-model agents (``kind = "llm"``), pass a ``misalign.llm.Session`` (the store of
answers) to ``setup`` and call ``fit(game)`` before ``predict``.

A batch holds independent plays, one per seed (or per configuration of the
same dimension and schedule); play ``i`` of a batch is bit for bit the play a
single run of its configuration gives.

Why one module: ``setup`` is one decision table from every agent kind's configuration to its
agent (learners, trained models, language models, helpers, attackers, defences, sampled
wrappers), sized before anything is built; split per kind, each part would repeat the batch's
bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from misalign.agents import attack as attack_
from misalign.agents import defence as defence_
from misalign.agents import helper as helper_
from misalign.agents.helper import Helper
from misalign.config import (
    AgentConfig,
    AttackConfig,
    BlackBoxConfig,
    ConfigError,
    DefenceConfig,
    GradientAgentConfig,
    HelperAgentConfig,
    LearnerConfig,
    LLMAgentConfig,
    LSAAgentConfig,
    PlayConfig,
    TransformerAgentConfig,
)
from misalign.model.agent import (
    Agent,
    GradientAgent,
    Sampled,
    condition,
    noise_covariance,
    preconditioner,
)
from misalign.model.philox import as_seeds
from misalign.model.play import Schedule, Trajectory, play
from misalign.model.prompt import PlayPrompts, Prompt, sample_prompts
from misalign.model.theory import Prediction
from misalign.model.theory import predict as predict_maps
from misalign.runtime.device import host, namespace, place
from misalign.runtime.progress import progress_bar
from misalign.runtime.sizes import require
from misalign.runtime.text import plural


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

    @cached_property
    def targets(self) -> dict[str, np.ndarray]:
        """Every agent's objective ``w*``, ``(B, d)``."""
        return {
            name: ps.batch.target
            if isinstance(ps, PlayPrompts)
            else np.stack([p.target for p in ps])
            for name, ps in self.prompts.items()
        }

    @cached_property
    def seeds(self) -> np.ndarray:
        """Every play's seed, ``(B,)`` ``uint64``."""
        if isinstance(self.configs, Seeded):
            return self.configs.seeds
        return as_seeds([c.seed for c in self.configs])


class Seeded(Sequence[PlayConfig]):
    """One configuration played once per seed, as the sequence of its plays' configurations
    (each made when read: a batch of 10^6 seeds holds one configuration).

    Attributes:
        config: the configuration.
        seeds: the plays' seeds, ``(B,)`` ``uint64``.
    """

    def __init__(self, config: PlayConfig, seeds: Sequence[int]) -> None:
        self.config, self.seeds = config, as_seeds(seeds)

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, play):
        if isinstance(play, slice):
            return [self[i] for i in range(*play.indices(len(self)))]
        return self.config.model_copy(update={"seed": int(self.seeds[play])})

    def agents(self, name: str) -> list[AgentConfig]:
        """Agent ``name``'s configuration in every play (one object, repeated)."""
        return [self.config.agents[name]] * len(self)


def setup(
    config: PlayConfig | Sequence[PlayConfig],
    seeds: Sequence[int] | None = None,
    progress: bool = False,
    session=None,
    device=None,
) -> Game:
    """Sample the prompts and build the agents of a batch of plays.

    Args:
        config: one configuration, or one per play (same ``d``, agents and schedule).
        seeds: with one configuration, play it once per seed (default: its own seed).
        progress: show a progress bar on stderr while sampling the prompts of a large batch.
        session: the ``misalign.llm.Session`` of language-model agents (their store and
            mode); one recording into ``runs/llm.sqlite`` when absent.
        device: a ``torch.device`` (``misalign.runtime.device.resolve``) on which to sample
            the prompts, build the maps and hold the start, as float64 tensors, for a play
            there (one configuration of analytic agents); ``None``: numpy.

    Returns:
        The game.

    Raises:
        ConfigError: the play, or the batch, would not fit in memory (``check_size``), or
            an agent's turn map overflows float64.
    """
    if isinstance(config, PlayConfig):
        seeds = [config.seed] if seeds is None else seeds
        check_size(config, len(seeds))
        if len(seeds) and max(seeds) >= 2**64:
            raise ConfigError(f"seed: the last play's seed {max(seeds)} is not below 2^64")
        configs = Seeded(config, seeds)
        if device is not None:
            check_device(config)
    else:
        if device is not None:
            raise ValueError("a batch on a device plays one configuration over seeds")
        configs = tuple(config)
        check_size(configs[0], len(configs))
        for other in configs[1:]:
            if _shape(other) != _shape(configs[0]):
                raise ValueError("a batch needs one d, agent list, schedule, attack and defence")
    first = configs[0]
    learners = [n for n, a in first.agents.items() if isinstance(a, LearnerConfig)]
    sampled: dict[str, list[tuple[np.ndarray, Prompt]]] = {n: [] for n in learners}
    if isinstance(configs, Seeded):  # one configuration: every play's prompt at once
        everyone = np.arange(len(configs))
        for n in learners:
            agent = first.agents[n]
            sampled[n] = [(everyone, _sample([agent], configs.seeds, n, first.d, device))]
    else:
        bar = progress_bar(len(configs), "prompts") if progress and len(configs) >= 2000 else None
        for start in range(0, len(configs), CHUNK):
            plays = range(start, min(start + CHUNK, len(configs)))
            for n in learners:
                sampled[n] += _prompts(configs, plays, n)
            if bar is not None:
                bar.advance(bar.task_ids[0], len(plays))
        if bar is not None:
            bar.stop()
    prompts = {n: _plays(sampled[n], len(configs)) for n in learners}
    seeds_ = configs.seeds if isinstance(configs, Seeded) else as_seeds([c.seed for c in configs])
    if session is None and any(isinstance(first.agents[n], LLMAgentConfig) for n in learners):
        from misalign.llm.agent import Session

        session = Session("runs/llm.sqlite")
    agents: dict[str, Agent] = {
        n: _agent(n, _agent_configs(configs, n), prompts[n], session, seeds_, sampled[n])
        for n in learners
    }
    for n in learners:
        if isinstance(first.agents[n], BlackBoxConfig):
            continue  # a black box until fitted
        f = agents[n].affine()
        xp = namespace(f.A)
        if not (xp.isfinite(f.A).all() and xp.isfinite(f.c).all()):
            raise ConfigError(
                f"agents.{n}: its turn map overflows float64 (reduce eta, spectrum, "
                "steps_per_turn or the labels' scale)"
            )
    schedule = Schedule.build(
        first.order, {name: a.reads for name, a in first.agents.items()}, first.simultaneous
    )
    for name, agent in first.agents.items():
        if isinstance(agent, HelperAgentConfig):
            agents[name] = _helper(name, agent, agents, schedule)
    if first.attack is not None:
        name = first.attack.agent
        agents[name], prompts[name] = _attacker(
            first.attack,
            _agent_configs(configs, name),
            agents,
            prompts[name],
            victim=dict(schedule.turns)[name],
        )
    for n in learners:  # the sampled wrapper goes around an attacker too, under any defence
        if first.agents[n].sampling_std > 0:
            agents[n] = Sampled(agents[n], first.agents[n].sampling_std, seeds_)
    if first.defence is not None:
        name = first.defence.agent
        agents[name] = _defended(first.defence, agents[name], prompts[name])
    if isinstance(configs, Seeded) and first.start is None or all(c.start is None for c in configs):
        start = np.zeros((len(configs), first.d))
    else:
        start = np.stack(
            [np.zeros(c.d) if c.start is None else np.asarray(c.start) for c in configs]
        )
    return Game(configs, agents, prompts, schedule, place(start, device))


FLOAT = 8
"""Bytes of a float64."""
JSON_FLOAT = 60
"""Bytes one reported number costs: a Python float in a list, and its JSON text."""


def footprint(config: PlayConfig, plays: int = 1) -> dict[str, float]:
    """Estimated peak memory of setting up, playing, predicting and reporting ``plays`` plays
    of ``config``, in bytes, keyed by the setting that drives each part.

    The parts: the recorded outputs (``rounds``: every turn of every play, one agent's
    distances while reporting, and the first play's outputs in the JSON report); the
    agents' maps and the round map's eigenvalues and solves (``d``: ``N d x N d`` per
    play for ``N`` agents); and each prompt (``agents.<name>.n``: kept per play, the
    temporaries of sampling one, and the first play's prompt in the report).
    """
    d, turns, agents = config.d, len(config.order), len(config.agents)
    stacked = agents * d
    parts = {
        "rounds": config.rounds * d * (2 * turns * plays * FLOAT + agents * JSON_FLOAT),
        "d": plays * (6 * agents * d * d + 8 * stacked * stacked) * FLOAT,
    }
    for name, agent in config.agents.items():
        if isinstance(agent, LearnerConfig):
            kept = plays * (agent.n * (d + 1) + 2 * d * d) * FLOAT
            parts[f"agents.{name}.n"] = kept + agent.n * (d + 1) * (4 * FLOAT + JSON_FLOAT)
    return parts


def check_size(config: PlayConfig, plays: int = 1) -> None:
    """Refuse, before allocating, a play or a batch of ``plays`` plays that would not fit in
    memory (``footprint``).

    Raises:
        ConfigError: one line naming the setting that drives the size (``seeds`` for a
            batch whose single play would fit).
    """
    require(footprint(config), "the play")
    if plays > 1:
        batch = f"a batch of {plural(plays, 'play')}"
        require({"seeds": sum(footprint(config, plays).values())}, batch)


def _agent_configs(configs: Sequence[PlayConfig], name: str) -> list[AgentConfig]:
    """Agent ``name``'s configuration in every play."""
    if isinstance(configs, Seeded):
        return configs.agents(name)
    return [c.agents[name] for c in configs]


def _shape(config: PlayConfig) -> tuple:
    """What every play of a batch must share."""
    helpers = [a for a in config.agents.values() if isinstance(a, HelperAgentConfig)]
    sampling = [getattr(a, "sampling_std", 0.0) for a in config.agents.values()]
    reads = [a.reads for a in config.agents.values()]
    return (
        *(config.d, config.order, list(config.agents), config.attack, config.defence),
        *(helpers, sampling, config.simultaneous, reads),
    )


def check_device(config: PlayConfig) -> None:
    """Refuse, in one line, a configuration whose plays cannot run on a device
    (``setup(..., device=...)``, ``run --device``): only analytic agents (``kind = "gd"``,
    sampled or not) under any schedule, without attack or defence.

    Raises:
        ConfigError: one line naming ``--device`` and what plays on numpy only.
    """
    for name, agent in config.agents.items():
        if not isinstance(agent, GradientAgentConfig):
            raise ConfigError(
                f'--device: agents.{name} (kind = "{agent.kind}") plays on numpy only; '
                'a device plays analytic agents (kind = "gd")'
            )
    for what in ("attack", "defence"):
        if getattr(config, what) is not None:
            raise ConfigError(f"--device: plays with {what} = ... play on numpy only")


CHUNK = 4096
"""Plays sampled together: bounds the temporaries of a large batch's prompts."""


def _prompts(
    configs: Sequence[PlayConfig], plays: range, name: str
) -> list[tuple[np.ndarray, Prompt]]:
    """Agent ``name``'s prompts in ``plays``, sampled together where plays draw the same
    streams with the same shapes (and, for the analytic agent, take one preconditioner):
    ``(plays, prompts)`` per group. Play ``i``'s prompt is ``sample_prompt(seed_i, name,
    ...)`` of its own configuration, bit for bit."""
    keys: dict[int, tuple] = {}  # by agent configuration: the plays of one config share it
    groups: dict[tuple, list[int]] = {}
    for i in plays:
        agent = configs[i].agents[name]
        key = keys.get(id(agent))
        if key is None:
            key = keys[id(agent)] = (
                *(agent.n, agent.rotate, agent.target is None, agent.noise > 0),
                getattr(agent, "preconditioner", None),
            )
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        agents = [configs[i].agents[name] for i in members]
        seeds = [configs[i].seed for i in members]
        out.append((np.array(members), _sample(agents, seeds, name, configs[0].d)))
    return out


def _sample(agents: list[AgentConfig], seeds, name: str, d: int, device=None) -> Prompt:
    """The prompts of plays whose agent ``name`` has the configurations ``agents`` (one, or
    one per play, of one ``n`` and ``rotate``) and the seeds ``seeds``, on ``device``."""
    return sample_prompts(
        seeds,
        name,
        d=d,
        n=agents[0].n,
        spectrum=_setting(agents, "spectrum", np.ones(d)),
        rotate=agents[0].rotate,
        target=None if agents[0].target is None else _setting(agents, "target", 0.0),
        noise=_setting(agents, "noise", 0.0),
        device=device,
    )


def _setting(agents: list[AgentConfig], key: str, default: np.ndarray | float):
    """The agents' setting ``key``: the one value when they are one configuration, else one
    row per agent (``default`` where unset)."""
    if all(a is agents[0] for a in agents):
        return getattr(agents[0], key)
    values = [getattr(a, key) for a in agents]
    return np.array([default if v is None else v for v in values], dtype=float)


def _plays(sampled: list[tuple[np.ndarray, Prompt]], size: int) -> Sequence[Prompt]:
    """One prompt per play from the batches of ``_prompts`` (views of the one batch when it
    holds every play in order)."""
    if len(sampled) == 1 and np.array_equal(sampled[0][0], np.arange(size)):
        return sampled[0][1].plays()
    prompts: list[Prompt] = [None] * size  # type: ignore[list-item]
    for plays, batch in sampled:
        for i, prompt in zip(plays, batch.plays(), strict=True):
            prompts[i] = prompt
    return prompts


def _agent(
    name: str,
    configs: list[AgentConfig],
    prompts: list[Prompt],
    session,
    seeds: list[int],
    sampled: list[tuple[np.ndarray, Prompt]],
) -> Agent:
    """One agent over the batch; plays may differ in all but kind, steps and checkpoint (and
    a language model's settings other than its prompt). ``sampled``: the prompts as
    ``_prompts`` batched them."""
    first = configs[0]
    distinct = list({id(c): c for c in configs}.values())
    if (
        len(
            {
                (c.kind, getattr(c, "steps_per_turn", 1), getattr(c, "checkpoint", ""))
                for c in distinct
            }
        )
        > 1
    ):
        raise ValueError(f"agent {name}: a batch needs one kind, steps_per_turn and checkpoint")
    if isinstance(first, LLMAgentConfig):
        from misalign.llm.agent import LLMAgent

        prompt_keys = {"n", "spectrum", "rotate", "target", "noise"}
        if len({c.model_dump_json(exclude=prompt_keys) for c in distinct}) > 1:
            raise ValueError(f"agent {name}: a batch needs one set of language-model settings")
        return LLMAgent(name, first, prompts, seeds, session)
    if isinstance(first, LSAAgentConfig | TransformerAgentConfig):
        from misalign.runtime.optional import require_torch

        require_torch(f'agents.{name} (kind = "{first.kind}")')
        model = _trained(name, first, prompts[0].d)
        if isinstance(first, LSAAgentConfig):
            from misalign.agents.lsa import LSAAgent

            return LSAAgent(name, model, prompts)
        from misalign.agents.transformer import TransformerAgent

        return TransformerAgent(name, first, model, prompts, seeds)
    parts = []
    for plays, batch in sampled:  # each batch takes one preconditioner (``_prompts``)
        eta = [configs[i].eta for i in plays]
        eta = eta[0] if len(set(eta)) == 1 else np.array(eta)
        gamma = preconditioner(configs[plays[0]].preconditioner, batch, eta)
        parts.append((plays, gamma, batch.second_moment, batch.moment))
    if len(parts) == 1:
        _, gamma, second_moment, moment = parts[0]
    else:
        size, d = len(configs), prompts[0].d
        gamma, second_moment = np.empty((size, d, d)), np.empty((size, d, d))
        moment = np.empty((size, d))
        for plays, *part in parts:
            gamma[plays], second_moment[plays], moment[plays] = part
    return GradientAgent(name, gamma, second_moment, moment, first.steps_per_turn)


def _trained(name: str, config: LSAAgentConfig | TransformerAgentConfig, d: int):
    """The model of ``config.checkpoint``: of the agent's kind, trained for dimension ``d``;
    a linear self-attention agent's of one layer, a transformer agent's for prompts of
    ``n`` examples or more (its ``context``)."""
    from misalign.agents.train import load_model

    field = f"agents.{name}"
    try:
        model, trained = load_model(config.checkpoint)
    except ConfigError as exc:
        raise ConfigError(f"{field}.checkpoint: {exc}") from None
    if trained.model != config.kind:
        raise ConfigError(
            f"{field}.checkpoint: {'an' if config.kind == 'lsa' else 'a'} {config.kind} agent "
            f'needs a model = "{config.kind}" '
            f"checkpoint (got {trained.model})"
        )
    if trained.d != d:
        raise ConfigError(f"{field}.checkpoint: trained for d = {trained.d}, the play has d = {d}")
    if trained.model == "lsa" and trained.layers != 1:
        raise ConfigError(
            f"{field}.checkpoint: an lsa agent needs one layer (got {trained.layers})"
        )
    if trained.model == "transformer" and config.n > trained.examples:
        raise ConfigError(
            f"{field}.n: the checkpoint's context holds {trained.examples} examples "
            f"(got {config.n})"
        )
    return model


def _helper(
    name: str, config: HelperAgentConfig, agents: dict[str, Agent], schedule: Schedule
) -> Helper:
    """The helper of ``misalign.agents.helper``, placed where the schedule puts it.

    Raises:
        ConfigError: the served agent does not read the helper, directly or through one
            agent; or the maps the helper must invert are singular.
    """
    reads = dict(schedule.turns)
    served, served_reads = config.serves, reads[config.serves]
    via = None if served_reads == name else served_reads
    if via is not None and (reads.get(via) != name or agents[via].affine() is None):
        raise ConfigError(
            f"agents.{name}.serves: {served} must read {name}, or read an agent that reads it"
        )
    maps = {n: agents[n].affine() for n in (served, via) if n is not None}
    inverted = [(served, maps[served].H, "H")] + ([(via, maps[via].A, "I - H")] if via else [])
    for n, matrix, what in inverted:
        if not (condition(matrix) < helper_.CONDITION_LIMIT).all():
            raise ConfigError(f"agents.{name}.serves: {n}'s {what} is singular: nothing to invert")
    return Helper(
        name,
        served,
        served_reads,
        via,
        config.mode,
        maps if config.mode == "white-box" else None,
        settles_to=helper_.newton_input(maps[served], maps.get(via)),
        probe_scale=config.probe_scale,
    )


def _attacker(
    attack: AttackConfig,
    configs: list[AgentConfig],
    agents: dict[str, Agent],
    prompts: list[Prompt],
    victim: str,
) -> tuple[Agent, list[Prompt]]:
    """The attacker of ``misalign.agents.attack`` named by the ``[attack]`` table."""
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
        name,
        gamma,
        prompts,
        steps,
        attack.probe_scale,
        settles_to=white.affine(),
        probe_turns=attack.probe_turns,
    )
    return gray, prompts


def _defended(defence: DefenceConfig, agent: Agent, prompts: list[Prompt]) -> Agent:
    """The victim wrapped in the guard of ``misalign.agents.defence`` named by ``[defence]``."""
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


def fit(game: Game):
    """Fit every language-model agent's map, globally and then locally around the predicted
    equilibrium (``misalign.llm.fit.fit_game``); afterwards ``predict`` uses the fitted maps.

    Returns:
        The ``misalign.llm.fit.Fits``, or ``None`` when the game has no such agent.
    """
    if not any(isinstance(a, BlackBoxConfig) for a in game.configs[0].agents.values()):
        return None
    from misalign.llm.fit import fit_game

    return fit_game(game, predict)


def predict(game: Game) -> Prediction:
    """The theory's prediction for the game (docs/theory.md §2), from the game's start
    (the limit depends on it where no prompt sees some direction, docs/theory.md §2).

    Agents whose behaviour the play decides answer for the regime they are in: before
    ``simulate``, a gray-box attacker reports the decoy of an exact fit and a predictive
    victim keeps reading; after it, the decoy it really fitted and, where it refused, the
    constant answer it switched to. So the prediction after a play is of that play.

    Raises:
        ValueError: an agent is a black box (it exposes no affine map).
    """
    maps = {}
    for name in game.schedule.agents:
        f = game.agents[name].affine()
        if f is None:
            raise ValueError(f"agent {name} is a black box: fit its affine map first")
        maps[name] = f.host()
    noise = {
        name: Q
        for name in game.schedule.agents
        if (Q := noise_covariance(game.agents[name])) is not None
    }
    targets = {name: host(target) for name, target in game.targets.items()}
    return predict_maps(maps, game.schedule, targets, noise, start=host(game.start))
