"""The messages a language-model agent reads: Jinja2 templates of its system and user message.

The defaults ship in ``misalign/llm/templates``: ``gd-step.j2`` states the step
``w - eta/n sum_j x_j (x_j^T w - y_j)`` and asks for its result; ``improve.j2`` gives the
examples and the other agent's estimate and asks for an improved estimate, with no formula.
Variables (docs/llm.md lists them): ``examples`` (objects with ``x``, a list of ``d`` floats,
and ``y``), ``estimate`` (the incoming estimate, rendered as a JSON list of floats), ``d``,
``n``, ``eta``, ``name``, ``round``.

A template may come from someone else. Its file is the configuration's to name: inside the
configuration's folder (``misalign.config.anchor_template``), a regular file (no FIFO,
device or directory is opened or waited on), at most ``MAX_FILE`` bytes of UTF-8. It is
compiled and rendered in Jinja2's ``ImmutableSandboxedEnvironment`` (no attribute that
reaches Python's internals, no method that changes a value), with ``StrictUndefined``, no
autoescape (prompts are text) and no constant folding. A template is one file:
``include``, ``import`` and ``extends`` are refused; the globals are ``range``, ``dict``,
``namespace``, ``cycler`` and ``joiner`` (not ``lipsum``). No value it builds may hold
more than ``MAX_SIZE`` characters or items (``PromptSandbox``: checked before ``+``, ``*``,
``**``, ``%``, ``~`` and widths compute, and on every literal, call and filter result), nor
a rendered message grow past it; a render takes at most ``MAX_STEPS`` steps and
``MAX_SECONDS`` of CPU time (``_Budget``, a trace function on the rendering thread). Any of
these is one line naming the template (``TemplateRefused``).

Why one module: the sandbox is one boundary (the environment, the step budget and every
size check); split, a check could be left out of one path.
"""

from __future__ import annotations

import inspect
import re
import string
import sys
import threading
import time
import types
from dataclasses import dataclass
from functools import update_wrapper
from pathlib import Path

import jinja2
import jinja2.compiler
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

from misalign.config import ConfigError, LLMAgentConfig
from misalign.runtime.files import UnsafeFile, open_regular

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
        """The text, streamed and cut off past ``MAX_SIZE`` characters, within the render's
        budget of steps and time (``_Budget``).

        Args:
            values: the template's variables.

        Returns:
            The rendered text.

        Raises:
            TemplateRefused: an unsafe attribute, an oversized value or text, a render past
                its budget, or any other failure to render (one line naming the field and
                the file).
        """
        parts, size = [], 0
        try:
            with _Budget():
                for part in self.compiled.generate(values):
                    size += len(part)
                    if size > MAX_SIZE:
                        raise jinja2.sandbox.SecurityError(
                            f"its text grows past {MAX_SIZE:,} characters"
                        )
                    parts.append(part)
        except (jinja2.sandbox.SecurityError, OverBudget) as exc:
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


class _Generator(jinja2.compiler.CodeGenerator):
    """Jinja2's code generator, with ``~`` and list, tuple and dict literals sent through
    ``PromptSandbox.checked_concat`` and ``PromptSandbox.built``, where they are checked."""

    def visit_Concat(self, node, frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.checked_concat({join}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_List(self, node, frame) -> None:
        self._built(super().visit_List, node, frame)

    def visit_Dict(self, node, frame) -> None:
        self._built(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame) -> None:
        if node.ctx == "load":  # not the targets of a for loop or a set
            self._built(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)

    def _built(self, visit, node, frame) -> None:
        self.write("environment.built(")
        visit(node, frame)
        self.write(")")


class PromptSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, with every value a template builds checked against
    ``MAX_SIZE`` (``_size``: characters, items and digits, counted through nested lists).

    Checked before they compute: ``+``, ``*``, ``**`` and ``%`` (``call_binop``), ``~``
    (``checked_concat``: the code generator routes it here), width and count arguments of the
    filters and of ``str`` methods (``center``, ``indent``, ``'{:>9999}'.format``...).
    Checked once built: list, tuple and dict literals (``built``), and what every call and
    filter returns, so no value a template holds writes more than about ``MAX_SIZE``
    characters, and nothing that walks it (printing, comparing, hashing) runs long.
    """

    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _Generator

    def call_binop(self, context, operator: str, left, right):
        """``left <operator> right``, refused when the result would be past the limits.

        Raises:
            SecurityError: the result would be past ``MAX_SIZE`` (``MAX_INT_BITS``).
        """
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        """A call from the template: its arguments checked first (``_check_call``), its
        result after (``_check_size``).

        Raises:
            SecurityError: an argument or the result past the limits, or an unsafe callable.
        """
        args = _check_call(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        return _check_size(result, "a call's result")

    def checked_concat(self, join, parts: tuple) -> str:
        """``a ~ b ~ ...``, refused before joining when the parts are too long together.

        Args:
            join: jinja2's join (``str_join``, or ``markup_join`` when escaping).
            parts: the values to join.

        Raises:
            SecurityError: the joined text would be past ``MAX_SIZE``.
        """
        _check_size(sum(_size(part) for part in parts), "a concatenation (~)")
        return join(parts)

    def built(self, value):
        """A list, tuple or dict literal, refused when it holds too much (nested lists
        counted with every repeat).

        Raises:
            SecurityError: past ``MAX_SIZE``.
        """
        return _check_size(value, "a literal")


class OverBudget(BaseException):
    """A render past its budget of steps or time. A ``BaseException``, so that no
    ``except Exception`` in jinja2 or in a filter can swallow it and let the render go on
    (untraced: Python drops a trace function that raises)."""


class _Budget:
    """The steps and time one render may take, enforced by a trace function
    (``sys.settrace``) on the rendering thread only, and the sizes ``_size`` has counted in
    it. A step is a line of the template's compiled code or the start (or resumption) of
    any Python function it calls; the clock is the thread's CPU time, read every
    ``CHECK_EVERY`` steps. The thread's previous trace function comes back afterwards.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = 0.0
        self.sizes: dict[int, tuple[object, int]] = {}  # id -> (the value, kept alive; size)
        self.previous = None

    def __enter__(self) -> _Budget:
        self.deadline = time.thread_time() + MAX_SECONDS
        self.previous = sys.gettrace()
        _LOCAL.budget = self
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self.previous)
        _LOCAL.budget = None

    def _call(self, frame, event: str, arg):
        """The global trace function: every new frame is a step; the template's own frames
        are traced line by line."""
        self._step()
        return self._line if frame.f_code.co_filename == "<template>" else None

    def _line(self, frame, event: str, arg):
        """The local trace function of the template's frames: every line is a step."""
        if event == "line":
            self._step()
        return self._line

    def _step(self) -> None:
        """Count a step; every ``CHECK_EVERY`` steps, check the budget.

        Raises:
            OverBudget: past ``MAX_STEPS`` steps or ``MAX_SECONDS`` of CPU time.
        """
        self.steps += 1
        if self.steps % CHECK_EVERY:
            return
        if self.steps > MAX_STEPS:
            raise OverBudget(f"it takes more than {MAX_STEPS:,} steps to render")
        if time.thread_time() > self.deadline:
            raise OverBudget(f"it takes more than {MAX_SECONDS:g} s to render")


_LOCAL = threading.local()
"""The render in progress on this thread (``budget``), for the sizes it has counted."""


def _size(value) -> int:
    """About how many characters a value writes: a string's length, an integer's digits,
    and for a list, tuple, dict or namespace one per item plus its items' sizes (a list
    holding the same string twice counts it twice). Counting stops past ``MAX_SIZE``, and
    containers counted during a render are remembered, so it never walks long.

    Args:
        value: any value a template holds.

    Returns:
        The size (anything past ``MAX_SIZE`` means too large).
    """
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 1
    if isinstance(value, jinja2.utils.Namespace):
        return 1 + _size(object.__getattribute__(value, "_Namespace__attrs"))
    if not isinstance(value, list | tuple | dict | set | frozenset):
        return 1
    budget = getattr(_LOCAL, "budget", None)
    known = budget.sizes.get(id(value)) if budget is not None else None
    if known is not None:
        return known[1]
    items = (*value.keys(), *value.values()) if isinstance(value, dict) else value
    size = 1
    for item in items:
        size += 1 + _size(item)
        if size > MAX_SIZE:
            break
    if budget is not None:
        budget.sizes[id(value)] = (value, size)
    return size


def _check_size(value, what: str):
    """``value`` itself, when its size (or ``value``, when a number) is within ``MAX_SIZE``.

    Args:
        value: a value, or a size already counted (an ``int`` is a size here).
        what: what built it, for the message.

    Returns:
        ``value``.

    Raises:
        SecurityError: ``<what> of <size> characters or items (at most MAX_SIZE)``.
    """
    size = value if type(value) is int else _size(value)
    if size > MAX_SIZE:
        raise jinja2.sandbox.SecurityError(f"{what} of more than {MAX_SIZE:,} characters or items")
    return value


def _check_binop(operator: str, left, right) -> None:
    """Refuse ``+``, ``*``, ``**`` and ``%`` whose result would be past ``MAX_SIZE``
    (``MAX_INT_BITS`` for integers), before computing it.

    Raises:
        SecurityError: naming the operator and the size.
    """
    ints = isinstance(left, int) and isinstance(right, int)
    sequences = (str, list, tuple)
    if operator == "+" and ints:
        bits = max(left.bit_length(), right.bit_length()) + 1
    elif operator == "*" and ints:
        bits = left.bit_length() + right.bit_length()
    elif operator == "**" and ints:
        bits = max(right, 0) * max(1, left.bit_length())
    else:
        bits = 0
        if operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
            _check_size(_size(left) + _size(right), "a sum (+)")
        for seq, times in ((left, right), (right, left)):
            if operator == "*" and isinstance(seq, sequences) and isinstance(times, int):
                _check_size(_size(seq) * times, "a repetition (*)")
        if operator == "%" and isinstance(left, str):
            _check_printf(left, right)
    if bits > MAX_INT_BITS:
        raise jinja2.sandbox.SecurityError(
            f"an integer {operator} of about {bits:,} bits (at most {MAX_INT_BITS:,})"
        )


def _check_printf(text: str, args) -> None:
    """Refuse ``text % args`` (and ``|format``) whose widths, precisions and arguments would
    write past ``MAX_SIZE`` characters; a ``*`` width (taken from the arguments) is refused.

    Raises:
        SecurityError: naming the width or the size.
    """
    size = len(text) + _size(args)
    for width, precision in PRINTF.findall(text):
        size += _number(width, "%") + _number(precision, "%")
    _check_size(size, "a % format")


def _check_format(text: str, args, kwargs) -> None:
    """Refuse ``text.format(...)`` (and ``format_map``) whose widths, precisions and
    arguments would write past ``MAX_SIZE`` characters; a width taken from the arguments
    (``{:{w}}``) is refused.

    Raises:
        SecurityError: naming the width or the size.
        ValueError: ``text`` is no format string.
    """
    size = len(text) + _size(args) + _size(kwargs)
    for _, _, spec, _ in string.Formatter().parse(text):
        match = FORMAT_SPEC.match(spec or "")
        if "{" in (spec or "") or match is None:
            raise jinja2.sandbox.SecurityError(f"a format spec {spec[:40]!r} is not checked")
        size += _number(match["width"], "format") + _number(match["precision"], "format")
    _check_size(size, "a str.format")


def _number(digits: str, what: str) -> int:
    """A width or precision as written in a format (``""``: none), refused past
    ``MAX_SIZE`` or when taken from the arguments (``*``).

    Raises:
        SecurityError: ``a <what> width of <digits>``.
    """
    if digits == "*" or len(digits) > len(str(MAX_SIZE)) or (digits and int(digits) > MAX_SIZE):
        raise jinja2.sandbox.SecurityError(
            f"a {what} width of {digits[:20]} (at most {MAX_SIZE:,})"
        )
    return int(digits or 0)


def _check_call(obj, args: tuple, kwargs: dict) -> tuple:
    """Check a call of a method of a string or a number before it runs: no integer argument
    past ``MAX_SIZE`` (``center``, ``ljust``, ``zfill``, ``to_bytes``...), and ``format``,
    ``replace``, ``expandtabs`` and ``join`` refused when their result would be.

    Args:
        obj: what the template calls (the sandbox wraps ``str.format``: its ``__wrapped__``).
        args: its positional arguments.
        kwargs: its keyword arguments.

    Returns:
        ``args``, with ``join``'s iterable made a list (counted, then joined).

    Raises:
        SecurityError: an argument or the result past ``MAX_SIZE``.
    """
    method = getattr(obj, "__wrapped__", obj)
    owner = getattr(method, "__self__", None)
    if not isinstance(method, types.BuiltinMethodType) or not isinstance(
        owner, str | bytes | int | float
    ):
        return args
    name = method.__name__
    if name in ("format", "format_map"):
        _check_format(owner, args, kwargs)
        return args
    for number in (*args, *kwargs.values()):
        if isinstance(number, int) and abs(number) > MAX_SIZE:
            raise jinja2.sandbox.SecurityError(f"{name}() with {number:,} (at most {MAX_SIZE:,})")
    if name == "join" and args:
        args = (list(args[0]), *args[1:])
        _check_size(sum(_size(a) for a in args[0]) + len(owner) * len(args[0]), "a join")
    elif name == "replace" and len(args) >= 2:
        _check_replace(owner, *args)
    elif name == "expandtabs" and isinstance(owner, str):
        tab = int(args[0] if args else kwargs.get("tabsize", 8))
        _check_size(len(owner) + owner.count("\t") * tab, "an expandtabs")
    return args


def _check_replace(text, old, new, count=-1) -> None:
    """Refuse ``text.replace(old, new, count)`` (and ``|replace``) whose result would be past
    ``MAX_SIZE``, before it is computed.

    Raises:
        SecurityError: naming the size.
    """
    if not isinstance(text, str | bytes):
        return
    times = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        times = min(times, count)
    _check_size(len(text) + times * _size(new), "a replace")


def _guarded(name: str, filter):
    """A filter, with its arguments checked before it runs (``FILTER_CHECKS``) and its
    result after (``_check_size``); jinja2's ``pass_context`` marks are kept.

    Args:
        name: the filter's name.
        filter: jinja2's filter.

    Returns:
        The guarded filter.
    """
    check = FILTER_CHECKS.get(name)
    signature = inspect.signature(filter)  # of the function jinja2's wrappers wrap
    passed = hasattr(filter, "jinja_pass_arg") and next(iter(signature.parameters)) not in PASSED
    skip = 1 if passed else 0  # a wrapper passes an argument its function does not take

    def guarded(*args, **kwargs):
        if check is not None:
            bound = signature.bind(*args[skip:], **kwargs)
            bound.apply_defaults()
            check(bound.arguments)
            args, kwargs = (*args[:skip], *bound.args), bound.kwargs
        return _check_size(filter(*args, **kwargs), f"the filter {name}'s result")

    return update_wrapper(guarded, filter)


def _check_width(arguments: dict, key: str) -> None:
    """Refuse an integer argument ``key`` past ``MAX_SIZE`` (a width, a count).

    Raises:
        SecurityError: ``a <key> of <n>``.
    """
    value = arguments.get(key)
    if isinstance(value, int) and abs(value) > MAX_SIZE:
        raise jinja2.sandbox.SecurityError(f"a {key} of {value:,} (at most {MAX_SIZE:,})")


def _check_indent(arguments: dict) -> None:
    """``|indent``: the prefix times the lines, refused past ``MAX_SIZE``."""
    _check_width(arguments, "width")
    text, width = arguments["s"], arguments["width"]
    prefix = width if isinstance(width, int) else _size(width)
    lines = text.count("\n") + 1 if isinstance(text, str) else _size(text)
    _check_size(_size(text) + lines * prefix, "an indent")


def _check_wordwrap(arguments: dict) -> None:
    """``|wordwrap``: the text and a line break per line, refused past ``MAX_SIZE``."""
    _check_width(arguments, "width")
    text, width = arguments["s"], arguments["width"]
    breaks = _size(text) // max(width, 1) + 1
    breaks += len(text.split()) if isinstance(text, str) else _size(text)
    _check_size(_size(text) + breaks * _size(arguments["wrapstring"] or "\n"), "a wordwrap")


def _check_join(arguments: dict) -> None:
    """``|join``: the items (made a list, counted once) and the separators."""
    arguments["value"] = items = list(arguments["value"])
    separators = _size(arguments["d"]) * len(items)
    _check_size(sum(_size(item) for item in items) + separators, "a join")


def _check_sum(arguments: dict) -> None:
    """``|sum`` of sequences (a ``start`` that is no number): the total, and the copying of
    adding them one by one, refused past ``MAX_SIZE`` (``100 MAX_SIZE``)."""
    if isinstance(arguments["start"], int | float):
        return
    arguments["iterable"] = items = list(arguments["iterable"])
    total = _size(arguments["start"]) + sum(_size(item) for item in items)
    _check_size(total, "a sum")
    _check_size(total * len(items) // 100, "a sum of sequences")


FILTER_CHECKS = {
    "center": lambda a: _check_width(a, "width"),
    "batch": lambda a: _check_width(a, "linecount"),
    "slice": lambda a: _check_width(a, "slices"),
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "join": _check_join,
    "sum": _check_sum,
    "replace": lambda a: _check_replace(a["s"], a["old"], a["new"], a["count"]),
    "format": lambda a: _check_printf(a["value"], a["kwargs"] or a["args"]),
}
"""The filters whose arguments can ask for more than their input holds, and how each is
checked before it runs. (``truncate`` cannot grow a text; ``random`` picks an item.)"""
PASSED = {"context", "eval_ctx", "environment"}
"""The first arguments jinja2 passes to a filter marked ``pass_context`` (and the like)."""
PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?[a-zA-Z%]")
"""A ``%`` conversion, with its width and precision."""
FORMAT_SPEC = re.compile(
    r"(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d*))?[a-zA-Z%]?\Z",
    re.DOTALL,
)
"""A ``str.format`` spec, with its width and precision."""


def _environment() -> PromptSandbox:
    """The sandbox a prompt template compiles in: strict about undefined names, no
    autoescape (a prompt is text), one file (no loader), no ``lipsum``, the filters guarded
    (``_guarded``), and no constant folding (which would run filters while compiling, outside
    the render's budget)."""
    env = PromptSandbox(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        optimized=False,
    )
    del env.globals["lipsum"]  # paragraphs of filler, up to any length
    env.filters = {name: _guarded(name, f) for name, f in env.filters.items()}
    return env


def _compile(path: str | Path, field: str, needs_estimate: bool) -> Template:
    """Read and compile one template in the sandbox (``StrictUndefined``: a misspelled
    variable is an error).

    Raises:
        ConfigError: not a regular file, larger than ``MAX_FILE``, not UTF-8, a syntax
            error, a name that is not a template variable, ``include``/``import``/
            ``extends``, or (``needs_estimate``) no ``estimate``.
    """
    source = _read(Path(path), field)
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


def _read(path: Path, field: str) -> str:
    """A template's text: a regular file (no FIFO, device or directory is opened or waited
    on, no link followed at its last step), at most ``MAX_FILE`` bytes, UTF-8.

    Args:
        path: the file (``prompt``/``system`` as the configuration resolved it).
        field: its configuration path, for messages.

    Returns:
        The text.

    Raises:
        ConfigError: one line naming the field and the file, and what is wrong.
    """
    try:
        with open_regular(path) as file:
            data = file.read(MAX_FILE + 1)
    except UnsafeFile as exc:
        raise ConfigError(f"{field}: {path} is {exc.why}, not a regular file") from None
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path} ({exc.strerror})") from None
    if len(data) > MAX_FILE:
        raise ConfigError(f"{field}: {path} is larger than {MAX_FILE:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{field}: cannot read {path} (not UTF-8 text)") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


OTHER_FILES = (
    jinja2.nodes.Include,
    jinja2.nodes.Import,
    jinja2.nodes.FromImport,
    jinja2.nodes.Extends,
)
"""Tags that read another template: refused (a template may not read other files)."""
MAX_SIZE = 1_000_000
"""The most characters (items, digits) a rendered message, and any value a template builds,
may hold."""
MAX_INT_BITS = 100_000
"""The most bits an integer a template computes may have (about 30,000 digits; Python
writes at most 4,300)."""
MAX_FILE = 1_000_000
"""The largest template file, in bytes."""
MAX_STEPS = 5_000_000
"""The most steps one render may take (``_Budget``)."""
MAX_SECONDS = 2.0
"""The most CPU seconds one render may take (``_Budget``)."""
CHECK_EVERY = 1024
"""Steps between two readings of the clock."""


VARIABLES = {"examples", "estimate", "d", "n", "eta", "name", "round"}
"""What a template may use."""
