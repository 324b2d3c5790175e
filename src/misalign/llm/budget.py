"""What the language-model requests of a run may cost, counted before the first one is sent.

A configuration from someone else can ask for thousands of paid requests (``probes``,
``samples``, ``refits``, ``rounds``, ``--seeds``). So before the first request the run counts
the requests it plans, per agent: ``probes x samples x (1 + refits)`` for the fits plus one per
turn of the agent in every round, for every play (``plan``); prints the count with a bound on
the cost where the agents have prices (``describe``); and refuses, as one line, a plan over the
user's ``--max-requests`` or ``--max-cost`` (``check``). The count leaves out corrections of
bad answers and retries, which the client counts as it sends and stops at the same limits.

The cost bound is a bound, not an estimate: each request's input is at most one token per
UTF-8 byte of its body (messages rendered with the longest numbers a prompt can hold, the
settings passed through and the response format) plus a few tokens per message, and its
output at most ``max_completion_tokens`` (or ``max_tokens``) of the agent's ``request``; an
agent with a price on output and neither limit has no bound. The plan's bound is for the
prompt as rendered before the run; the client reserves each request's own bound before it
sends it (``misalign.llm.client.Limits``), so ``--max-cost`` holds whatever the template
renders later. Prices come from the configuration: a shared one's are its author's word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from misalign.config import ConfigError
from misalign.llm import language_models
from misalign.llm.answer import FORMATS, response_format
from misalign.llm.client import cost_bound
from misalign.llm.fit import answers_per_agent
from misalign.runtime.text import plural

LONGEST = -1.2345678901234567e-300
"""The longest number a prompt writes (``repr``: 24 characters)."""


@dataclass(frozen=True)
class Plan:
    """The requests a run plans, and a bound on their cost.

    Attributes:
        requests: per agent, the requests planned (fits and turns, every play).
        cost: per agent with prices, the most its planned requests can cost in dollars;
            ``None`` for an agent with prices but no limit on its answers' tokens.
    """

    requests: dict[str, int]
    cost: dict[str, float | None]

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def total_cost(self) -> float | None:
        """The bound on the cost of every priced agent's requests; ``None`` when one has no
        bound (or no agent has prices)."""
        if not self.cost or None in self.cost.values():
            return None
        return sum(self.cost.values())


def plan(game, rounds: int) -> Plan:
    """Count the requests a run plans for its language-model agents.

    Args:
        game: the game (``misalign.api.Game``), agents built.
        rounds: the rounds that will be played (0 for ``theory``: fits only).

    Returns:
        The plan.
    """
    agents = language_models(game)
    plays = game.start.shape[0]
    fits = answers_per_agent(game)
    turns = {name: sum(taker == name for taker, _ in game.schedule.turns) for name in agents}
    requests = {name: fits[name] + rounds * turns[name] * plays for name in agents}
    cost = {
        name: _cost_bound(agent, requests[name])
        for name, agent in agents.items()
        if agent.config.price_in is not None or agent.config.price_out is not None
    }
    return Plan(requests, cost)


def _cost_bound(agent, requests: int) -> float | None:
    """The most ``requests`` requests of ``agent`` can cost, in dollars (``None``: its
    answers' tokens are not limited), each rendered with the longest numbers a prompt holds
    and sent with its settings and the largest response format (``cost_bound``). A template
    can render other rounds longer: the client checks each request again before it is sent."""
    settings = agent.config.request
    messages = agent.messages(0, np.full(agent.d, LONGEST), round=10**9)
    fmt = {"response_format": response_format(FORMATS[0], agent.d)}
    bound = cost_bound(messages, settings, fmt, agent.config.price_in, agent.config.price_out)
    return None if bound is None else requests * bound


def describe(plan: Plan) -> str:
    """One line: the requests planned per agent and the cost bound, for stderr."""
    each = ", ".join(f"{name} {n:,}" for name, n in plan.requests.items())
    line = (
        f"language models: {plural(plan.total, 'request', spec=',')} planned ({each}; fits and "
        "turns over every play, before corrections and retries; answers already in the store "
        "are not sent again)"
    )
    if plan.cost:
        bound = plan.total_cost
        line += (
            f", costing at most ${bound:,.4f}"
            if bound is not None
            else ", cost not bounded (an agent with prices has no max_completion_tokens)"
        )
    return line


def check(plan: Plan, max_requests: int | None, max_cost: float | None) -> None:
    """Refuse a plan over the user's limits, before any request.

    Args:
        plan: the run's plan.
        max_requests: ``--max-requests`` (``None``: no limit).
        max_cost: ``--max-cost`` in dollars (``None``: no limit).

    Raises:
        ConfigError: one line: over ``max_requests``; over ``max_cost``; or ``max_cost`` given
            while the cost cannot be bounded (no prices, or no limit on an answer's tokens).
    """
    if max_requests is not None and plan.total > max_requests:
        raise ConfigError(
            f"--max-requests {max_requests}: the run plans "
            f"{plural(plan.total, 'request', spec=',')} to language models (probes x samples "
            "x (1 + refits) + turns, for every play); raise the limit if you mean to send them"
        )
    if max_cost is None:
        return
    bound = plan.total_cost
    if bound is None:
        why = "no agent has prices" if not plan.cost else "an agent has no max_completion_tokens"
        raise ConfigError(f"--max-cost {max_cost:g}: the cost cannot be bounded ({why})")
    if bound > max_cost:
        raise ConfigError(
            f"--max-cost {max_cost:g}: the {plan.total:,} planned requests may cost up to "
            f"${bound:,.4f}; raise the limit if you mean to spend it"
        )
