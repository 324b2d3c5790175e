"""Play configurations: TOML files validated by pydantic, with dotted overrides.

A configuration is data: the same file (and seed) reproduces a play bit for
bit, and its hash names the run directory. Unknown keys are rejected, and every
problem is reported as one line naming the field (``ConfigError``).
"""

from __future__ import annotations

import hashlib
import json
import re
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
    model_validator,
)

RESERVED = {
    *("rho", "converges", "residual", "rounds_to_tol", "on_target", "one_sided", "why"),
    "covariance",
}
"""Names an agent may not take: they are keys of the JSON ``prediction`` object."""

Finite = Annotated[float, Field(allow_inf_nan=False)]


class ConfigError(ValueError):
    """A configuration problem, as one line naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

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
    noise: Finite = Field(default=0.0, ge=0, description="label noise standard deviation")
    sampling_std: Finite = Field(
        default=0.0, ge=0, description="std of the noise added to every answer (a sampled agent)"
    )
    reads: str | None = Field(
        default=None, description="whose output this agent reads; default the previous turn"
    )


class GradientAgentConfig(LearnerConfig):
    """An analytic agent: preconditioned gradient steps on its own prompt (MODEL.md section 1)."""

    kind: Literal["gd"] = "gd"
    preconditioner: Literal["identity", "lsa-optimal", "newton"] = "lsa-optimal"
    eta: Finite = Field(default=1.0, gt=0, description="step scale")
    steps_per_turn: int = Field(default=1, ge=1)


class LSAAgentConfig(LearnerConfig):
    """A trained single-layer linear self-attention model (``misalign train``) as an agent."""

    kind: Literal["lsa"]
    checkpoint: str = Field(description="path of the checkpoint written by misalign train")


class HelperAgentConfig(_Strict):
    """A helper: each turn it re-picks its output so that the agent it serves follows a
    Newton-like method on its own objective (MODEL.md section 4; ``misalign.helper``)."""

    kind: Literal["helper"]
    serves: str = Field(description="the main agent")
    mode: Literal["white-box", "secant"] = Field(
        default="secant", description="white-box: knows the maps; secant: sees only the play"
    )
    probe_scale: Finite = Field(default=1.0, gt=0, description="size of the secant probes")
    reads: str | None = Field(
        default=None, description="whose output this agent reads; default the previous turn"
    )


def _kind(value: Any) -> str:
    return value.get("kind", "gd") if isinstance(value, dict) else getattr(value, "kind", "gd")


AgentConfig = Annotated[
    Annotated[GradientAgentConfig, Tag("gd")]
    | Annotated[LSAAgentConfig, Tag("lsa")]
    | Annotated[HelperAgentConfig, Tag("helper")],
    Discriminator(_kind),
]
"""Every agent kind, told apart by ``kind`` (default ``gd``)."""
KINDS = ("gd", "lsa", "helper")


class AttackConfig(_Strict):
    """One agent attacks the agent it reads (MODEL.md section 3; ``misalign.attack``)."""

    agent: str = Field(description="the attacker")
    method: Literal["decoy", "geometry", "per-turn"]
    knowledge: Literal["white-box", "gray-box"] = Field(
        default="white-box", description="gray-box: fit the victim's map from probe turns (decoy)"
    )
    probe_scale: Finite = Field(default=1.0, gt=0, description="size of the gray-box probes")


class DefenceConfig(_Strict):
    """The victim's guard (``misalign.defence``)."""

    agent: str = Field(description="the defended agent")
    method: Literal["monitor", "damping", "predict"]
    damping: Finite = Field(default=0.5, gt=0, le=1, description="weight of the new answer")
    budget: Finite = Field(
        default=0.5,
        gt=0,
        description="predict: refuse when the predicted own residual exceeds "
        "budget times the norm of the agent's own estimate of its target",
    )


class PlayConfig(_Strict):
    """A play: the agents, their turn order, the number of rounds and the seed."""

    seed: int = Field(default=0, ge=0, description="data seed (prompts and sampled targets)")
    d: int = Field(ge=1, description="dimension")
    rounds: int = Field(ge=1, description="rounds to play")
    schedule: list[str] | None = Field(
        default=None, min_length=1, description="turn order within a round; default all agents"
    )
    start: list[Finite] | None = Field(
        default=None, description="every agent's initial output v_0; default zeros"
    )
    agents: dict[str, AgentConfig] = Field(min_length=1)
    attack: AttackConfig | None = None
    defence: DefenceConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> PlayConfig:
        for name, agent in self.agents.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name) or name in RESERVED:
                raise _FieldError(f"agents.{name}", "is not a valid agent name")
            if agent.reads is not None and agent.reads not in self.agents:
                raise _FieldError(f"agents.{name}.reads", f"names no agent: {agent.reads!r}")
            if isinstance(agent, HelperAgentConfig):
                served = self.agents.get(agent.serves)
                if not isinstance(served, LearnerConfig):
                    raise _FieldError(
                        f"agents.{name}.serves", f"names no agent with a prompt: {agent.serves!r}"
                    )
                continue
            for key in ("spectrum", "target"):
                value = getattr(agent, key)
                if value is not None and len(value) != self.d:
                    raise _FieldError(
                        f"agents.{name}.{key}", f"must have length d = {self.d} (got {len(value)})"
                    )
            if agent.spectrum is not None and min(agent.spectrum) <= 0:
                raise _FieldError(f"agents.{name}.spectrum", "must be all positive")
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
            if table is not None and len(self.agents) != 2:
                raise _FieldError(key, f"needs a two-agent play (got {len(self.agents)} agents)")
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
        attack = self.attack
        if attack is not None and attack.knowledge == "gray-box" and attack.method != "decoy":
            raise _FieldError("attack.knowledge", "gray-box applies to the decoy method only")
        if self.attack and self.defence and self.attack.agent == self.defence.agent:
            raise _FieldError("defence.agent", "the attacker cannot also be the defended agent")
        return self

    @property
    def order(self) -> list[str]:
        """The turn order of a round: ``schedule``, or every agent in file order."""
        return list(self.schedule) if self.schedule is not None else list(self.agents)


class _FieldError(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def parse_config(data: dict[str, Any]) -> PlayConfig:
    """Validate a configuration given as plain data.

    Raises:
        ConfigError: the first problem, as ``field: problem``.
    """
    return _validated(PlayConfig, data)


def _validated(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> PlayConfig:
    """Read and validate a TOML configuration.

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
    return parse_config(_read(path, overrides))


def _read(path: str | Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The TOML file as data, with the overrides applied."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
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
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is a string: --set agents.A.preconditioner=newton
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a table")
    node[leaf] = value


def _one_line(exc: ValidationError) -> str:
    """The first validation error as ``field: problem``."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    if len(loc) > 2 and loc[0] == "agents" and loc[2] in KINDS:
        del loc[2]  # the union's tag: agents.A.gd.n is agents.A.n
    field = ".".join(str(part) for part in loc)
    if isinstance(error.get("ctx", {}).get("error"), _FieldError):
        return str(error["ctx"]["error"])
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
    else:
        message = f"{message[0].lower()}{message[1:]} (got {error['input']!r})"
    return f"{field}: {message}" if field else message


class TrainConfig(_Strict):
    """Training a linear self-attention model on in-context regression (``misalign.train``).

    Tasks are drawn fresh every step: ``x ~ N(0, Lambda)``, ``w ~ N(0, I)``,
    ``y = x^T w``; ``Lambda`` has eigenvalues ``spectrum`` (rotated at random when
    ``rotate``). Separate seeds drive the model's initial weights (``seed``), the
    training tasks (``seed + 1``) and the evaluation tasks (``seed + 2``).
    """

    seed: int = Field(default=0, ge=0)
    d: int = Field(ge=1)
    n: int = Field(ge=1, description="in-context examples per prompt")
    spectrum: list[Finite] | None = Field(default=None, description="eigenvalues of Lambda")
    rotate: bool = False
    layers: int = Field(default=1, ge=1)
    coupled: bool = Field(
        default=False, description="train the label-coupling blocks too (see misalign.lsa.LSA)"
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
        return self


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read and validate a training configuration (see ``load_config``)."""
    return _validated(TrainConfig, _read(path, overrides))
