"""The language-model agent: a black box that answers the incoming estimate in text.

One ``respond`` per turn serves the whole batch: it renders every play's messages, reads the
store first, and fans the requests it still needs out concurrently (at most ``concurrency``
in flight), on one event loop that the run's ``Session`` keeps in a thread. A play whose
agent cannot produce ``d`` finite numbers after ``max_retries`` corrections, or whose
transient failures outlast the retries, ends with status ``failed`` (its outputs from then
on are NaN; everything before is kept) while the other plays go on.

Its map ``f(w) ~ A w + c`` is fitted from probes (``misalign.llm.fit``); until then
``affine()`` is ``None``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from misalign.agent import AffineMap, Turn
from misalign.config import ConfigError, LLMAgentConfig
from misalign.llm.answer import FORMATS, BadAnswer, correction, parse
from misalign.llm.client import VARIABLE, Client, Exhausted, Fatal, Stats
from misalign.llm.store import Record, Slot, Store, request_key
from misalign.llm.template import Templates
from misalign.prompt import Prompt

Mode = Literal["live", "replay", "refresh"]


class Session:
    """What the language-model agents of a run share: the store, the mode, the counters and
    the event loop.

    Args:
        store: the SQLite store's path.
        mode: ``live`` reads the store first and asks the server for the rest; ``replay``
            never asks (a miss is an error); ``refresh`` asks again and records the new answers.
        fork_at: take the play's answers before this round from the store, by position
            (agent, play, round), whatever the configuration now says; ask for the rest.
    """

    def __init__(self, store: str, mode: Mode = "live", fork_at: int | None = None) -> None:
        self.mode, self.fork_at = mode, fork_at
        self.store = Store(store, readonly=mode == "replay")
        self.stats = Stats()
        self.failed: list[dict] = []
        self.on_answer: Callable[[], None] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._clients: list[Client] = []

    def run(self, coroutine):
        """Run a coroutine on the session's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        """Close the clients, the loop and the store."""
        for client in self._clients:
            self.run(client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self.store.close()


@dataclass(frozen=True)
class Fitted:
    """An agent's fitted map and answer noise (``misalign.llm.fit``)."""

    map: AffineMap
    noise: np.ndarray | None


class LLMAgent:
    """A language model as an agent.

    Args:
        name: the agent's name.
        config: its configuration (one for the whole batch).
        prompts: one prompt per play.
        seeds: each play's seed (the store's ``play``).
        session: the run's session.

    Raises:
        ConfigError: before any request, as one line: a template that does not compile or
            render, a credential's name inside ``request``, or (except in a replay) the
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
        self.name, self.config, self.prompts, self.seeds = name, config, prompts, list(seeds)
        self.session = session
        self.field = f"agents.{name}"
        self.d = prompts[0].d
        self.templates = Templates.load(config, self.field)
        self._messages(0, np.zeros(self.d), 0)  # a template that fails, fails before a request
        self._client: Client | None = None
        if session.mode != "replay":
            _check_key(config.api_key_env, self.field)
        self._semaphore: asyncio.Semaphore | None = None
        self.fitted: Fitted | None = None
        self.failed = np.zeros(len(prompts), dtype=bool)

    @property
    def gamma(self) -> None:
        return None

    @property
    def format(self) -> str | None:
        """The ``response_format`` the server accepted (``None``: no request was sent)."""
        return None if self._client is None else FORMATS[self._client.format]

    def start(self, batch: int) -> None:
        if batch != len(self.prompts):
            raise ValueError(f"agent {self.name} holds {len(self.prompts)} plays, not {batch}")
        self.failed[:] = False

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
        return out

    def ask(self, requests: Sequence[tuple[int, np.ndarray, Slot]]) -> list[np.ndarray | None]:
        """Answers to ``(play, estimate, slot)`` requests, concurrently; ``None`` where the
        play failed."""

        async def everything():
            if self._semaphore is None:
                self._semaphore = asyncio.Semaphore(self.config.concurrency)
            try:  # a fatal problem cancels the requests in flight
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._answer(*r)) for r in requests]
            except ExceptionGroup as problems:  # the first Fatal, else the first problem
                fatal = [e for e in problems.exceptions if isinstance(e, Fatal)]
                raise (fatal or problems.exceptions)[0] from None
            return [task.result() for task in tasks]

        return self.session.run(everything())

    def affine(self) -> AffineMap | None:
        """The fitted map, or ``None`` before the fit."""
        return None if self.fitted is None else self.fitted.map

    def noise_covariance(self) -> np.ndarray | None:
        """The fitted covariance of the answers around the map (``samples > 1``)."""
        return None if self.fitted is None else self.fitted.noise

    def _messages(self, play: int, estimate: np.ndarray, round: int) -> list[dict]:
        """The chat messages of one request.

        Raises:
            Fatal: the template does not render (one line; at setup, or at a later round).
        """
        prompt = self.prompts[play]
        try:
            return self.templates.messages(
                self.name, prompt.X, prompt.y, estimate, self.config.eta, round
            )
        except Exception as exc:  # jinja2 raises many kinds; one line either way
            problem = " ".join(str(exc).split())[:300]
            raise Fatal(
                f"{self.field}: the template does not render (play {self.seeds[play]} "
                f"(seed), round {round}): {problem}"
            ) from None

    def _settings(self, sample: int) -> dict:
        """The passed-through settings; a ``seed`` is offset by the sample index, so that the
        samples of a probe are distinct draws."""
        settings = dict(self.config.request)
        if sample and isinstance(settings.get("seed"), int):
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
        messages = self._messages(play, estimate, slot.round)
        settings = self._settings(slot.sample)
        raw = None
        for attempt in range(self.config.max_retries + 1):
            request = {"model": self.config.model, "messages": messages, **settings}
            key = request_key(request, slot.sample)
            try:
                record, cached = await self._record(key, slot, attempt, request)
            except Exhausted as exc:
                return self._fail(slot, f"{exc}; last answer: {raw!r}")
            raw = record.raw
            try:
                answer = parse(raw, self.d)
            except BadAnswer as exc:
                if attempt == self.config.max_retries:
                    break
                session.stats.retries["answer"] += 1
                messages = [
                    *messages,
                    {"role": "assistant", "content": raw or ""},
                    {"role": "user", "content": correction(str(exc), self.d)},
                ]
                continue
            if cached and session.mode != "replay":
                session.store.accept(slot, key)  # so that --fork-at finds it at its slot
            self._answered()
            return answer
        return self._fail(
            slot, f"no valid answer after {self.config.max_retries + 1} tries; last answer: {raw!r}"
        )

    def _forked(self, slot: Slot) -> np.ndarray:
        """``--fork-at``: the answer the slot took before, whatever the request is now.

        Raises:
            Fatal: no run answered the slot.
        """
        record = self.session.store.at(slot)
        if record is None:
            raise Fatal(self._missing(slot, "--fork-at"))
        self.session.stats.cached += 1
        self._answered()
        return record.estimate

    async def _record(
        self, key: str, slot: Slot, attempt: int, request: dict
    ) -> tuple[Record, bool]:
        """The answer to ``request``: the store's (``refresh``: never), else the server's,
        recorded at once; with its tokens and cost counted.

        Returns:
            The record, and whether it came from the store.

        Raises:
            Fatal: a replay misses the store, or the server refuses for good.
            Exhausted: transient failures outlasted the retries (recorded, so that a replay
                fails the play where the run failed it; a live re-run asks again).
        """
        session, stats = self.session, self.session.stats
        record = None if session.mode == "refresh" else session.store.get(key)
        cached = record is not None
        if cached:
            stats.cached += 1
        elif session.mode == "replay":
            why = session.store.exhausted(key)
            if why is None:
                raise Fatal(self._missing(slot, "--replay"))
            raise Exhausted(why)  # the play failed here when it was recorded
        else:
            settings = {k: v for k, v in request.items() if k not in ("model", "messages")}
            try:
                record = await self._ask_server(request["messages"], settings)
            except Exhausted as exc:
                session.store.exhaust(key, slot, str(exc))
                raise
            session.store.put(key, slot, attempt, request, record)
        stats.tokens_in += record.tokens_in
        stats.tokens_out += record.tokens_out
        stats.cost += record.cost or 0.0
        return record, cached

    async def _ask_server(self, messages: list[dict], settings: dict) -> Record:
        client = self._connect()
        async with self._semaphore:
            completion = await client.complete(messages, settings)
        try:
            estimate = parse(completion.text, self.d)
        except BadAnswer:
            estimate = None
        return Record(
            completion.text,
            estimate,
            completion.tokens_in,
            completion.tokens_out,
            completion.latency,
            self._cost(completion.tokens_in, completion.tokens_out),
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
            )
            self.session._clients.append(self._client)
        return self._client

    def _cost(self, tokens_in: int, tokens_out: int) -> float | None:
        price_in, price_out = self.config.price_in, self.config.price_out
        if price_in is None and price_out is None:
            return None
        return (tokens_in * (price_in or 0.0) + tokens_out * (price_out or 0.0)) / 1e6

    def _fail(self, slot: Slot, why: str) -> None:
        self.session.failed.append(
            {
                "agent": self.name,
                "seed": slot.play,
                "kind": slot.kind,
                "round": slot.round,
                "why": why[:500],
            }
        )
        self._answered()
        return None

    def _answered(self) -> None:
        if self.session.on_answer is not None:
            self.session.on_answer()

    def _missing(self, slot: Slot, flag: str) -> str:
        what = (
            f"round {slot.round}"
            if slot.kind == "play"
            else f"fit {slot.round} probe {slot.position}"
        )
        return (
            f"{flag}: no recorded answer for agent {self.name}, play {slot.play} "
            f"(seed), {what}" + (f", sample {slot.sample}" if slot.sample else "")
        )


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
