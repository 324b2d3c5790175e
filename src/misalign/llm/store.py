"""The record of every request and answer: one SQLite file (``misalign.llm.store``).

Each answer is written in its own transaction (WAL journal), so a run killed at any moment
loses at most the requests in flight; a re-run reads the store before asking, so it resumes
without paying twice (only the requests in flight at the kill are asked again). Requests are
keyed by the SHA-256 of the canonical request (model, messages, request settings, sample
index), so a request repeated within a run (a play that converged bit for bit) is answered
from the store. The ``accepted`` table notes which request's answer each slot (agent, play,
round or fit, turn or probe, sample) took, for ``--fork-at``; the ``exhausted`` table, which
requests failed for good (transient errors, a refusal), for ``--replay``. The key to the API
is never part of a request here, so it never reaches the store.

Each answer keeps the server's build that gave it (its ``system_fingerprint``, column
``fingerprint``; NULL where the server names none, as llama.cpp's own server, or OpenAI's
for some models): the same request at temperature 0 can get another answer from another
build, so the store, not a re-run, is what reproduces a run. A store made before a column
was added (``LATER``) opens as it is: read-only, it is read without a byte of it changed
(the missing columns read as NULL); for writing, the columns are added and the schema's
``VERSION`` stamped.

A store is an untrusted file (stores are passed between researchers). It is opened with
``trusted_schema=OFF``, and refused, before anything is written into it, when it is another
program's database (tables, indexes, columns or ``application_id`` not ours), or holds a
trigger or a view. Every row read is checked (``Tampered``): its key is the SHA-256 of its
request, the request is for the agent's model, and its estimate is what its text parses to.

Another process's write lock never loses an answer that was paid for: a write that meets it
waits ``WRITE_WAIT_S`` (the requests in flight must not stall), and then the answer is held
in memory (and read from there) and written with the next write that gets through; closing
waits up to ``BUSY_S`` for the lock, and a store still locked then is one line saying how
many answers could not be stored.

Why one module: every read and write goes through the same checks (schema, row
verification, locks held in memory); apart, a path could skip one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from misalign.config import ConfigError
from misalign.llm.answer import BadAnswer, parse
from misalign.runtime.files import kind_of, reason

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,        -- sha256 of the canonical request
    agent TEXT NOT NULL,
    play INTEGER NOT NULL,       -- the play's seed
    kind TEXT NOT NULL,          -- 'play' or 'probe'
    round INTEGER NOT NULL,      -- play: the round; probe: the fit (0 global, then local)
    position INTEGER NOT NULL,   -- play: the turn within the round; probe: the probe's index
    sample INTEGER NOT NULL,
    attempt INTEGER NOT NULL,    -- 0, then 1, 2... for corrections after bad answers
    request TEXT NOT NULL,       -- the canonical request (JSON)
    raw TEXT,                    -- the answer's text
    estimate TEXT,               -- the parsed estimate (JSON list), NULL for a bad answer
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    latency REAL NOT NULL,       -- seconds
    cost REAL,                   -- dollars, NULL without prices
    time REAL NOT NULL,          -- unix time of the answer
    problem TEXT,                -- why an answer was refused whatever its text (cut off)
    fingerprint TEXT             -- the server's build that answered (system_fingerprint)
);
CREATE INDEX IF NOT EXISTS slots ON answers (agent, play, kind, round, position, sample);
CREATE TABLE IF NOT EXISTS accepted (  -- which request's answer each slot took, last run wins
    agent TEXT NOT NULL,
    play INTEGER NOT NULL,
    kind TEXT NOT NULL,
    round INTEGER NOT NULL,
    position INTEGER NOT NULL,
    sample INTEGER NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (agent, play, kind, round, position, sample)
);
CREATE TABLE IF NOT EXISTS exhausted (  -- requests that failed for good (retries, a refusal)
    key TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    play INTEGER NOT NULL,
    round INTEGER NOT NULL,
    why TEXT NOT NULL,
    time REAL NOT NULL
);
"""
COLUMNS = {
    "answers": [
        "key",
        "agent",
        "play",
        "kind",
        "round",
        "position",
        "sample",
        "attempt",
        "request",
        "raw",
        "estimate",
        "tokens_in",
        "tokens_out",
        "latency",
        "cost",
        "time",
        "problem",
        "fingerprint",
    ],
    "accepted": ["agent", "play", "kind", "round", "position", "sample", "key"],
    "exhausted": ["key", "agent", "play", "round", "why", "time"],
}
"""The columns of each table, in order."""
LATER = ("problem", "fingerprint")
"""The last columns of ``answers``, added later, in order: a store may lack the last one or
both (read as NULL); they are added on opening for writing."""
VERSION = 2
"""The schema's version (``PRAGMA user_version``): 2 since ``answers.fingerprint``; stores
made before it have 0 (with or without ``answers.problem``). A store of a later version (a
newer misalign's) is refused."""
INDEXES = {"slots"}
"""Our indexes (beside those SQLite makes for primary keys, ``sqlite_autoindex_...``)."""
APPLICATION_ID = 0x6D69736C
"""The stamp of a store (``PRAGMA application_id``, "misl"): stores made before it have 0."""
BUSY_S = 30.0
"""How long opening a store, and closing it (writing the answers held in memory), waits for
another process's write lock."""
WRITE_WAIT_S = 0.1
"""How long a write during a run waits for another process's write lock before its answer is
held in memory (a longer wait would stall the event loop, and the requests in flight)."""


class Tampered(ValueError):
    """A row of the store that fails its checks (edited); the message says what is wrong."""


@dataclass(frozen=True)
class Slot:
    """Where a request belongs: which agent, play, round (or fit), turn (or probe), sample."""

    agent: str
    play: int
    kind: str
    round: int
    position: int
    sample: int = 0


@dataclass(frozen=True)
class Record:
    """One recorded answer; ``problem``: why it was refused whatever its text says (the
    answer was cut off at the token limit, the server's response was malformed);
    ``fingerprint``: the server's build that answered (its ``system_fingerprint``; ``None``
    when it named none, or the store predates the column)."""

    raw: str | None
    estimate: np.ndarray | None
    tokens_in: int
    tokens_out: int
    latency: float
    cost: float | None
    problem: str | None = None
    fingerprint: str | None = None


def request_key(request: dict, sample: int) -> str:
    """The SHA-256 of the canonical request (sorted keys, no whitespace) and sample index."""
    canonical = json.dumps(
        {"request": request, "sample": sample}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Store:
    """An SQLite store of answers.

    Args:
        path: the file (created with its folder when absent, unless ``readonly``).
        readonly: open without writing (a replay: the file may sit in a read-only checkout).
        lazy: a store that does not exist yet is created by its first write, not before, so
            a run that fails before its first answer (a refused budget, a bad option, an
            unreachable server) leaves no file behind; until then it reads as empty. Where it
            could not be created, it is refused at once all the same.

    Raises:
        ConfigError: one line: the store is a symbolic link or not a regular file (a
            directory), cannot be created or opened, or is not a store of ours (another
            program's database, a trigger or a view in it); nothing is written.
    """

    def __init__(self, path: str | Path, readonly: bool = False, lazy: bool = False) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._waiting: list[tuple[bool, list[tuple[str, tuple]]]] = []
        """The writes that met another process's lock, oldest first: (an answer?, statements)."""
        self._held: dict[str, Record] = {}
        """The answers among them, by key (read from here until written)."""
        self._held_why: dict[str, str] = {}
        """The requests among them that failed for good, by key."""
        self._later = False
        """A lazy store not created yet: ``_db`` is an empty store in memory."""
        if self.path.is_symlink():  # a runs/llm.sqlite link from a shared tarball
            raise ConfigError(
                f"--store {self.path}: is a symbolic link; refusing to read or write through it"
            )
        if self.path.exists() and not self.path.is_file():
            raise ConfigError(f"--store {self.path}: {kind_of(self.path)}, not a store file")
        if not readonly and not self.path.exists():
            _creatable(self.path)
        if lazy and not readonly and not self.path.exists():
            self._db = sqlite3.connect(":memory:", check_same_thread=False)
            self._db.executescript(SCHEMA)
            self._have = _columns(self._db, "answers")
            self._problem, self._later = True, True
            return
        self._open(readonly)

    def _open(self, readonly: bool) -> None:
        """Open (or create) the store's file.

        Raises:
            ConfigError: as ``Store``.
        """
        try:
            if readonly:
                self._db = _read_only(self.path)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=BUSY_S, check_same_thread=False)
            self._db.execute("PRAGMA trusted_schema=OFF")
            problem = _foreign(self._db)  # before anything is written into another's file
            if problem:
                raise ConfigError(f"--store {self.path}: not a misalign store ({problem})")
            if not readonly:
                self._create()
            self._db.execute("SELECT count(*) FROM answers").fetchone()
            self._have = _columns(self._db, "answers")
        except ConfigError:
            self._abandon()
            raise
        except OSError as exc:  # no such folder, not a folder, no permission
            self._abandon()
            raise ConfigError(
                f"--store {self.path}: cannot create the store there ({reason(exc)})"
            ) from None
        except sqlite3.OperationalError as exc:
            self._abandon()
            if "unable to open" in str(exc):
                raise ConfigError(
                    f"--store {self.path}: cannot open or create it ({exc})"
                ) from None
            raise ConfigError(f"--store {self.path}: not a misalign store ({exc})") from None
        except sqlite3.DatabaseError as exc:
            self._abandon()
            raise ConfigError(f"--store {self.path}: not a misalign store ({exc})") from None

    def _create(self) -> None:
        """Make the tables that are missing (all of them in a new store, which is stamped
        ours), add the ``LATER`` columns an older store lacks, and stamp the ``VERSION``; in
        WAL journal mode."""
        new = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a kill loses nothing committed
        self._db.executescript(SCHEMA)
        for column in LATER:  # a store from before it
            if column not in _columns(self._db, "answers"):
                self._db.execute(f"ALTER TABLE answers ADD COLUMN {column} TEXT")
        if self._db.execute("PRAGMA user_version").fetchone()[0] != VERSION:
            self._db.execute(f"PRAGMA user_version={VERSION}")
        if new:
            self._db.execute(f"PRAGMA application_id={APPLICATION_ID}")

    def _abandon(self) -> None:
        """Close the connection of a store that failed to open."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def get(self, key: str, model: str, d: int) -> Record | None:
        """The recorded answer to a request, or ``None``.

        Args:
            key: the request's key (``request_key``).
            model: the agent's model, which the recorded request must name.
            d: the number of values an estimate holds.

        Raises:
            Tampered: the row fails its checks (``_checked``).
        """
        if key in self._held:
            return self._held[key]
        row = self._db.execute(f"SELECT {self._fields} FROM answers WHERE key=?", (key,)).fetchone()
        return None if row is None else _checked(row, model, d)

    def at(self, slot: Slot, model: str, d: int) -> Record | None:
        """The answer ``slot`` last took (``--fork-at``), whether its request was sent or
        answered from the store; ``None`` when no run answered it.

        Raises:
            Tampered: the row fails its checks (``_checked``; ``model`` and ``d`` as in
                ``get``).
        """
        where = "agent=? AND play=? AND kind=? AND round=? AND position=? AND sample=?"
        values = (slot.agent, slot.play, slot.kind, slot.round, slot.position, slot.sample)
        try:
            row = self._db.execute(
                f"SELECT {self._fields} FROM answers "
                f"WHERE key = (SELECT key FROM accepted WHERE {where}) AND estimate IS NOT NULL",
                values,
            ).fetchone()
        except sqlite3.OperationalError:  # no accepted table: an older store, read-only
            row = None
        if row is None:  # a store written before the accepted table: the answers at the slot
            row = self._db.execute(
                f"SELECT {self._fields} FROM answers "
                f"WHERE {where} AND estimate IS NOT NULL ORDER BY time DESC LIMIT 1",
                values,
            ).fetchone()
        return None if row is None else _checked(row, model, d)

    def accept(self, slot: Slot, key: str) -> None:
        """Note that ``slot`` took the recorded answer to request ``key`` (an answer read from
        the store: a repeated request), in its own transaction."""
        self._write(False, [_accepting(slot, key)])

    def put(self, key: str, slot: Slot, attempt: int, request: dict, record: Record) -> None:
        """Record one answer, in its own transaction (replacing an older answer to the same
        request: ``--refresh``); an answer that parsed is also the one ``slot`` took. Where
        another process holds the store's lock, the answer is held in memory until it frees."""
        estimate = None if record.estimate is None else json.dumps(record.estimate.tolist())
        answer = (
            f"INSERT OR REPLACE INTO answers ({', '.join(COLUMNS['answers'])}) "
            f"VALUES ({', '.join('?' * len(COLUMNS['answers']))})",
            (
                key,
                *(slot.agent, slot.play, slot.kind, slot.round, slot.position, slot.sample),
                attempt,
                json.dumps(request, sort_keys=True),
                record.raw,
                estimate,
                record.tokens_in,
                record.tokens_out,
                record.latency,
                record.cost,
                time.time(),
                record.problem,
                record.fingerprint,
            ),
        )
        self._held[key] = record
        accepted = [] if record.estimate is None else [_accepting(slot, key)]
        self._write(True, [*accepted, answer])

    def exhaust(self, key: str, slot: Slot, why: str) -> None:
        """Record that request ``key`` failed for good (transient errors outlasted the
        retries, or the server refused it), so that a replay fails its play there too."""
        self._held_why[key] = why
        statement = "INSERT OR REPLACE INTO exhausted VALUES (?,?,?,?,?,?)"
        self._write(
            False, [(statement, (key, slot.agent, slot.play, slot.round, why, time.time()))]
        )

    def exhausted(self, key: str) -> str | None:
        """Why request ``key`` failed for good when it was last asked; ``None`` when it did
        not (or the store predates the record of such failures)."""
        if key in self._held_why:
            return self._held_why[key]
        try:
            row = self._db.execute("SELECT why FROM exhausted WHERE key=?", (key,)).fetchone()
        except sqlite3.OperationalError:  # no such table: an older store, read-only
            return None
        return None if row is None else str(row[0])

    def _write(self, answer: bool, statements: list[tuple[str, tuple]]) -> None:
        """Run ``statements`` in one transaction, after the writes held before it; held in
        memory while another process holds the lock for over ``WRITE_WAIT_S`` (once writes
        are held, a write tries without waiting: the lock is known to be held).

        Args:
            answer: whether they record an answer (paid for), for the count of those lost.
            statements: ``(sql, values)`` pairs.
        """
        if self._later:  # a lazy store's first write: now it is created
            self._db.close()
            self._later = False
            self._open(readonly=False)
        wait = 0.0 if self._waiting else WRITE_WAIT_S
        self._waiting.append((answer, statements))
        self._flush(wait)

    def _flush(self, wait: float) -> None:
        """Write the writes held, oldest first, each in its own transaction, waiting up to
        ``wait`` seconds for another process's lock; those still locked out stay held.

        Raises:
            sqlite3.OperationalError: a failure other than a lock (a full disk).
        """
        self._db.execute(f"PRAGMA busy_timeout={round(wait * 1000)}")
        while self._waiting:
            try:
                with self._db:
                    for sql, values in self._waiting[0][1]:
                        self._db.execute(sql, values)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                return
            self._waiting.pop(0)
        self._held.clear()
        self._held_why.clear()

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM answers").fetchone()[0]

    @property
    def _fields(self) -> str:
        """The columns ``_checked`` reads, NULL for those an older store lacks."""
        later = ", ".join(column if column in self._have else "NULL" for column in LATER)
        return f"key, sample, request, raw, estimate, tokens_in, tokens_out, latency, cost, {later}"

    def close(self) -> None:
        """Write the writes held in memory (waiting up to ``BUSY_S`` for another process's
        lock), fold the journal back into the file and close it (again: nothing).

        Raises:
            ConfigError: the store stayed locked: one line saying how many answers paid for
                could not be stored (the connection is closed all the same).
        """
        if self._db is None:
            return
        try:
            if self._waiting:
                self._flush(BUSY_S)
            self._checkpoint()
        finally:
            self._db.close()
            self._db = None
        if self._waiting:
            answers = sum(answer for answer, _ in self._waiting)
            others = len(self._waiting) - answers
            raise ConfigError(
                f"--store {self.path}: another process held its lock for over {BUSY_S:g} s; "
                f"{answers} answer{'' if answers == 1 else 's'} paid for could not be stored"
                + (f" (nor {others} notes of failed or repeated requests)" if others else "")
                + "; a re-run asks for them again"
            )

    def _checkpoint(self) -> None:
        """Fold the journal back into the file, where no one else holds it (else: nothing)."""
        if self._waiting or not self.path.exists() or self._db.in_transaction:
            return
        self._db.execute("PRAGMA busy_timeout=0")
        with contextlib.suppress(sqlite3.DatabaseError):  # read-only
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _accepting(slot: Slot, key: str) -> tuple[str, tuple]:
    """The statement noting that ``slot`` took the answer to request ``key``."""
    return (
        "INSERT OR REPLACE INTO accepted VALUES (?,?,?,?,?,?,?)",
        (slot.agent, slot.play, slot.kind, slot.round, slot.position, slot.sample, key),
    )


def _read_only(path: Path) -> sqlite3.Connection:
    """Open a store without writing. Where a killed run left its journal (``-wal``), the
    journal is read too; otherwise the file opens as immutable (nothing is created beside
    it, so a read-only folder will do)."""
    if not path.exists():
        raise ConfigError(f"--store {path}: no such file to replay")
    uri = f"file:{path.resolve()}?mode=ro"
    if not Path(f"{path}-wal").exists():
        return sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False)
    db = sqlite3.connect(uri, uri=True, timeout=BUSY_S, check_same_thread=False)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        db.close()
        raise ConfigError(f"--store {path}: cannot read its journal ({exc})") from None
    return db


def _creatable(path: Path) -> None:
    """Refuse a store that could not be created at ``path``: the nearest folder above it
    that exists must be one this process can create a file in (tried with an unnamed
    temporary file, which leaves nothing behind).

    Raises:
        ConfigError: ``--store PATH: cannot create the store there (why)``.
    """
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        why = reason(exc)
        raise ConfigError(f"--store {path}: cannot create the store there ({why})") from None


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    """The columns of ``table`` (none when there is no such table)."""
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _foreign(db: sqlite3.Connection) -> str | None:
    """What makes a database not a store of ours, or ``None`` (an empty database is a new
    store): another ``application_id``, a trigger, a view, a virtual table, a table or index
    that is not ours, no table ``answers``, a table of ours whose columns are not ours, or a
    definition that is not ours (``_definitions``: a UNIQUE index, a CHECK, STRICT...).

    Raises:
        sqlite3.DatabaseError: the file is no database.
    """
    schema = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    if not schema:
        return None
    stamp = db.execute("PRAGMA application_id").fetchone()[0]
    if stamp not in (0, APPLICATION_ID):
        return f"its application_id is {stamp}, another program's"
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in range(VERSION + 1):
        return f"its schema version is {version}; this misalign reads up to {VERSION}"
    for kind, name, table, sql in schema:
        if kind == "table" and not (sql or "").upper().startswith("CREATE TABLE"):
            kind = "virtual table"
        ours = name in COLUMNS if kind == "table" else kind == "index" and table in COLUMNS
        if not ours or kind == "index" and not _our_index(name):
            return f"its {kind} {name!r} is not ours"
    if not any(name == "answers" for _, name, _, _ in schema):
        return "it has no table answers"
    columns = next(filter(None, (_foreign_columns(db, table) for table in COLUMNS)), None)
    if columns is not None:
        return columns
    for kind, name, _, sql in schema:
        if sql is not None and _tokens(sql) not in _definitions():
            return f"its {kind} {name} is not defined as ours"
    return None


def _tokens(sql: str) -> tuple[str, ...]:
    """A definition's words and symbols, upper-cased, without comments or spacing: two
    definitions that read alike compare equal, whatever their layout."""
    sql = re.sub(r"--[^\n]*|/\*.*?\*/", " ", sql, flags=re.DOTALL)
    return tuple(re.findall(r"\w+|[^\s\w]", sql.upper()))


@functools.cache
def _definitions() -> frozenset[tuple[str, ...]]:
    """Every definition a store of ours has had (``_tokens``): today's tables and index, and
    ``answers`` without the ``LATER`` columns that later stores add (with ALTER TABLE, which
    reads alike). A UNIQUE index, a CHECK, a STRICT table, another type or default is none
    of them."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        found = {_tokens(sql) for (sql,) in db.execute("SELECT sql FROM sqlite_master") if sql}
        for column in reversed(LATER):
            db.execute(f"ALTER TABLE answers DROP COLUMN {column}")
            (old,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'answers'").fetchone()
            found.add(_tokens(old))
        return frozenset(found)
    finally:
        db.close()


def _our_index(name: str) -> bool:
    """Whether an index is ours (or SQLite's, for a primary key)."""
    return name in INDEXES or name.startswith("sqlite_autoindex_")


def _foreign_columns(db: sqlite3.Connection, table: str) -> str | None:
    """What makes the columns of one of our tables not ours (missing, others, in another
    order, generated), or ``None`` (also when there is no such table)."""
    info = db.execute(f"PRAGMA table_xinfo({table})").fetchall()
    have = [name if hidden == 0 else f"{name} (generated)" for _, name, *_, hidden in info]
    ours = COLUMNS[table]
    later = len(LATER) if table == "answers" else 0
    if not have or any(have == ours[: len(ours) - k] for k in range(later + 1)):
        return None
    missing = [column for column in ours[: len(ours) - later] if column not in have]
    if missing:
        return f"its table {table} has no column {', '.join(missing)}"
    return f"its table {table} has the columns {', '.join(have)}, not ours"


def _checked(row: tuple, model: str, d: int) -> Record:
    """The record of a row read from the store, after the checks an edited row fails.

    Args:
        row: the ``Store._fields`` of the row.
        model: the agent's model.
        d: the number of values of an estimate.

    Raises:
        Tampered: a value of the wrong type, a request that is not JSON, a key that is not
            the SHA-256 of the request, a request for another model, or an estimate that is
            not what the answer's text parses to (``_estimate``).
    """
    key, sample, request, raw, estimate, tokens_in, tokens_out, latency, cost, *later = row
    problem, fingerprint = later
    number = (int, float)
    kinds = [(sample, int), (request, str), (tokens_in, int), (tokens_out, int)]
    kinds += [(latency, number), (cost, (*number, type(None)))]
    kinds += [(value, (str, type(None))) for value in (raw, estimate, problem, fingerprint)]
    if not all(isinstance(value, kind) for value, kind in kinds):
        raise Tampered("a column holds a value of the wrong type")
    try:
        asked = json.loads(request)
    except (ValueError, RecursionError):
        raise Tampered("its request is not JSON") from None
    if request_key(asked, sample) != key:
        raise Tampered("its key is not the SHA-256 of its request")
    named = asked.get("model") if isinstance(asked, dict) else None
    if named != model:
        raise Tampered(f"its request is for model {str(named)[:60]!r}, not {model!r}")
    parsed = None if estimate is None else _estimate(raw, estimate, problem, d)
    return Record(raw, parsed, tokens_in, tokens_out, latency, cost, problem, fingerprint)


def _estimate(raw: str | None, estimate: str, problem: str | None, d: int) -> np.ndarray:
    """The estimate of a row that holds one: what its text parses to (``parse(raw, d)``, as
    the agent parsed it; an answer cut off at the token limit kept one only when its JSON
    parsed whole, which parses the same), which must be the estimate stored.

    Raises:
        Tampered: the row also holds a problem, its text does not parse, or the estimate
            stored is another (other numbers, another length, not a list, not finite).
    """
    if problem is not None:
        raise Tampered("it holds an estimate beside a problem")
    try:
        parsed = parse(raw, d)
    except BadAnswer as exc:
        raise Tampered(f"it holds an estimate, but its text does not parse ({exc})") from None
    try:
        stored = json.loads(estimate)
    except (ValueError, RecursionError):
        stored = None
    if stored != parsed.tolist():
        raise Tampered(
            f"its estimate {estimate[:60]!r} is not what its text parses to {parsed.tolist()}"
        )
    return parsed
