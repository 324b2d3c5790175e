"""Language-model agents: client, prompts, answers, store and fitted maps."""

from misalign.config import LLMAgentConfig
from misalign.model.agent import Agent, Wrapper


def language_models(game) -> dict[str, Agent]:
    """The game's language-model agents (``misalign.llm.agent.LLMAgent``), beneath any
    wrapper; ``{}`` without importing the language-model code when there are none."""
    if not any(isinstance(a, LLMAgentConfig) for a in game.configs[0].agents.values()):
        return {}
    from misalign.llm.agent import LLMAgent

    found = {}
    for name, agent in game.agents.items():
        while isinstance(agent, Wrapper):
            agent = agent.inner
        if isinstance(agent, LLMAgent):
            found[name] = agent
    return found
