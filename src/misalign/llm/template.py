"""The messages a language-model agent reads: Jinja2 templates of its system and user message.

The defaults ship in ``misalign/llm/templates``: ``gd-step.j2`` states the step
``w - eta/n sum_j x_j (x_j^T w - y_j)`` and asks for its result; ``improve.j2`` gives the
examples and the other agent's estimate and asks for an improved estimate, with no formula.
Variables (the README lists them): ``examples`` (objects with ``x``, a list of ``d`` floats,
and ``y``), ``estimate`` (the incoming estimate, rendered as a JSON list of floats), ``d``,
``n``, ``eta``, ``name``, ``round``.

A template may come from someone else, so it is compiled and rendered in Jinja2's
``ImmutableSandboxedEnvironment`` (no attribute that reaches Python's internals, no method
that changes a value), with ``StrictUndefined`` and no autoescape (prompts are text). A
template is one file: ``include``, ``import`` and ``extends`` are refused; the globals are
``range``, ``dict``, ``namespace``, ``cycler`` and ``joiner`` (not ``lipsum``); ``*`` and
``**`` cannot build values past ``MAX_SIZE``, nor can a rendered message grow past it. Any
of these is one line naming the template (``TemplateRefused``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
import numpy as np

from misalign.config import ConfigError, LLMAgentConfig, regular_file

DEFAULTS = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Example:
    """One in-context example as the template sees it."""

    x: list[float]
    y: float


class TemplateRefused(ConfigError):
    """A template that does not render, or that reaches for something a prompt may not
    (an unsafe attribute, a value past ``MAX_SIZE``); the message names the template."""


@dataclass(frozen=True)
class Template:
    """One compiled template and where it came from.

    Attributes:
        compiled: the sandboxed template.
        field: its configuration path (``agents.A.prompt``), for messages.
        path: its file.
    """

    compiled: jinja2.Template
    field: str
    path: str

    def render(self, values: dict) -> str:
        """The text, streamed and cut off past ``MAX_SIZE`` characters.

        Raises:
            TemplateRefused: an unsafe attribute, an oversized value or text, or any other
                failure to render (one line naming the field and the file).
        """
        parts, size = [], 0
        try:
            for part in self.compiled.generate(values):
                size += len(part)
                if size > MAX_SIZE:
                    raise jinja2.sandbox.SecurityError(
                        f"its text grows past {MAX_SIZE:,} characters"
                    )
                parts.append(part)
        except jinja2.sandbox.SecurityError as exc:
            raise TemplateRefused(f"{self._where()} is refused: {_one_line(exc)}") from None
        except Exception as exc:  # jinja2 raises many kinds; one line either way
            raise TemplateRefused(f"{self._where()} does not render: {_one_line(exc)}") from None
        return "".join(parts)

    def _where(self) -> str:
        return f"{self.field}: {self.path}"


@dataclass(frozen=True)
class Templates:
    """An agent's compiled templates.

    Attributes:
        user: the user message.
        system: the system message, or ``None`` for none.
        digits: significant digits of the numbers written; ``None``: exact.
    """

    user: Template
    system: Template | None
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

        Raises:
            TemplateRefused: a template does not render, or reaches for what a prompt may not.
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


class PromptSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, with ``*`` and ``**`` checked before they compute: a
    product or power that would hold more than ``MAX_SIZE`` items (characters, list items,
    digits) is refused."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator: str, left, right):
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
                if sized and len(seq) * times > MAX_SIZE:
                    raise jinja2.sandbox.SecurityError(
                        f"a repetition of {len(seq) * times:,} items (at most {MAX_SIZE:,})"
                    )
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            digits = abs(right) * max(1, abs(left).bit_length()) * 0.302
            if right > 0 and digits > MAX_SIZE:
                raise jinja2.sandbox.SecurityError(f"a power of about {digits:,.0f} digits")
        return super().call_binop(context, operator, left, right)


def _environment() -> PromptSandbox:
    """The sandbox a prompt template compiles in: strict about undefined names, no
    autoescape (a prompt is text), one file (no loader), no ``lipsum``."""
    env = PromptSandbox(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
    )
    del env.globals["lipsum"]  # paragraphs of filler, up to any length
    return env


def _compile(path: str | Path, field: str, needs_estimate: bool) -> Template:
    """Read and compile one template in the sandbox (``StrictUndefined``: a misspelled
    variable is an error).

    Raises:
        ConfigError: unreadable, not UTF-8, a syntax error, a name that is not a template
            variable, ``include``/``import``/``extends``, or (``needs_estimate``) no
            ``estimate``.
    """
    try:
        with open(path, "rb", opener=regular_file) as handle:
            data = handle.read(TEMPLATE_BYTES + 1)
        if len(data) > TEMPLATE_BYTES:
            raise ConfigError(f"{field}: {path} is larger than {TEMPLATE_BYTES:,} bytes")
        source = data.decode()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{field}: cannot read {path} (not UTF-8 text)") from None
    env = _environment()
    try:  # an unknown filter or test shows when the variables are looked for
        tree = env.parse(source)
        used = jinja2.meta.find_undeclared_variables(tree)
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
    other = next(tree.find_all(OTHER_FILES), None)
    if other is not None:
        tag = type(other).__name__.lower().replace("fromimport", "from ... import")
        raise ConfigError(
            f"{field}: {path} line {other.lineno} uses {{% {tag} %}}: a template is one file"
        )
    if needs_estimate and "estimate" not in used:
        raise ConfigError(f"{field}: {path} never uses 'estimate', the incoming estimate")
    return Template(template, field, str(path))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


OTHER_FILES = (
    jinja2.nodes.Include,
    jinja2.nodes.Import,
    jinja2.nodes.FromImport,
    jinja2.nodes.Extends,
)
"""Tags that read another template: refused (a template may not read other files)."""
TEMPLATE_BYTES = 1_000_000
"""The largest template file read."""
MAX_SIZE = 1_000_000
"""The most characters a rendered message, and items a ``*`` or ``**`` in a template, may
reach."""


VARIABLES = {"examples", "estimate", "d", "n", "eta", "name", "round"}
"""What a template may use."""
