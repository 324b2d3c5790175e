"""Talking to an OpenAI-compatible Chat Completions server, with one retry policy of ours.

The SDK's own retries are off (``max_retries=0``): HTTP 429, 5xx, timeouts and dropped
connections are retried here, with exponential backoff and jitter that honours
``Retry-After``, and every retry is counted (``Stats``). The ``response_format`` falls back
from ``json_schema`` to ``json_object`` to plain text while the server refuses it (a 400 or
422 before any format worked, an error about ``response_format``, or a 5xx that outlasts the
retries of a format not yet known to work); the first format that works is kept. A response
that is not a completion (not JSON, no message, content that is not text) is returned as a
``Completion`` with a ``problem``: a bad answer of its play, never a traceback. The key is
read from the environment by the caller, held in memory only, and scrubbed from every message
this module raises.

Why one module: the retry policy, the format fallback and the key's scrubbing act on the same
request and response objects in one loop; split, each part would need the others' state.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from misalign.config import ConfigError
from misalign.llm.answer import FORMATS, response_format
from misalign.llm.hosts import OPENAI_URL, ambient_headers
from misalign.runtime.text import plural, printable

BACKOFF = 0.5
"""Seconds before the first retry; doubled at each retry, up to ``BACKOFF_CAP``."""
BACKOFF_CAP = 30.0
FRAGMENT = 4
"""The shortest fragment of a key that is masked in messages."""
RETRY_AFTER_CAP = 120.0
"""The longest ``Retry-After`` honoured, in seconds."""
VARIABLE = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
"""A conventional environment variable's name; anything else in ``api_key_env`` may be a key
(``gsk_...`` passes the configuration's check of a name), so a message never repeats it."""


class Fatal(ConfigError):
    """A problem that stops the run, as one line (exit 2): everything recorded is kept."""


class OverLimit(Fatal):
    """The run reached ``--max-requests`` or ``--max-cost``: nothing more is sent, and the
    requests already in flight are answered and recorded before the run stops."""


class Exhausted(Exception):
    """Retries ran out on a transient failure (429, 5xx, timeout): the play fails."""


class Refused(Exception):
    """The server refused one request for good without naming a setting of ours, after a
    format had worked (a context grown too long with corrections): that play fails, the
    others go on."""


class Malformed(ValueError):
    """A response that is not a completion; the message says what is wrong with it."""


@dataclass
class Stats:
    """What the requests of a run cost.

    Attributes:
        requests: requests sent to the server (retries included).
        reserved: dollars held back for the requests in flight: the most each can cost
            (``cost_bound``), released when its answer comes.
        cached: answers read from the store instead (or shared with an identical request
            in flight at the same time).
        retries: retries by cause (``429``, ``5xx``, ``timeout``, ``connection``, ``answer``,
            ``format``).
        tokens_in, tokens_out: tokens of the answers the server gave in this run (paid).
        cost: dollars of those answers, where the agents have prices (paid).
        cached_tokens_in, cached_tokens_out, cached_cost: the same of the ``cached``
            answers, as recorded when they were paid for (not paid again).
    """

    requests: int = 0
    reserved: float = 0.0
    cached: int = 0
    retries: Counter = field(default_factory=Counter)
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    cached_tokens_in: int = 0
    cached_tokens_out: int = 0
    cached_cost: float = 0.0


@dataclass(frozen=True)
class Limits:
    """The most a run may send: ``requests`` in all (retries and corrections included) and
    ``cost`` in dollars of paid answers; ``None``: no limit. The client checks them before
    each request it sends (requests already in flight may finish past the cost)."""

    requests: int | None = None
    cost: float | None = None


NO_LIMITS = Limits()


@dataclass(frozen=True)
class Completion:
    """One answer: its text, tokens, latency (seconds, retries included), why the model
    stopped (``finish_reason``: ``"length"`` at the token limit), the server's build
    (``fingerprint``: its ``system_fingerprint``, ``None`` when it names none) and, for a
    response that was no completion, the ``problem`` (its text is then ``None``)."""

    text: str | None
    tokens_in: int
    tokens_out: int
    latency: float
    finish_reason: str | None = None
    problem: str | None = None
    fingerprint: str | None = None


class Client:
    """One agent's connection to its server.

    Args:
        field: the agent's configuration path (``agents.<name>``), for messages.
        model: the model's name at the server.
        base_url: the server; ``None`` for OpenAI's.
        key: the API key ('' for a server that needs none); kept in memory only.
        key_env: the name of the variable it came from, for messages.
        d: the answer's dimension (for the response format's schema).
        timeout_s: seconds per request.
        max_retries: retries of a transient failure before the play fails.
        stats: the counters to add to (every client of a run shares them).
        limits: the run's limits on requests and cost.
        prices: dollars per 1e6 input and output tokens (``None``: unpriced), for the cost a
            request may reach before it is sent (``--max-cost``).
    """

    def __init__(
        self,
        field: str,
        model: str,
        base_url: str | None,
        key: str,
        key_env: str,
        d: int,
        timeout_s: float,
        max_retries: int,
        stats: Stats,
        limits: Limits = NO_LIMITS,
        prices: tuple[float | None, float | None] = (None, None),
    ) -> None:
        from openai import AsyncOpenAI

        self.field, self.model, self.d, self.stats = field, model, d, stats
        self.limits, self.prices = limits, prices
        self.base_url = base_url or OPENAI_URL  # never the SDK's $OPENAI_BASE_URL
        self._key, self._key_env, self.max_retries = key, key_env, max_retries
        self._sdk = AsyncOpenAI(
            api_key=key or "none",
            base_url=self.base_url,
            max_retries=0,
            timeout=timeout_s,
            default_headers=ambient_headers(self.base_url),
        )
        self.format = 0  # index into FORMATS
        self._confirmed = False
        self._jitter = random.Random()

    async def complete(self, messages: list[dict], settings: dict) -> Completion:
        """Ask once, retrying transient failures.

        Args:
            messages: the chat messages.
            settings: passed through to the API (the agent's ``request`` table), into the
                request's body as they are: a server's own settings (llama.cpp's ``top_k``)
                too, and none is read as an option of the SDK (``timeout``, ``extra_headers``).

        Raises:
            Exhausted: 429, 5xx or timeouts outlasted ``max_retries`` retries.
            Refused: the server refused this request for good, naming no setting of ours,
                after a format had worked (the play fails).
            Fatal: the messages hold the key; the run reached its limit of requests or
                cost; the server is unreachable after every attempt, refuses the key, or
                refuses a passed-through setting (named).
        """
        import openai

        if self._key and any(self._key in str(m.get("content", "")) for m in messages):
            raise Fatal(
                f"{self.field}: refused to send a request whose messages hold the key "
                f"({self._held()}): a template or an example writes it"
            )
        began, retry, last = time.monotonic(), 0, len(FORMATS) - 1
        while True:
            used = self.format
            fmt = response_format(FORMATS[used], self.d)
            extra = {} if fmt is None else {"response_format": fmt}
            reserve = self._reservation(messages, settings, extra)
            self._within_limits(reserve)
            self.stats.requests += 1
            self.stats.reserved += reserve
            try:
                response = await self._sdk.chat.completions.create(
                    model=self.model, messages=messages, extra_body=settings or None, **extra
                )
                text, tokens_in, tokens_out, finish = _read(response)
                fingerprint = _fingerprint(response)
            except openai.APIStatusError as exc:
                status, named = exc.status_code, _named(exc, settings)
                formatted = status in (400, 422) or status >= 500
                if formatted and named is None and used != self.format:
                    self.stats.retries["format"] += 1  # sent before the format moved on
                    continue
                spent = status >= 500 and retry >= self.max_retries
                if formatted and named is None and used < last and self._downgrade(exc, spent):
                    if self.format == used:
                        self.format = used + 1  # the server refuses this response_format
                    self.stats.retries["format"] += 1
                    retry = 0  # the next format has retries of its own
                    continue
                if status == 429 or status >= 500:
                    cause = "429" if status == 429 else "5xx"
                    retry = await self._wait(retry, cause, _retry_after(exc.response.headers))
                    continue
                if status in (400, 413, 422) and named is None and self._confirmed:
                    raise Refused(self._problem(exc)) from None
                raise Fatal(self._refused(exc, settings)) from None
            except openai.APITimeoutError:
                retry = await self._wait(retry, "timeout", None)
                continue
            except openai.APIConnectionError:
                if retry >= self.max_retries:
                    raise Fatal(
                        self.scrub(
                            f"{self.field}.base_url: {self.base_url} unreachable after "
                            f"{plural(retry + 1, 'attempt')}"
                        )
                    ) from None
                retry = await self._wait(retry, "connection", None)
                continue
            except (openai.APIResponseValidationError, ValueError, TypeError, AttributeError) as e:
                problem = self.scrub(f"the server's response was malformed ({_malformed(e)})")
                return Completion(None, 0, 0, time.monotonic() - began, None, problem)
            finally:  # the answer's cost is counted by whoever records it, at once
                self.stats.reserved -= reserve
            self._confirmed = True
            if self._key and text and self._key in text:  # an answer that echoes the key
                text = text.replace(self._key, "***")  # is never stored or shown with it
            latency = time.monotonic() - began
            fingerprint = None if fingerprint is None else self.scrub(fingerprint)
            return Completion(text, tokens_in, tokens_out, latency, finish, None, fingerprint)

    async def _wait(self, retry: int, cause: str, retry_after: float | None) -> int:
        """Sleep before retry ``retry + 1``: ``2^retry`` times ``BACKOFF`` with jitter, at
        least the server's ``Retry-After``. Returns the new retry count.

        Raises:
            Exhausted: ``max_retries`` retries were spent.
        """
        if retry >= self.max_retries:
            raise Exhausted(f"{cause} after {plural(retry + 1, 'attempt')}")
        self.stats.retries[cause] += 1
        backoff = min(BACKOFF_CAP, BACKOFF * 2**retry) * self._jitter.uniform(0.5, 1.0)
        await asyncio.sleep(max(backoff, min(retry_after or 0.0, RETRY_AFTER_CAP)))
        return retry + 1

    def _reservation(self, messages: list[dict], settings: dict, extra: dict) -> float:
        """The most a request can cost, held back while it is in flight (0 without a cost
        limit or prices; the limit is refused before the run when it cannot be bounded)."""
        if self.limits.cost is None:
            return 0.0
        bound = cost_bound(messages, settings, extra, *self.prices)
        return 0.0 if bound is None else bound

    def _within_limits(self, reserve: float = 0.0) -> None:
        """Check, before a request is sent, that the run stays within its limits.

        Args:
            reserve: the most this request can cost (``_reservation``).

        Raises:
            OverLimit: ``--max-requests`` requests were sent, or the dollars paid, held for
                the requests in flight and this one's most could pass ``--max-cost``.
        """
        most, spent = self.limits.requests, self.stats.requests
        if most is not None and spent >= most:
            raise OverLimit(
                f"--max-requests {most}: reached ({plural(spent, 'request', spec=',')} sent, "
                "retries and corrections included); every answer is in the store, and a re-run "
                "with a higher limit goes on from there"
            )
        cost, paid = self.limits.cost, self.stats.cost
        if cost is not None and paid + self.stats.reserved + reserve > cost:
            raise OverLimit(
                f"--max-cost {cost:g}: reached (${paid:,.4f} paid, "
                f"${self.stats.reserved:,.4f} held for requests in flight, and the next may "
                f"cost up to ${reserve:,.4f}); every answer is in the store, and a re-run with "
                "a higher limit goes on from there"
            )

    def _held(self) -> str:
        """Where the key came from, for messages: ``$NAME`` (never the key itself)."""
        return f"${self._key_env}" if VARIABLE.fullmatch(self._key_env) else "api_key_env"

    def _downgrade(self, exc, spent: bool) -> bool:
        """Whether an error that names none of our settings (a 400, 422 or 5xx) is the server
        refusing the ``response_format`` sent: its ``param`` is ``response_format``; or no
        format has worked yet and it is a 400 or 422, a 5xx whose message is about the format
        (llama.cpp's 500 says "Input should be 'text' or 'json_object'" of
        ``response_format``), or a 5xx that outlasted the retries (``spent``). A single 5xx
        with another message is retried on the same format first."""
        if _param(exc) == "response_format":
            return True
        if self._confirmed:
            return False
        if exc.status_code in (400, 422):
            return True
        return spent or ABOUT_FORMAT.search(_message(exc)) is not None

    def _problem(self, exc) -> str:
        """One line for a request the server refused for good, naming nothing of ours."""
        message = " ".join(_message(exc).split())
        why = f"the server refused the request (HTTP {exc.status_code}: {message})"
        return self.scrub(why)[:300]

    def _refused(self, exc, settings: dict) -> str:
        """One line for a request the server refuses for good, naming the setting when the
        server names one of ours; the key never appears in it."""
        status = exc.status_code
        if status in (401, 403) and not self._key_env:
            return (
                f"{self.field}.api_key_env: the server wants a key (HTTP {status}); set "
                "api_key_env to the name of the environment variable holding it"
            )
        if status in (401, 403):
            return (
                f"{self.field}.api_key_env: the server refused the key in {self._held()} "
                f"(HTTP {status})"
            )
        named = _named(exc, settings)
        where = f"{self.field}.request.{named}" if named else f"{self.field}.model"
        message = " ".join(_message(exc).split())
        return self.scrub(f"{where}: the server refused the request (HTTP {status}: {message})")[
            :400
        ]

    def scrub(self, text: str) -> str:
        """``text`` (a message with a server's words in it) with the key, and every fragment
        of it, masked (``mask_key``), and control characters written as escapes."""
        return printable(mask_key(text, self._key))

    async def close(self) -> None:
        await self._sdk.close()


def cost_bound(
    messages: list[dict],
    settings: dict,
    extra: dict,
    price_in: float | None,
    price_out: float | None,
) -> float | None:
    """The most one request can cost, in dollars: its input is at most one token per byte of
    its body (the UTF-8 bytes of its ``messages``, ``settings`` and ``extra`` (the response
    format), plus ``OVERHEAD`` per message), its output at most ``max_completion_tokens`` (or
    ``max_tokens``) of ``settings``.

    Returns:
        The bound; 0 without prices; ``None`` with a price on output and no limit on it.
    """
    if price_in is None and price_out is None:
        return 0.0
    most_out = settings.get("max_completion_tokens", settings.get("max_tokens"))
    limited = isinstance(most_out, int) and not isinstance(most_out, bool) and most_out >= 0
    if not limited and price_out:
        return None
    body = len(json.dumps([messages, settings, extra]).encode()) + OVERHEAD * len(messages)
    return (body * (price_in or 0.0) + (most_out if limited else 0) * (price_out or 0.0)) / 1e6


OVERHEAD = 8
"""Tokens a chat format adds per message, at most (role and separators)."""


def mask_key(text: str, key: str, shortest: int = FRAGMENT) -> str:
    """``text`` with every run of characters made of ``shortest``-character pieces of
    ``key`` replaced by ``***``: the key, and any fragment of ``shortest`` or more characters
    of it (a server echoes ``sk-TESTK...``), never survive. A run of pieces that are each in
    the key but not contiguous in it is masked too: a little too much, never too little.

    Args:
        text: a message to print or store.
        key: the key ('' : nothing to mask).
        shortest: the shortest fragment masked.
    """
    if not key or not text:
        return text
    if len(key) < shortest:
        return text.replace(key, "***")
    pieces = {key[i : i + shortest] for i in range(len(key) - shortest + 1)}
    covered = bytearray(len(text))
    for i in range(len(text) - shortest + 1):
        if text[i : i + shortest] in pieces:
            covered[i : i + shortest] = b"\x01" * shortest
    out, i = [], 0
    while i < len(text):
        if covered[i]:
            while i < len(text) and covered[i]:
                i += 1
            out.append("***")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _error(exc) -> dict:
    """The error object of an OpenAI-style error body (``{"error": {...}}`` or the object
    itself, as the SDK hands it over); ``{}`` when there is none."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    return error if isinstance(error, dict) else {}


def _message(exc) -> str:
    """The server's message for an error."""
    return str(_error(exc).get("message") or exc.message)


def _named(exc, settings: dict) -> str | None:
    """The passed-through setting an error names, or ``None``: its ``param`` when it has one
    (``top_k`` of ``top_k``, ``extra.x`` or ``extra[0]``), else the first setting its message
    mentions in quotes (``'user'``, ``"user"``, ```user```) or, for a name with an
    underscore, as a whole word (``top_k is not supported``); "this user tier" names none."""
    param = _param(exc)
    if param is not None:
        return param if param in settings else None
    message = _message(exc)
    for key in settings:
        name = re.escape(key)
        if re.search(rf"(['\"`]){name}\1", message) or (
            "_" in key and re.search(rf"(?<![\w.]){name}(?!\w)", message)
        ):
            return key
    return None


def _param(exc) -> str | None:
    """The top-level request key an error's ``param`` names (``top_k`` of ``top_k.x`` or
    ``top_k[0]``), or ``None`` when it names none."""
    param = _error(exc).get("param")
    if not isinstance(param, str) or not param:
        return None
    return re.split(r"[.\[]", param, maxsplit=1)[0]


ABOUT_FORMAT = re.compile(r"response_format|schema", re.IGNORECASE)
"""A server error about the ``response_format`` sent (``json_schema``, a schema)."""


def _count(value) -> int:
    """A token count as the server gave it: ``None`` or anything unreadable is 0."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError, OverflowError):
        return 0


def _read(response) -> tuple[str | None, int, int, str | None]:
    """The text, tokens in and out and finish reason of a completion.

    Raises:
        Malformed: the response is no completion (a list, HTML, no message, content that
            is not text).
    """
    choices = getattr(response, "choices", None)
    if choices is None:  # the SDK hands over other JSON, and text, as it is
        what = "text" if isinstance(response, str) else f"a JSON {type(response).__name__}"
        raise Malformed(f"{what}, not a completion")
    if not isinstance(choices, list):
        raise Malformed("its choices are not a list")
    text, finish = None, None
    if choices:
        message = getattr(choices[0], "message", None)
        if message is None:
            raise Malformed("a choice without a message")
        text = getattr(message, "content", None)
        if text is not None and not isinstance(text, str):
            raise Malformed(f"its content is a {type(text).__name__}, not text")
        finish = getattr(choices[0], "finish_reason", None)
    usage = getattr(response, "usage", None)
    return (
        text,
        _count(getattr(usage, "prompt_tokens", 0)),
        _count(getattr(usage, "completion_tokens", 0)),
        finish if isinstance(finish, str) else None,
    )


FINGERPRINT_CHARS = 300
"""The longest ``system_fingerprint`` kept (a server's text, stored with every answer)."""


def _fingerprint(response) -> str | None:
    """The server's build, as its response names it (``system_fingerprint``), at most
    ``FINGERPRINT_CHARS`` characters; ``None`` when it names none or it is not text."""
    fingerprint = getattr(response, "system_fingerprint", None)
    return fingerprint[:FINGERPRINT_CHARS] if isinstance(fingerprint, str) else None


def _malformed(exc: Exception) -> str:
    """What was wrong with a response, in a few words."""
    if isinstance(exc, Malformed):
        return str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return "not JSON"
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:120]


def _retry_after(headers) -> float | None:
    """The server's ``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``, in
    seconds; ``None`` when absent or unreadable."""
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
