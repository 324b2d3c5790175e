"""The messages a language-model agent reads: Jinja2 templates of its system and user message.

The defaults ship in ``misalign/llm/templates``: ``gd-step.j2`` states the step
``w - eta/n sum_j x_j (x_j^T w - y_j)`` and asks for its result; ``improve.j2`` gives the
examples and the other agent's estimate and asks for an improved estimate, with no formula.
Variables (the README lists them): ``examples`` (objects with ``x``, a list of ``d`` floats,
and ``y``), ``estimate`` (the incoming estimate, rendered as a JSON list of floats), ``d``,
``n``, ``eta``, ``name``, ``round``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.meta
import numpy as np

from misalign.config import ConfigError, LLMAgentConfig

DEFAULTS = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Example:
    """One in-context example as the template sees it."""

    x: list[float]
    y: float


@dataclass(frozen=True)
class Templates:
    """An agent's compiled templates.

    Attributes:
        user: the user message.
        system: the system message, or ``None`` for none.
        digits: significant digits of the numbers written; ``None``: exact.
    """

    user: jinja2.Template
    system: jinja2.Template | None
    digits: int | None = None

    @classmethod
    def load(cls, config: LLMAgentConfig, field: str) -> Templates:
        """Compile an agent's templates, checking that the user message uses ``estimate``.

        Args:
            config: the agent's configuration (``prompt``, ``system``, ``protocol``).
            field: the agent's configuration path, ``agents.<name>``, for error messages.

        Raises:
            ConfigError: a template is missing, does not parse, or never uses ``estimate``.
        """
        user_path = config.prompt or DEFAULTS / f"{config.protocol}.j2"
        system_path = config.system or DEFAULTS / "system.j2"
        key = "prompt" if config.prompt else "protocol"
        user = _compile(user_path, f"{field}.{key}", needs_estimate=True)
        system = _compile(system_path, f"{field}.system", needs_estimate=False)
        return cls(user, system, config.digits)

    def messages(
        self,
        name: str,
        X: np.ndarray,
        y: np.ndarray,
        estimate: np.ndarray,
        eta: float,
        round: int,
    ) -> list[dict[str, str]]:
        """The chat messages of one request.

        Args:
            name: the agent's name.
            X: its examples' inputs, ``(n, d)``.
            y: their labels, ``(n,)``.
            estimate: the incoming estimate ``w``, ``(d,)``.
            eta: the step size the prompt states.
            round: the round (0 for probes).

        Returns:
            ``[{"role": "system", ...}, {"role": "user", ...}]`` (no system message when the
            system template renders empty).
        """
        n, d = X.shape
        values = {
            "examples": [
                Example(self._numbers(x), self._numbers(v)) for x, v in zip(X, y, strict=True)
            ],
            "estimate": self._numbers(estimate),
            "d": d,
            "n": n,
            "eta": eta,
            "name": name,
            "round": round,
        }
        out = []
        if self.system is not None:
            text = self.system.render(values).strip()
            if text:
                out.append({"role": "system", "content": text})
        out.append({"role": "user", "content": self.user.render(values).strip()})
        return out

    def _numbers(self, values: np.ndarray):
        """Floats as the prompt writes them: exact (shortest round-trip text), or rounded to
        ``digits`` significant digits."""
        if self.digits is not None:
            values = np.vectorize(lambda v: float(f"{v:.{self.digits}g}"), otypes=[float])(values)
        return np.asarray(values, dtype=float).tolist()


def _compile(path: str | Path, field: str, needs_estimate: bool) -> jinja2.Template:
    """Read and compile one template (``StrictUndefined``: a misspelled variable is an error)."""
    try:
        source = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{field}: cannot read {path} (not UTF-8 text)") from None
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:  # an unknown filter or test shows when the variables are looked for
        used = jinja2.meta.find_undeclared_variables(env.parse(source))
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        message = " ".join(str(exc.message).split())
        raise ConfigError(f"{field}: {path} line {exc.lineno}: {message}") from None
    unknown = sorted(used - VARIABLES)
    if unknown:
        raise ConfigError(
            f"{field}: {path} uses {unknown[0]!r}, which is not a template variable "
            f"({', '.join(sorted(VARIABLES))})"
        )
    if needs_estimate and "estimate" not in used:
        raise ConfigError(f"{field}: {path} never uses 'estimate', the incoming estimate")
    return template


VARIABLES = {"examples", "estimate", "d", "n", "eta", "name", "round"}
"""What a template may use."""
