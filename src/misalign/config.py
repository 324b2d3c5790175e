"""Play configurations: TOML files validated by pydantic, with dotted overrides.

A configuration is data: the same file (and seed) reproduces a play bit for
bit, and its hash names the run directory. Unknown keys are rejected, and every
problem is reported as one line naming the field (``ConfigError``).

Why one module: the schema is one document (every model and its one-line errors), read
top to bottom as the configuration reference.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from misalign.runtime.errors import ConfigError
from misalign.runtime.text import plural

RESERVED = {
    *("rho", "converges", "distance", "rounds_to_tol", "on_target", "one_sided", "why"),
    *("covariance", "depends_on_start"),
}
"""Names an agent may not take: they are keys of the JSON ``prediction`` object."""

MAGNITUDE = 1e30
"""The largest magnitude a number in a configuration may have, and the inverse of the
smallest positive scale: products of a few such numbers stay far from float64 overflow
(``1.8e308``), so every distance and JSON number of a play is finite."""

Finite = Annotated[float, Field(allow_inf_nan=False, ge=-MAGNITUDE, le=MAGNITUDE)]
NonNegative = Annotated[float, Field(allow_inf_nan=False, ge=0, le=MAGNITUDE)]
Positive = Annotated[float, Field(allow_inf_nan=False, ge=1 / MAGNITUDE, le=MAGNITUDE)]
"""Bounded numbers. A ``Field`` given beside one of these must not repeat its ``ge``/``le``:
pydantic lets the type's bound win, silently."""


def _reads_kind(value: Any) -> str:
    return "mix" if isinstance(value, dict) else "name"


Reads = Annotated[
    Annotated[str, Tag("name")] | Annotated[dict[str, float], Tag("mix")],
    Discriminator(_reads_kind),
]
"""Whom an agent reads: one agent's name, or a weighted mix ``{ B = 0.6, C = 0.4 }``."""


def _schedule_kind(value: Any) -> str:
    return "simultaneous" if isinstance(value, str) else "order"


Schedule = Annotated[
    Annotated[Annotated[list[str], Field(min_length=1)], Tag("order")]
    | Annotated[Literal["simultaneous"], Tag("simultaneous")],
    Discriminator(_schedule_kind),
]
"""A round: the turn order (names may repeat), or ``"simultaneous"``: every agent answers the
previous round's outputs at once."""
TAGS = {"schedule": ("order", "simultaneous"), "reads": ("name", "mix")}
"""The union tags pydantic puts in an error's location, dropped from the field's name."""

WEIGHT_TOL = 1e-9
"""How far the weights of a weighted read may sum from 1."""

MAX_DEPTH = 32
"""The deepest nesting of tables and lists a configuration (or a sweep file) may have; a play's
deepest, ``agents.A.request.<key>...``, needs a handful of levels. Deeper input is refused in
one line before validation, whose recursion (and the hash's) it could exhaust."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)

    def digest(self) -> str:
        """A short hash of the resolved configuration, naming its run directory."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class LearnerConfig(_Strict):
    """What every agent with its own prompt shares: the prompt and whom it reads."""

    n: int = Field(ge=1, description="number of in-context examples")
    spectrum: list[Finite] | None = Field(
        default=None, description="eigenvalues of the input covariance, length d; default ones"
    )
    rotate: bool = Field(default=False, description="rotate the eigenbasis at random")
    target: list[Finite] | None = Field(
        default=None, description="the agent's objective w*; sampled N(0, I) when absent"
    )
    noise: NonNegative = Field(default=0.0, description="label noise standard deviation")
    sampling_std: NonNegative = Field(
        default=0.0, description="std of the noise added to every answer (a sampled agent)"
    )
    reads: Reads | None = Field(
        default=None,
        description="whose output this agent reads: a name, or weights per name "
        "({ B = 0.6, C = 0.4 }, non-negative, summing to 1); default the previous turn "
        "(simultaneous rounds: the uniform mix of every other agent)",
    )


class GradientAgentConfig(LearnerConfig):
    """An analytic agent: preconditioned gradient steps on its own prompt (docs/theory.md §1)."""

    kind: Literal["gd"] = "gd"
    preconditioner: Literal["identity", "lsa-optimal", "newton"] = "lsa-optimal"
    eta: Positive = Field(default=1.0, description="step scale")
    steps_per_turn: int = Field(default=1, ge=1, le=1000)


class LSAAgentConfig(LearnerConfig):
    """A trained single-layer linear self-attention model (``misalign train``) as an agent."""

    kind: Literal["lsa"]
    checkpoint: str = Field(description="path of the checkpoint written by misalign train")


class BlackBoxConfig(LearnerConfig):
    """What every agent whose map is fitted from probes shares (``misalign.llm.fit``)."""

    probes: int | None = Field(
        default=None,
        ge=1,
        le=10**5,
        description="probe estimates per fit; default 2 d (a language model), 2 d + 1 (a "
        "transformer)",
    )
    refits: int = Field(
        default=4, ge=0, le=100, description="local refits around the predicted equilibrium"
    )


class TransformerAgentConfig(BlackBoxConfig):
    """A trained softmax transformer (``misalign train`` with ``model = "transformer"``) as an
    agent: fed the incoming estimate as residual labels, it answers the estimate plus its
    regression estimate (``misalign.agents.transformer.TransformerAgent``). Its map is learned
    and nonlinear, so it is fitted from probes, as a language model's is."""

    kind: Literal["transformer"]
    checkpoint: str = Field(description="path of the checkpoint written by misalign train")

    @property
    def samples(self) -> int:
        """Answers per probe: one, as the model answers the same every time."""
        return 1


class LLMAgentConfig(BlackBoxConfig):
    """A language model behind an OpenAI-compatible Chat Completions server (``misalign.llm``).

    Its prompt (``n`` examples and an objective, sampled like every learner's) is written into
    a Jinja2 template with the incoming estimate; its answer is parsed as ``d`` numbers. Its map
    is a black box, fitted from probes before the play (``misalign.llm.fit``).
    """

    kind: Literal["llm"]
    model: str = Field(min_length=1, description="the model's name at the server")
    base_url: str | None = Field(
        default=None, description="the server, e.g. http://127.0.0.1:8080/v1; default OpenAI's"
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        description="the NAME of the environment variable holding the key; '' for a server "
        "that needs none",
    )
    prompt: str | None = Field(
        default=None,
        description="path of a Jinja2 template of the user message, relative to the "
        "configuration's folder and inside it",
    )
    system: str | None = Field(
        default=None,
        description="path of a Jinja2 template of the system message, relative to the "
        "configuration's folder and inside it",
    )
    protocol: Literal["gd-step", "improve"] = Field(
        default="gd-step",
        description="gd-step: the prompt states the gradient step; improve: no formula",
    )
    eta: Positive = Field(default=1.0, description="the step size stated in the prompt")
    digits: int | None = Field(
        default=None,
        ge=1,
        le=17,
        description="significant digits of the numbers in the "
        "prompt; default: exact (the shortest text that reads back to the same float)",
    )
    max_retries: int = Field(default=4, ge=0, le=100)
    timeout_s: Positive = Field(default=120.0, description="seconds per request")
    concurrency: int = Field(default=8, ge=1, le=4096, description="requests in flight")
    samples: int = Field(
        default=1, ge=1, le=1000, description="answers per probe; > 1 fits the answer noise"
    )
    request: dict[str, Any] = Field(
        default_factory=dict, description="passed through to the API (max_completion_tokens...)"
    )
    price_in: NonNegative | None = Field(default=None, description="price per 1e6 input tokens")
    price_out: NonNegative | None = Field(default=None, description="price per 1e6 output tokens")

    @model_validator(mode="before")
    @classmethod
    def _no_key(cls, data: Any) -> Any:
        """A key written into the configuration, at any depth of the agent's table, is refused
        without being echoed; so are credentials inside ``base_url``."""
        if isinstance(data, dict):
            named = _credential_name(data, "")
            if named is not None:
                raise _FieldError(
                    named,
                    "never write a key into a configuration; set api_key_env to the name of "
                    "the environment variable holding it",
                )
            url = data.get("base_url")
            if isinstance(url, str) and (problem := _url_problem(url)):
                raise _FieldError("base_url", problem)
            if isinstance(url, str) and _url_credentials(url):
                raise _FieldError(
                    "base_url",
                    "holds credentials (user:password@ or a key in the query); set "
                    "api_key_env to the name of the environment variable holding the key",
                )
            env = data.get("api_key_env", "")
            if not isinstance(env, str) or not re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)?", env):
                raise _FieldError(
                    "api_key_env",
                    "must be the NAME of an environment variable (letters, digits, "
                    "underscores), not a key",
                )
        return data

    @model_validator(mode="before")
    @classmethod
    def _anchor_templates(cls, data: Any, info: ValidationInfo) -> Any:
        """``prompt`` and ``system`` become absolute paths, resolved from the configuration's
        folder (``folder`` in the validation context; the working directory without one) and
        refused unless they lie inside it."""
        if not isinstance(data, dict):
            return data
        folder = Path((info.context or {}).get("folder") or Path.cwd())
        data = dict(data)
        for key in ("prompt", "system"):
            if isinstance(data.get(key), str) and data[key]:
                data[key] = str(anchor_template(data[key], folder, key))
        return data

    @model_validator(mode="after")
    def _check_request(self) -> LLMAgentConfig:
        taken = sorted(set(self.request) & OURS)
        if taken:
            raise _FieldError(f"request.{taken[0]}", "is set by misalign, not passed through")
        for name, value in self.request.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                raise _FieldError(
                    f"request.{name}", "must be plain JSON (finite numbers, strings, tables)"
                ) from None
        if self.base_url is not None and "api_key_env" not in self.model_fields_set:
            raise _FieldError(
                "api_key_env",
                "name the variable whose key may go to base_url explicitly ('' for none): "
                "the default, OPENAI_API_KEY, is sent only to OpenAI",
            )
        return self


def anchor_template(value: str, folder: Path, key: str) -> Path:
    """Where a template path points, checked to lie inside the configuration's folder.

    A relative path is taken from ``folder``; either kind is resolved (symbolic links
    followed, ``..`` removed) and must then lie inside ``folder`` (itself resolved), so a
    configuration cannot name ``/proc/self/environ``, ``../secret`` or a link pointing out.

    Args:
        value: the path as the configuration writes it.
        folder: the configuration's folder.
        key: the field (``prompt``, ``system``), for the message.

    Returns:
        The resolved, absolute path.

    Raises:
        _FieldError: ``<key>: <value> lies outside <folder>, ...`` (or cannot be resolved).
    """
    try:
        inside = folder.resolve()
        path = (inside / value).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a loop of links, a NUL byte
        raise _FieldError(key, f"{value!r} cannot be resolved ({type(exc).__name__})") from None
    if not path.is_relative_to(inside):
        raise _FieldError(
            key,
            f"{value!r} lies outside {inside}, the configuration's folder: a template must "
            "be a file inside it",
        )
    return path


def _credential_name(table: dict, where: str) -> str | None:
    """The dotted path of the first setting named like a credential (``KEY_NAME``) in a table
    and the tables and lists within it, or ``None``."""
    for name, value in table.items():
        path = f"{where}{name}"
        if KEY_NAME.search(str(name)) and path != "api_key_env":
            return path
        for inner in value if isinstance(value, list) else [value]:
            if isinstance(inner, dict) and (found := _credential_name(inner, f"{path}.")):
                return found
    return None


def _url_problem(url: str) -> str | None:
    """What makes ``base_url`` no server's address (never echoing it: it may hold a key), or
    ``None``: spacing or control characters (which URL parsers drop or split on), not http
    or https, no host, an unreadable port or IPv6 literal."""
    from urllib.parse import urlsplit

    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "must not hold spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        return "is not a URL (its host or port cannot be read)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    return None


def _url_credentials(url: str) -> bool:
    """Whether a URL carries credentials: ``user:password@host``, or a query parameter named
    like a credential."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(url)
    return bool(parts.username or parts.password) or any(
        KEY_NAME.search(name) or name.lower() in ("key", "code", "sig")
        for name, _ in parse_qsl(parts.query)
    )


KEY_NAME = re.compile(r"(?i)(api[_-]?key|secret|token$|authorization|password)")
"""Names of settings that would hold a credential: refused in a configuration."""
OURS = {"model", "messages", "response_format", "stream", "n", "tools"}
"""Request keys that misalign sets itself."""


class HelperAgentConfig(_Strict):
    """A helper: each turn it re-picks its output so that the agent it serves follows a
    Newton-like method on its own objective (docs/theory.md §4; ``misalign.agents.helper``)."""

    kind: Literal["helper"]
    serves: str = Field(description="the main agent")
    mode: Literal["white-box", "secant"] = Field(
        default="secant", description="white-box: knows the maps; secant: sees only the play"
    )
    probe_scale: Positive = Field(default=1.0, description="size of the secant probes")
    reads: Reads | None = Field(
        default=None,
        description="whose output this agent reads: a name, or weights per name "
        "({ B = 0.6, C = 0.4 }, non-negative, summing to 1); default the previous turn "
        "(simultaneous rounds: the uniform mix of every other agent)",
    )


def _kind(value: Any) -> str:
    return value.get("kind", "gd") if isinstance(value, dict) else getattr(value, "kind", "gd")


AgentConfig = Annotated[
    Annotated[GradientAgentConfig, Tag("gd")]
    | Annotated[LSAAgentConfig, Tag("lsa")]
    | Annotated[LLMAgentConfig, Tag("llm")]
    | Annotated[TransformerAgentConfig, Tag("transformer")]
    | Annotated[HelperAgentConfig, Tag("helper")],
    Discriminator(_kind),
]
"""Every agent kind, told apart by ``kind`` (default ``gd``)."""
KINDS = ("gd", "lsa", "llm", "transformer", "helper")


class AttackConfig(_Strict):
    """One agent attacks the agent it reads (docs/theory.md §3; ``misalign.agents.attack``)."""

    agent: str = Field(description="the attacker")
    method: Literal["decoy", "geometry", "per-turn"]
    knowledge: Literal["white-box", "gray-box"] = Field(
        default="white-box", description="gray-box: fit the victim's map from probe turns (decoy)"
    )
    probe_scale: Positive = Field(default=1.0, description="size of the gray-box probes")
    probe_turns: int | None = Field(
        default=None,
        ge=1,
        le=10**6,
        description="gray-box: turns spent probing, at least d + 1 (the default); more "
        "average a sampled victim's noise out of the fit",
    )


class DefenceConfig(_Strict):
    """The victim's guard (``misalign.agents.defence``)."""

    agent: str = Field(description="the defended agent")
    method: Literal["monitor", "damping", "predict"]
    damping: float = Field(
        default=0.5,
        allow_inf_nan=False,
        ge=1 / MAGNITUDE,
        le=1,
        description="weight of the new answer",
    )
    budget: Positive = Field(
        default=0.5,
        description="predict: refuse when the predicted own residual exceeds "
        "budget times the norm of the agent's own estimate of its target",
    )


class PlayConfig(_Strict):
    """A play: the agents, their turn order, the number of rounds and the seed."""

    seed: int = Field(
        default=0, ge=0, lt=2**64, description="data seed (prompts and sampled targets)"
    )
    d: int = Field(ge=1, description="dimension")
    rounds: int = Field(ge=1, description="rounds to play")
    schedule: Schedule | None = Field(
        default=None,
        description="turn order within a round (default all agents in file order), or "
        "'simultaneous': every agent answers the previous round's outputs at once",
    )
    start: list[Finite] | None = Field(
        default=None, description="every agent's initial output v_0; default zeros"
    )
    agents: dict[str, AgentConfig] = Field(min_length=1)
    attack: AttackConfig | None = None
    defence: DefenceConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> PlayConfig:
        if self.simultaneous and len(self.agents) < 2:  # it would read only itself
            raise _FieldError(
                "schedule",
                "simultaneous rounds need at least two agents: each reads the others, and an "
                "agent cannot read itself (a lone agent does so with turns in order)",
            )
        for name, agent in self.agents.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name) or name in RESERVED:
                raise _FieldError(f"agents.{name}", "is not a valid agent name")
            if isinstance(agent.reads, dict):
                self._check_mix(name, agent.reads)
            elif agent.reads is not None and agent.reads not in self.agents:
                raise _FieldError(f"agents.{name}.reads", f"names no agent: {agent.reads!r}")
            elif agent.reads == name:
                raise _FieldError(
                    f"agents.{name}.reads",
                    "an agent cannot read itself (a lone agent does so without reads)",
                )
            if isinstance(agent, BlackBoxConfig) and (agent.probes or self.d + 1) < self.d + 1:
                raise _FieldError(
                    f"agents.{name}.probes", f"must be at least d + 1 = {self.d + 1} to fit a map"
                )
            if isinstance(agent, HelperAgentConfig):
                if self.simultaneous:
                    raise _FieldError(
                        f"agents.{name}", "a helper needs turns in order, not simultaneous rounds"
                    )
                mixes = [n for n, a in self.agents.items() if isinstance(a.reads, dict)]
                if mixes:
                    raise _FieldError(
                        f"agents.{name}",
                        f"a helper needs single reads; agents.{mixes[0]}.reads is weighted",
                    )
                boxes = [n for n, a in self.agents.items() if isinstance(a, BlackBoxConfig)]
                if boxes:
                    raise _FieldError(
                        f"agents.{name}",
                        f"helpers need analytic maps; agents.{boxes[0]} is a black box "
                        f"({self.agents[boxes[0]].kind})",
                    )
                served = self.agents.get(agent.serves)
                if not isinstance(served, LearnerConfig):
                    raise _FieldError(
                        f"agents.{name}.serves", f"names no agent with a prompt: {agent.serves!r}"
                    )
                sampled = [n for n, a in self.agents.items() if getattr(a, "sampling_std", 0) > 0]
                if agent.mode == "secant" and sampled:
                    raise _FieldError(
                        f"agents.{name}.mode",
                        f"the secant helper fits a noise-free play, and {sampled[0]} is sampled "
                        "(sampling_std > 0): use mode = 'white-box'",
                    )
                continue
            for key in ("spectrum", "target"):
                value = getattr(agent, key)
                if value is not None and len(value) != self.d:
                    raise _FieldError(
                        f"agents.{name}.{key}", f"must have length d = {self.d} (got {len(value)})"
                    )
            if agent.spectrum is not None and min(agent.spectrum) < 1 / MAGNITUDE:
                raise _FieldError(
                    f"agents.{name}.spectrum", f"must be all positive (at least {1 / MAGNITUDE:g})"
                )
        if self.start is not None and len(self.start) != self.d:
            raise _FieldError("start", f"must have length d = {self.d} (got {len(self.start)})")
        order = self.order
        missing = [name for name in order if name not in self.agents]
        if missing:
            raise _FieldError("schedule", f"names no agent: {missing[0]!r}")
        idle = [name for name in self.agents if name not in order]
        if idle:
            raise _FieldError("schedule", f"agent {idle[0]!r} never takes a turn")
        for key, table in (("attack", self.attack), ("defence", self.defence)):
            if table is not None and table.agent not in self.agents:
                raise _FieldError(f"{key}.agent", f"names no agent: {table.agent!r}")
            if table is not None and self.simultaneous:
                raise _FieldError(
                    key, "needs strict alternation: turns in order, not simultaneous rounds"
                )
            if table is not None and len(self.agents) != 2:
                got = plural(len(self.agents), "agent")
                raise _FieldError(key, f"needs a two-agent play (got {got})")
            if table is not None and (
                sorted(self.order) != sorted(self.agents)
                or any(
                    a.reads not in (None, *[n for n in self.agents if n != k])
                    for k, a in self.agents.items()
                )
            ):
                raise _FieldError(
                    key,
                    "needs strict alternation: one turn each a round, each reading the other",
                )
            if table is not None and not isinstance(self.agents[table.agent], GradientAgentConfig):
                raise _FieldError(f"{key}.agent", f"{table.agent!r} is not a gd agent")
            if table is not None and any(
                isinstance(a, BlackBoxConfig) for a in self.agents.values()
            ):
                raise _FieldError(
                    key, "needs analytic maps on both sides; this play has a black-box agent"
                )
        attack = self.attack
        if attack is not None and attack.knowledge == "gray-box" and attack.method != "decoy":
            raise _FieldError("attack.knowledge", "gray-box applies to the decoy method only")
        if attack is not None and attack.probe_turns is not None:
            if attack.knowledge != "gray-box":
                raise _FieldError("attack.probe_turns", "applies to the gray-box decoy only")
            if attack.probe_turns < self.d + 1:
                raise _FieldError(
                    "attack.probe_turns",
                    f"must be at least d + 1 = {self.d + 1} (got {attack.probe_turns})",
                )
        if self.attack and self.defence and self.attack.agent == self.defence.agent:
            raise _FieldError("defence.agent", "the attacker cannot also be the defended agent")
        return self

    def _check_mix(self, name: str, mix: dict[str, float]) -> None:
        """A weighted read: some agents other than the reader, non-negative weights summing
        to 1."""
        field = f"agents.{name}.reads"
        if not mix:
            raise _FieldError(field, "names no agent (give a name or weights per name)")
        for other, weight in mix.items():
            if other not in self.agents:
                raise _FieldError(f"{field}.{other}", f"names no agent: {other!r}")
            if other == name:
                raise _FieldError(f"{field}.{other}", "an agent's weighted read cannot name itself")
            if not 0 <= weight <= 1:  # NaN fails too
                raise _FieldError(
                    f"{field}.{other}", f"must be a weight in [0, 1] (got {weight!r})"
                )
        total = sum(mix.values())
        if abs(total - 1) > WEIGHT_TOL:
            raise _FieldError(field, f"weights must sum to 1 (got {total!r})")

    @property
    def simultaneous(self) -> bool:
        """Whether every agent answers the previous round's outputs at once."""
        return self.schedule == "simultaneous"

    @property
    def order(self) -> list[str]:
        """The turn order of a round: ``schedule``, or every agent in file order (always so
        in simultaneous rounds)."""
        return list(self.agents) if self.schedule in (None, "simultaneous") else list(self.schedule)


class _FieldError(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def parse_config(data: dict[str, Any], folder: str | Path | None = None) -> PlayConfig:
    """Validate a configuration given as plain data.

    Args:
        data: the configuration's keys.
        folder: the folder its template paths (``prompt``, ``system``) are read from and must
            lie in; default the working directory. They come back absolute.

    Raises:
        ConfigError: the first problem, as ``field: problem``.
    """
    return _validated(PlayConfig, data, {"folder": Path(folder or Path.cwd())})


def _validated(
    model: type[BaseModel], data: dict[str, Any], context: dict[str, Any] | None = None
) -> Any:
    """``data`` as a ``model``, nested at most ``MAX_DEPTH`` levels.

    Args:
        model: the pydantic model.
        data: plain data.
        context: pydantic's validation context (``folder``: where template paths lie).

    Raises:
        ConfigError: the first problem, as ``field: problem``.
    """
    check_depth(data)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def check_depth(data: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse data whose tables and lists nest more than ``limit`` levels deep (walked without
    recursion, so any depth is safe to check).

    Args:
        data: plain data, as TOML or JSON gives it.
        limit: the deepest level a table or list may sit at: the top-level table's values
            are at level 1, their elements at level 2, and so on.

    Raises:
        ConfigError: ``field: nested more than <limit> levels deep``, naming the first path
            that goes deeper (its first levels only).
    """
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > limit:
            shown = ".".join(path[:SHOWN]) + ("..." if len(path) > SHOWN else "")
            raise ConfigError(f"{shown}: nested more than {limit} levels deep")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend(
            (value, (*path, str(key))) for key, value in items if isinstance(value, dict | list)
        )


SHOWN = 6
"""Levels of a path that a message on nesting names."""


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> PlayConfig:
    """Read and validate a TOML configuration.

    Template paths (``prompt``, ``system``) are taken from the file's folder and must lie
    inside it (``anchor_template``); the configuration holds them absolute. So the
    ``config.toml`` a run writes into ``runs/<hash>/`` names templates outside that folder
    and is refused as a configuration of its own: re-run a play with templates from its
    original file (the same hash, the same run directory).

    Args:
        path: the TOML file.
        overrides: ``dotted.key=value`` assignments applied before validation,
            values in TOML syntax (``seed=4``, ``agents.A.eta=0.5``,
            ``agents.B.target=[1, 0]``).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the file is missing or unreadable, or a field is invalid.
    """
    return parse_config(_read(path, overrides), Path(path).absolute().parent)


def read_toml(path: str | Path, field: str = "") -> dict[str, Any]:
    """A TOML file as data.

    Args:
        path: the file.
        field: what names it in a message (``base: ``), before the path.

    Raises:
        ConfigError: one line: the file is missing, unreadable or not TOML (or nested too
            deeply for the parser).
    """
    path = Path(path)
    try:
        with open(path, "rb", opener=_regular_file) as handle:
            text = handle.read(TOML_BYTES + 1)
        if len(text) > TOML_BYTES:
            raise ConfigError(f"{field}{path}: larger than {TOML_BYTES:,} bytes")
        return tomllib.loads(text.decode())
    except RecursionError:
        raise ConfigError(f"{field}{path}: {TOO_DEEP}") from None
    except FileNotFoundError:
        raise ConfigError(f"{field}{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        regular = getattr(exc, "errno", None) != errno.EINVAL
        why = exc.__class__.__name__ if regular else "not a regular file"
        raise ConfigError(f"{field}{path}: cannot read ({why})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{field}{path}: invalid TOML: {exc}") from None


def _regular_file(path: str, flags: int) -> int:
    """Open only a regular file (``O_NONBLOCK``: a FIFO named as a configuration is refused,
    not waited on; ``/dev/zero`` is refused, not read forever).

    Raises:
        IsADirectoryError, OSError: not a regular file.
    """
    fd = os.open(path, flags | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


TOML_BYTES = 16 * 2**20
"""The largest configuration or sweep file read."""
TOO_DEEP = f"invalid TOML: nested too deeply to read (the limit is {MAX_DEPTH} levels)"
"""Why TOML whose nesting exhausts the parser's recursion is refused."""


def _read(path: str | Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The TOML file as data, with the overrides applied."""
    data = read_toml(path)
    for assignment in overrides:
        _apply(data, assignment)
    return data


def _apply(data: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment}: expected key=value")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except RecursionError:
        raise ConfigError(f"--set {key}: {TOO_DEEP}") from None
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is a string: --set agents.A.preconditioner=newton
    *parents, leaf = key.split(".")
    if parents[:1] == ["agents"]:
        _check_agent(
            data.get("agents"), key, adds_table=len(parents) == 1 and isinstance(value, dict)
        )
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a table")
    node[leaf] = value


def _check_agent(agents: Any, key: str, adds_table: bool) -> None:
    """An override may change an agent, or add one by giving its whole table
    (``agents.C={n = 4}``); a name one typo away from an existing agent is an error."""
    name = key.split(".")[1]
    names = list(agents) if isinstance(agents, dict) else []
    if name in names:
        return
    there = f"(agents: {', '.join(names)})" if names else "(no agents yet)"
    near = [other for other in names if _one_typo(name, other)]
    if near:
        raise ConfigError(f"--set {key}: no agent {name!r}; did you mean {near[0]!r}? {there}")
    if not adds_table:
        raise ConfigError(
            f"--set {key}: no agent {name!r} {there}; to add one, give its whole table: "
            f"--set 'agents.{name}={{n = 4}}'"
        )


def _one_typo(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` differ only by case, or (both three letters or longer) by
    one letter changed, added or dropped, or two neighbours swapped."""
    if a.lower() == b.lower():
        return True
    if min(len(a), len(b)) < 3 or abs(len(a) - len(b)) > 1:
        return False
    short, long = sorted((a, b), key=len)
    if len(short) == len(long):
        diff = [k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        swapped = len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
        return len(diff) == 1 or (swapped and a[diff[1]] == b[diff[0]])
    return any(long[:k] + long[k + 1 :] == short for k in range(len(long)))


BOUNDS = {
    "greater_than": ("gt", "greater than"),
    "greater_than_equal": ("ge", "greater than or equal to"),
    "less_than": ("lt", "less than"),
    "less_than_equal": ("le", "less than or equal to"),
}
"""pydantic's bound errors, with the bound written as ``%g`` (``1e-30``, not 31 digits)."""


def _one_line(exc: ValidationError) -> str:
    """The first validation error as ``field: problem``."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    if len(loc) > 2 and loc[0] == "agents" and loc[2] in KINDS:
        del loc[2]  # the union's tag: agents.A.gd.n is agents.A.n
    for k in range(len(loc) - 1):
        if loc[k] in TAGS and loc[k + 1] in TAGS[loc[k]]:
            del loc[k + 1]  # schedule.order.1 is schedule.1, agents.A.reads.mix.B is ...reads.B
            break
    field = ".".join(str(part) for part in loc)
    if isinstance(error.get("ctx", {}).get("error"), _FieldError):
        return f"{field}.{error['ctx']['error']}" if field else str(error["ctx"]["error"])
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "is required"
    elif kind == "literal_error":
        message = f"got {error['input']!r}; {message[0].lower()}{message[1:]}"
    elif kind == "union_tag_invalid":
        field, message = (
            f"{field}.kind",
            f"got {error['ctx']['tag']!r}; expected one of: {', '.join(KINDS)}",
        )
    elif kind == "finite_number":
        message = "must be a finite number"
    elif kind in BOUNDS:
        bound = error["ctx"][BOUNDS[kind][0]]
        message = f"input should be {BOUNDS[kind][1]} {bound:g} (got {error['input']!r})"
    else:
        message = f"{message[0].lower()}{message[1:]} (got {error['input']!r})"
    return f"{field}: {message}" if field else message


class Curriculum(_Strict):
    """Garg et al. 2022's curriculum (§3): training starts on ``d`` active input coordinates
    (the rest zero) and prompts of ``n`` examples (a sequence of ``n + 1`` labels, each
    predicted from those before it), and every ``every`` steps one more coordinate and two
    more examples join, up to the configuration's ``d`` and ``n``."""

    d: int = Field(default=1, ge=1, description="active input coordinates at the start")
    n: int = Field(default=2, ge=1, description="examples per prompt at the start")
    every: int = Field(default=2000, ge=1, description="steps between increments")


class TrainConfig(_Strict):
    """Training an in-context regression model (``misalign.agents.train``): a linear
    self-attention model (``model = "lsa"``, ``misalign.agents.lsa``) or a causal softmax
    transformer (``model = "transformer"``, ``misalign.agents.transformer``).

    Tasks are drawn fresh every step: ``x ~ N(0, Lambda)``, ``w ~ N(0, I)``,
    ``y = x^T w + noise * N(0, 1)``; ``Lambda`` has eigenvalues ``spectrum`` (rotated at
    random when ``rotate``). Separate seeds drive the model's initial weights (``seed``), the
    training tasks (``seed + 1``) and the evaluation tasks (``seed + 2``).
    """

    model: Literal["lsa", "transformer"] = Field(
        default="lsa", description="lsa: linear self-attention; transformer: softmax, GPT-2 style"
    )
    seed: int = Field(default=0, ge=0)
    d: int = Field(ge=1)
    n: int = Field(ge=1, description="in-context examples per prompt")
    spectrum: list[Finite] | None = Field(default=None, description="eigenvalues of Lambda")
    rotate: bool = False
    noise: NonNegative = Field(
        default=0.0, description="label noise standard deviation (transformer only)"
    )
    layers: int = Field(default=1, ge=1)
    width: int = Field(default=64, ge=1, le=4096, description="transformer: residual width")
    heads: int = Field(default=2, ge=1, le=64, description="transformer: attention heads")
    context: int | None = Field(
        default=None,
        ge=1,
        le=10**4,
        description="transformer: the most examples a prompt may hold (default 2 n; "
        "past n the positions are untrained)",
    )
    curriculum: Curriculum | None = Field(
        default=None, description="transformer: Garg et al.'s curriculum over d and n"
    )
    coupled: bool = Field(
        default=False,
        description="train the label-coupling blocks too (see misalign.agents.lsa.LSA)",
    )
    steps: int = Field(default=3000, ge=1)
    batch: int = Field(default=1024, ge=1)
    lr: Finite = Field(default=0.01, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: int = Field(default=100, ge=0)
    init_scale: Finite = Field(default=0.1, gt=0)
    eval_every: int = Field(default=500, ge=1)
    eval_batch: int = Field(default=65536, ge=1)
    checkpoint_every: int = Field(default=500, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(
        default=1,
        ge=0,
        description="torch CPU threads (0: torch's default); small models run "
        "fastest on one, as threads contend on a shared machine",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.spectrum is not None and len(self.spectrum) != self.d:
            raise _FieldError(
                "spectrum", f"must have length d = {self.d} (got {len(self.spectrum)})"
            )
        if self.spectrum is not None and min(self.spectrum) <= 0:
            raise _FieldError("spectrum", "must be all positive")
        if self.model == "lsa":
            for field in ("noise", "context", "curriculum"):
                if getattr(self, field):
                    raise _FieldError(field, 'applies to model = "transformer" only')
            return self
        if self.width % self.heads:
            raise _FieldError("heads", f"must divide width = {self.width} (got {self.heads})")
        if self.context is not None and self.context < self.n:
            raise _FieldError("context", f"must be at least n = {self.n} (got {self.context})")
        if self.curriculum is not None and self.curriculum.d > self.d:
            raise _FieldError("curriculum.d", f"must be at most d = {self.d}")
        if self.curriculum is not None and self.curriculum.n > self.n:
            raise _FieldError("curriculum.n", f"must be at most n = {self.n}")
        return self

    @property
    def examples(self) -> int:
        """The most examples a prompt may hold: ``context`` (default ``2 n``) for a
        transformer, ``n`` for a linear self-attention model (any ``n`` works)."""
        if self.model == "lsa":
            return self.n
        return 2 * self.n if self.context is None else self.context

    def stage(self, step: int) -> tuple[int, int]:
        """The active coordinates and examples per prompt at ``step`` (the curriculum's,
        else ``d`` and ``n``)."""
        c = self.curriculum
        if c is None:
            return self.d, self.n
        k = step // c.every
        return min(self.d, c.d + k), min(self.n, c.n + 2 * k)


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read and validate a training configuration (see ``load_config``)."""
    return _validated(TrainConfig, _read(path, overrides))
