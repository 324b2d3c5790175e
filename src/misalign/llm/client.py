"""Talking to an OpenAI-compatible Chat Completions server, with one retry policy of ours.

The SDK's own retries are off (``max_retries=0``): HTTP 429, 5xx, timeouts and dropped
connections are retried here, with exponential backoff and jitter that honours
``Retry-After``, and every retry is counted (``Stats``). The ``response_format`` falls back
from ``json_schema`` to ``json_object`` to plain text while the server refuses it; the first
format that works is kept. The key is read from the environment by the caller, held in
memory only, and scrubbed from every message this module raises.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from misalign.config import ConfigError
from misalign.llm.answer import FORMATS, response_format

BACKOFF = 0.5
"""Seconds before the first retry; doubled at each retry, up to ``BACKOFF_CAP``."""
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0
"""The longest ``Retry-After`` honoured, in seconds."""
VARIABLE = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
"""A conventional environment variable's name; anything else in ``api_key_env`` may be a key
(``gsk_...`` passes the configuration's check of a name), so a message never repeats it."""


class Fatal(ConfigError):
    """A problem that stops the run, as one line (exit 2): everything recorded is kept."""


class Exhausted(Exception):
    """Retries ran out on a transient failure (429, 5xx, timeout): the play fails."""


@dataclass
class Stats:
    """What the requests of a run cost.

    Attributes:
        requests: requests sent to the server (retries included).
        cached: answers read from the store instead.
        retries: retries by cause (``429``, ``5xx``, ``timeout``, ``connection``, ``answer``,
            ``format``).
        tokens_in, tokens_out: tokens of the answers (sent or read from the store).
        cost: dollars, where the agents have prices.
    """

    requests: int = 0
    cached: int = 0
    retries: Counter = field(default_factory=Counter)
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0


@dataclass(frozen=True)
class Completion:
    """One answer: its text, tokens and latency (seconds, retries included)."""

    text: str | None
    tokens_in: int
    tokens_out: int
    latency: float


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
        stats: the counters to add to.
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
    ) -> None:
        from openai import AsyncOpenAI

        self.field, self.model, self.d, self.stats = field, model, d, stats
        self.base_url = base_url or "https://api.openai.com/v1"
        self._key, self._key_env, self.max_retries = key, key_env, max_retries
        self._sdk = AsyncOpenAI(
            api_key=key or "none", base_url=base_url, max_retries=0, timeout=timeout_s
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
            Fatal: the server is unreachable after every attempt, refuses the key, or
                refuses a passed-through setting (named).
        """
        import openai

        began, retry = time.monotonic(), 0
        while True:
            used = self.format
            fmt = response_format(FORMATS[used], self.d)
            extra = {} if fmt is None else {"response_format": fmt}
            self.stats.requests += 1
            try:
                response = await self._sdk.chat.completions.create(
                    model=self.model, messages=messages, extra_body=settings or None, **extra
                )
            except openai.APIStatusError as exc:
                status = exc.status_code
                if self._format_refused(exc, used, settings):
                    if self.format == used:
                        self.format = used + 1  # the server refuses this response_format
                    self.stats.retries["format"] += 1
                    continue
                if status == 429 or status >= 500:
                    cause = "429" if status == 429 else "5xx"
                    retry = await self._wait(retry, cause, _retry_after(exc.response.headers))
                    continue
                raise Fatal(self._refused(exc, settings)) from None
            except openai.APITimeoutError:
                retry = await self._wait(retry, "timeout", None)
                continue
            except openai.APIConnectionError:
                if retry >= self.max_retries:
                    raise Fatal(
                        self.scrub(
                            f"{self.field}.base_url: {self.base_url} unreachable after "
                            f"{retry + 1} attempts"
                        )
                    ) from None
                retry = await self._wait(retry, "connection", None)
                continue
            self._confirmed = True
            usage = response.usage
            text = response.choices[0].message.content if response.choices else None
            return Completion(
                text,
                usage.prompt_tokens if usage else 0,
                usage.completion_tokens if usage else 0,
                time.monotonic() - began,
            )

    async def _wait(self, retry: int, cause: str, retry_after: float | None) -> int:
        """Sleep before retry ``retry + 1``: ``2^retry`` times ``BACKOFF`` with jitter, at
        least the server's ``Retry-After``. Returns the new retry count.

        Raises:
            Exhausted: ``max_retries`` retries were spent.
        """
        if retry >= self.max_retries:
            raise Exhausted(f"{cause} after {retry + 1} attempts")
        self.stats.retries[cause] += 1
        backoff = min(BACKOFF_CAP, BACKOFF * 2**retry) * self._jitter.uniform(0.5, 1.0)
        await asyncio.sleep(max(backoff, min(retry_after or 0.0, RETRY_AFTER_CAP)))
        return retry + 1

    def _format_refused(self, exc, used: int, settings: dict) -> bool:
        """Whether an error may be the server refusing ``response_format`` ``FORMATS[used]``:
        a 400, 422 or 500 before any format worked, with another format left to try, that
        does not name one of the passed-through settings."""
        if exc.status_code not in (400, 422, 500) or self._confirmed:
            return False
        return used < len(FORMATS) - 1 and _named(exc, settings) is None

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
            held = f"${self._key_env}" if VARIABLE.fullmatch(self._key_env) else "api_key_env"
            return f"{self.field}.api_key_env: the server refused the key in {held} (HTTP {status})"
        named = _named(exc, settings)
        where = f"{self.field}.request.{named}" if named else f"{self.field}.model"
        message = " ".join(_message(exc).split())
        return self.scrub(f"{where}: the server refused the request (HTTP {status}: {message})")[
            :400
        ]

    def scrub(self, text: str) -> str:
        """``text`` with the key masked."""
        return text.replace(self._key, "***") if self._key else text

    async def close(self) -> None:
        await self._sdk.close()


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
    """The passed-through setting an error names (its ``param``, else the first setting
    its message mentions), or ``None``."""
    param = _error(exc).get("param")
    if isinstance(param, str) and param in settings:
        return param
    message = _message(exc)
    return next((key for key in settings if key in message), None)


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
