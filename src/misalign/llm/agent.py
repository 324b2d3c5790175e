"""The language-model agent: a black box that answers the incoming estimate in text.

One ``respond`` per turn serves the whole batch: it renders every play's messages, reads the
store first, and fans the requests it still needs out concurrently (at most ``concurrency``
in flight), on one event loop that the run's ``Session`` keeps in a thread; a request
identical to one in flight waits for that one's answer instead of being sent again. A play
whose agent cannot produce ``d`` finite numbers after ``max_retries`` corrections, whose
transient failures outlast the retries, or whose request the server refuses for good without
naming a setting (a context grown too long), ends with status ``failed`` (its outputs from
then on are NaN; everything before is kept) while the other plays go on.

Its map ``f(w) ~ A w + c`` is fitted from probes (``misalign.llm.fit``); until then
``affine()`` is ``None``.

Why one module: the agent and the session it runs in share one event loop and one set of
counters; splitting them would pass both through every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from misalign.config import ConfigError, LLMAgentConfig
from misalign.llm.answer import FORMATS, BadAnswer, correction, parse
from misalign.llm.client import (
    NO_LIMITS,
    VARIABLE,
    Client,
    Exhausted,
    Fatal,
    Limits,
    OverLimit,
    Refused,
    Stats,
)
from misalign.llm.hosts import allowed_hosts, check_destination
from misalign.llm.store import Record, Slot, Store, Tampered, request_key
from misalign.llm.template import TemplateRefused, Templates
from misalign.model.agent import BlackBox, Turn
from misalign.model.prompt import Prompt
from misalign.runtime.text import printable

Mode = Literal["live", "replay", "refresh"]


class Session:
    """What the language-model agents of a run share: the store, the mode, the counters and
    the event loop.

    Args:
        store: the SQLite store's path (a new one is created by the first answer written:
            a run that fails before then leaves no file).
        mode: ``live`` reads the store first and asks the server for the rest; ``replay``
            never asks (a miss is an error); ``refresh`` asks again and records the new answers.
        fork_at: take the play's answers before this round from the store, by position
            (agent, play, round), whatever the configuration now says; ask for the rest.
        allow_hosts: hosts besides OpenAI's that a key may be sent to (``--allow-host``;
            ``$MISALIGN_ALLOW_HOSTS`` adds to them): ``misalign.llm.hosts``.
        limits: the most requests and dollars the run may spend (``--max-requests``,
            ``--max-cost``); the clients stop there.
    """

    def __init__(
        self,
        store: str,
        mode: Mode = "live",
        fork_at: int | None = None,
        allow_hosts: Sequence[str] = (),
        limits: Limits = NO_LIMITS,
    ) -> None:
        self.mode, self.fork_at, self.limits = mode, fork_at, limits
        self.allow_hosts = allowed_hosts(allow_hosts)
        self.store = Store(store, readonly=mode == "replay", lazy=True)
        self.stats = Stats()
        self.failed: list[dict] = []
        self.on_answer: Callable[[], None] | None = None
        self.inflight: dict[str, asyncio.Future] = {}
        """The requests sent and not yet answered, by key: an identical request waits."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._clients: list[Client] = []
        self._closed = False

    def run(self, coroutine):
        """Run a coroutine on the session's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        """Close the clients, the loop and the store (once: closing again does nothing)."""
        if self._closed:
            return
        self._closed = True
        try:
            for client in self._clients:
                self.run(client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self.store.close()


class LLMAgent(BlackBox):
    """A language model as an agent.

    Args:
        name: the agent's name.
        config: its configuration (one for the whole batch).
        prompts: one prompt per play.
        seeds: each play's seed (the store's ``play``; ``uint64`` seeds are written as Python
            integers, since SQLite would store a NumPy integer as an 8-byte blob).
        session: the run's session.

    Raises:
        ConfigError: before any request, as one line: a template that does not compile or
            render, a credential's name inside ``request``, a value inside ``request`` that
            holds the key (named by its place, never shown), or (except in a replay) the
            key would go to a host the user did not allow (``misalign.llm.hosts``) or the
            variable ``api_key_env`` names is not set.
    """

    def __init__(
        self,
        name: str,
        config: LLMAgentConfig,
        prompts: Sequence[Prompt],
        seeds: Sequence[int],
        session: Session,
    ) -> None:
        self.name, self.config, self.prompts = name, config, prompts
        self.seeds = [int(seed) for seed in seeds]
        self.session = session
        self.field = f"agents.{name}"
        _check_request(config.request, config.api_key_env, self.field)
        self.d = prompts[0].d
        self.templates = Templates.load(config, self.field)
        self.messages(0, np.zeros(self.d), 0)  # a template that fails, fails before a request
        self._client: Client | None = None
        if session.mode != "replay":
            check_destination(self.field, config.base_url, config.api_key_env, session.allow_hosts)
            _check_key(config.api_key_env, self.field)
        self._semaphore: asyncio.Semaphore | None = None
        self.failed = np.zeros(len(prompts), dtype=bool)
        self.history: list[tuple[np.ndarray, np.ndarray]] = []
        """The play's turns since ``start``: (inputs read, answers), ``(B, d)`` each."""

    @property
    def format(self) -> str | None:
        """The ``response_format`` the server accepted (``None``: no request was sent)."""
        return None if self._client is None else FORMATS[self._client.format]

    def start(self, batch: int) -> None:
        if batch != len(self.prompts):
            raise ValueError(f"agent {self.name} holds {len(self.prompts)} plays, not {batch}")
        self.failed[:] = False
        self.history = []

    def respond(self, w: np.ndarray, turn: Turn) -> np.ndarray:
        """Every live play's answer to its incoming estimate; NaN for failed plays."""
        slots = [Slot(self.name, seed, "play", turn.round, turn.position) for seed in self.seeds]
        live = [b for b in range(len(w)) if not self.failed[b] and np.isfinite(w[b]).all()]
        out = np.full(w.shape, np.nan) if turn.out is None else turn.out
        out[...] = np.nan
        answers = self.ask([(b, w[b], slots[b]) for b in live])
        for b, answer in zip(live, answers, strict=True):
            if answer is None:
                self.failed[b] = True
            else:
                out[b] = answer
        self.history.append((w.copy(), out.copy()))
        return out

    def ask(self, requests: Sequence[tuple[int, np.ndarray, Slot]]) -> list[np.ndarray | None]:
        """Answers to ``(play, estimate, slot)`` requests, concurrently; ``None`` where the
        play failed."""

        async def everything():
            if self._semaphore is None:
                self._semaphore = asyncio.Semaphore(self.config.concurrency)
            try:  # a fatal problem cancels the requests in flight
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(_unless_over(self._answer(*r))) for r in requests]
            except ExceptionGroup as problems:  # the first Fatal, else the first problem
                fatal = [e for e in problems.exceptions if isinstance(e, Fatal)]
                raise (fatal or problems.exceptions)[0] from None
            answers = [task.result() for task in tasks]
            over = next((a for a in answers if isinstance(a, OverLimit)), None)
            if over is not None:  # raised once the requests in flight are recorded
                raise over
            return answers

        return self.session.run(everything())

    def messages(self, play: int, estimate: np.ndarray, round: int) -> list[dict]:
        """The chat messages of one request.

        Raises:
            Fatal: a template does not render or is refused (one line naming it; at setup,
                or at a later round).
        """
        prompt = self.prompts[play]
        try:
            return self.templates.messages(
                self.name, prompt.X, prompt.y, estimate, self.config.eta, round
            )
        except TemplateRefused as exc:
            raise Fatal(f"{exc} (seed {self.seeds[play]}, round {round})") from None

    def _settings(self, sample: int) -> dict:
        """The passed-through settings; a ``seed`` is offset by the sample index, so that the
        samples of a probe are distinct draws."""
        settings = dict(self.config.request)
        seed = settings.get("seed")
        if sample and isinstance(seed, int) and not isinstance(seed, bool):
            settings["seed"] += sample
        return settings

    async def _answer(self, play: int, estimate: np.ndarray, slot: Slot) -> np.ndarray | None:
        """One play's answer: from the store, else from the server, with up to
        ``max_retries`` corrections of a bad answer; ``None`` when the play fails.

        Raises:
            Fatal: a replay or fork misses the store, or the server refuses for good.
        """
        session = self.session
        if session.fork_at is not None and slot.kind == "play" and slot.round < session.fork_at:
            return self._forked(slot)
        messages = self.messages(play, estimate, slot.round)
        settings = self._settings(slot.sample)
        tries = self.config.max_retries + 1
        last = "no answer"
        for attempt in range(tries):
            request = {"model": self.config.model, "messages": messages, **settings}
            key = request_key(request, slot.sample)
            try:
                record, cached = await self._record(key, slot, attempt, request)
            except (Exhausted, Refused) as exc:
                return self._fail(slot, f"{exc}; {last}")
            try:
                answer = self._accepted(record)
            except BadAnswer as exc:
                last = _last(record, str(exc))
                if attempt == tries - 1:
                    break
                session.stats.retries["answer"] += 1
                messages = [
                    *messages,
                    {"role": "assistant", "content": (record.raw or "")[:ECHOED]},
                    {"role": "user", "content": correction(str(exc), self.d)},
                ]
                continue
            if cached and session.mode != "replay":
                session.store.accept(slot, key)  # so that --fork-at finds it at its slot
            self._answered()
            return answer
        return self._fail(
            slot, f"no valid answer after {tries} tr{'y' if tries == 1 else 'ies'}; {last}"
        )

    def _accepted(self, record: Record) -> np.ndarray:
        """The estimate of an answer.

        Raises:
            BadAnswer: the answer was refused when it came (cut off at the token limit, a
                malformed response), or is not ``d`` finite numbers.
        """
        if record.problem:
            raise BadAnswer(record.problem)
        if record.estimate is not None:
            return record.estimate
        return parse(record.raw, self.d)

    def _forked(self, slot: Slot) -> np.ndarray:
        """``--fork-at``: the answer the slot took before, whatever the request is now.

        Raises:
            Fatal: no run answered the slot, or its row fails its checks.
        """
        with self._trusted(slot):
            record = self.session.store.at(slot, self.config.model, self.d)
        if record is None:
            raise Fatal(self._missing(slot, "--fork-at"))
        _count_cached(self.session.stats, record)
        self._answered()
        return record.estimate

    async def _record(
        self, key: str, slot: Slot, attempt: int, request: dict
    ) -> tuple[Record, bool]:
        """The answer to ``request``: the store's (``refresh``: never), else an identical
        request's in flight, else the server's, recorded at once; with its tokens and cost
        counted (as paid only when the server gave it now).

        Returns:
            The record, and whether it came from the store.

        Raises:
            Fatal: a replay misses the store, the store's row fails its checks, or the
                server refuses for good.
            Exhausted: transient failures outlasted the retries (recorded, so that a replay
                fails the play where the run failed it; a live re-run asks again).
        """
        session, stats = self.session, self.session.stats
        record = None
        if session.mode != "refresh":
            with self._trusted(slot):
                record = session.store.get(key, self.config.model, self.d)
        cached = record is not None
        if record is None and session.mode == "replay":
            why = session.store.exhausted(key)
            if why is None:
                raise Fatal(self._missing(slot, "--replay"))
            raise Exhausted(why)  # the play failed here when it was recorded
        if record is None and (pending := session.inflight.get(key)) is not None:
            record, cached = await asyncio.shield(pending), True  # asked once, answered once
        if record is None:
            record = await self._sent(key, slot, attempt, request)
            stats.tokens_in += record.tokens_in
            stats.tokens_out += record.tokens_out
            stats.cost += record.cost or 0.0
        else:
            _count_cached(stats, record)
        return record, cached

    async def _sent(self, key: str, slot: Slot, attempt: int, request: dict) -> Record:
        """The server's answer to ``request``, recorded at once; identical requests made
        meanwhile wait for it (``Session.inflight``).

        Raises:
            Fatal: the server refuses for good.
            Exhausted, Refused: the play fails here (recorded, so that a replay fails it too).
        """
        session = self.session
        shared = asyncio.get_running_loop().create_future()
        shared.add_done_callback(_seen)
        session.inflight[key] = shared
        try:
            settings = {k: v for k, v in request.items() if k not in ("model", "messages")}
            try:
                record = await self._ask_server(request["messages"], settings)
            except (Exhausted, Refused) as exc:
                session.store.exhaust(key, slot, str(exc))
                raise
            session.store.put(key, slot, attempt, request, record)
        except asyncio.CancelledError:
            shared.cancel()
            raise
        except BaseException as exc:
            shared.set_exception(exc)
            raise
        else:
            shared.set_result(record)
            return record
        finally:
            session.inflight.pop(key, None)

    async def _ask_server(self, messages: list[dict], settings: dict) -> Record:
        client = self._connect()
        async with self._semaphore:
            completion = await client.complete(messages, settings)
        problem, estimate = completion.problem, None
        if problem is None and completion.finish_reason == "length":
            try:  # JSON that parses whole was not cut off (trailing whitespace at the limit)
                estimate = parse(completion.text, self.d, strict=True)
            except BadAnswer:
                problem = CUT_OFF
        elif problem is None:
            with contextlib.suppress(BadAnswer):  # kept without an estimate
                estimate = parse(completion.text, self.d)
        return Record(
            completion.text,
            estimate,
            completion.tokens_in,
            completion.tokens_out,
            completion.latency,
            self._cost(completion.tokens_in, completion.tokens_out),
            problem,
            completion.fingerprint,
        )

    def _connect(self) -> Client:
        if self._client is None:
            env = self.config.api_key_env
            self._client = Client(
                self.field,
                self.config.model,
                self.config.base_url,
                os.environ.get(env, "") if env else "",
                env,
                self.d,
                self.config.timeout_s,
                self.config.max_retries,
                self.session.stats,
                self.session.limits,
                (self.config.price_in, self.config.price_out),
            )
            self.session._clients.append(self._client)
        return self._client

    def _cost(self, tokens_in: int, tokens_out: int) -> float | None:
        price_in, price_out = self.config.price_in, self.config.price_out
        if price_in is None and price_out is None:
            return None
        return (tokens_in * (price_in or 0.0) + tokens_out * (price_out or 0.0)) / 1e6

    def _fail(self, slot: Slot, why: str) -> None:
        """Note that ``slot``'s play failed, and why (a probe's failure names the probe and
        the sample, in ``why`` and as ``probe`` and ``sample``)."""
        failure = {"agent": self.name, "seed": slot.play, "kind": slot.kind, "round": slot.round}
        if slot.kind == "probe":
            why = f"probe {slot.position}, sample {slot.sample}: {why}"
            failure |= {"probe": slot.position, "sample": slot.sample}
        why = printable(why) if self._client is None else self._client.scrub(why)
        self.session.failed.append({**failure, "why": why[:500]})
        self._answered()
        return None

    def _answered(self) -> None:
        if self.session.on_answer is not None:
            self.session.on_answer()

    @contextlib.contextmanager
    def _trusted(self, slot: Slot):
        """Read the store within: a row that fails its checks stops the run, unused.

        Raises:
            Fatal: one line naming the store, the slot and what is wrong with the row.
        """
        try:
            yield
        except Tampered as exc:
            raise Fatal(
                f"--store {self.session.store.path}: the recorded answer for "
                f"{self._where(slot)} was edited, not used: {exc}"
            ) from None

    def _missing(self, slot: Slot, flag: str) -> str:
        return f"{flag}: no recorded answer for {self._where(slot)}"

    def _where(self, slot: Slot) -> str:
        """The slot in words: agent, play, round (or fit and probe), sample."""
        what = (
            f"round {slot.round}"
            if slot.kind == "play"
            else f"fit {slot.round} probe {slot.position}"
        )
        return f"agent {self.name}, seed {slot.play}, {what}" + (
            f", sample {slot.sample}" if slot.sample else ""
        )


CUT_OFF = "the answer was cut off at the token limit; answer shorter"
ECHOED = 300
"""The most characters of a bad answer sent back with its correction: a long answer (or a
store's edited one) does not make long paid requests."""


def _last(record: Record, problem: str) -> str:
    """The last bad answer, for the line of a failed play."""
    if record.raw is None:
        return f"last answer: none ({problem})"
    return f"last answer: {record.raw!r}"


def _count_cached(stats: Stats, record: Record) -> None:
    """Count an answer that was not paid for in this run (read from the store, or shared
    with an identical request in flight)."""
    stats.cached += 1
    stats.cached_tokens_in += record.tokens_in
    stats.cached_tokens_out += record.tokens_out
    stats.cached_cost += record.cost or 0.0


async def _unless_over(answer):
    """A request's answer, or the ``OverLimit`` that kept it from being sent: returned, not
    raised, so that the requests already in flight (paid for) finish and are recorded."""
    try:
        return await answer
    except OverLimit as exc:
        return exc


def _seen(future: asyncio.Future) -> None:
    """Mark a shared answer's failure as seen, when no identical request waited for it."""
    if not future.cancelled():
        future.exception()


def _check_request(request: dict, env: str, field: str) -> None:
    """Refuse a ``request`` that holds the key (the value of ``$env``, when set) anywhere:
    it would be sent in the body and written into the store.

    Raises:
        ConfigError: one line naming the setting, never its value.
    """
    key = os.environ.get(env, "") if env else ""
    if not key:
        return
    held = f"${env}" if VARIABLE.fullmatch(env) else "the variable api_key_env names"

    def walk(value, path: str) -> None:
        if isinstance(value, str) and key in value:
            raise ConfigError(f"{path}: never write a key (this holds the value of {held})")
        if isinstance(value, dict):
            for name, inner in value.items():
                if isinstance(name, str) and key in name:
                    raise ConfigError(f"{path}: never write a key (a name holds the key)")
                walk(inner, f"{path}.{name}")
        elif isinstance(value, list | tuple):
            for index, inner in enumerate(value):
                walk(inner, f"{path}[{index}]")

    walk(request, f"{field}.request")


def _check_key(env: str, field: str) -> None:
    """Check that the variable holding the key is set ('': no key), before any request.

    Args:
        env: the variable's name (``api_key_env``).
        field: the agent's configuration path, for the message.

    Raises:
        ConfigError: the variable is not set; named only when it looks like a name.
    """
    if not env or os.environ.get(env):
        return
    if VARIABLE.fullmatch(env):
        raise ConfigError(f"{field}.api_key_env: the environment variable {env} is not set")
    raise ConfigError(
        f"{field}.api_key_env: names no environment variable that is set, and does not look "
        "like a variable's name (is it a key?); write the NAME of the variable holding the key"
    )
