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
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from misalign.config import ConfigError

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
    problem TEXT                 -- why an answer was refused whatever its text (cut off)
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
    ],
    "accepted": ["agent", "play", "kind", "round", "position", "sample", "key"],
    "exhausted": ["key", "agent", "play", "round", "why", "time"],
}
"""The columns each table must have (a store may lack ``answers.problem``: it was added
later, and is added on opening for writing)."""


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
    answer was cut off at the token limit, the server's response was malformed)."""

    raw: str | None
    estimate: np.ndarray | None
    tokens_in: int
    tokens_out: int
    latency: float
    cost: float | None
    problem: str | None = None


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
    """

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        try:
            if readonly:
                self._db = _read_only(self.path)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, check_same_thread=False)
            problem = _foreign(self._db)  # before anything is written into another's file
            if problem:
                raise ConfigError(f"--store {self.path}: not a misalign store ({problem})")
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # a kill loses nothing committed
                self._db.executescript(SCHEMA)
                if "problem" not in _columns(self._db, "answers"):  # a store from before it
                    self._db.execute("ALTER TABLE answers ADD COLUMN problem TEXT")
            self._db.execute("SELECT count(*) FROM answers").fetchone()
            self._problem = "problem" in _columns(self._db, "answers")
        except ConfigError:
            self._abandon()
            raise
        except OSError as exc:  # no such folder, not a folder, no permission
            self._abandon()
            why = exc.strerror or type(exc).__name__
            raise ConfigError(
                f"--store {self.path}: cannot create the store there ({why})"
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

    def _abandon(self) -> None:
        """Close the connection of a store that failed to open."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def get(self, key: str) -> Record | None:
        """The recorded answer to a request, or ``None``."""
        row = self._db.execute(f"SELECT {self._fields} FROM answers WHERE key=?", (key,)).fetchone()
        return None if row is None else _record(row)

    def at(self, slot: Slot) -> Record | None:
        """The answer ``slot`` last took (``--fork-at``), whether its request was sent or
        answered from the store; ``None`` when no run answered it."""
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
        return None if row is None else _record(row)

    def accept(self, slot: Slot, key: str) -> None:
        """Note that ``slot`` took the recorded answer to request ``key`` (an answer read from
        the store: a repeated request), in its own transaction."""
        with self._db:
            self._accept(slot, key)

    def put(self, key: str, slot: Slot, attempt: int, request: dict, record: Record) -> None:
        """Record one answer, in its own transaction (replacing an older answer to the same
        request: ``--refresh``); an answer that parsed is also the one ``slot`` took."""
        estimate = None if record.estimate is None else json.dumps(record.estimate.tolist())
        with self._db:
            if record.estimate is not None:
                self._accept(slot, key)
            self._db.execute(
                f"INSERT OR REPLACE INTO answers ({', '.join(INSERTED)}) "
                f"VALUES ({', '.join('?' * len(INSERTED))})",
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
                ),
            )

    def exhaust(self, key: str, slot: Slot, why: str) -> None:
        """Record that request ``key`` failed for good (transient errors outlasted the
        retries, or the server refused it), so that a replay fails its play there too."""
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO exhausted VALUES (?,?,?,?,?,?)",
                (key, slot.agent, slot.play, slot.round, why, time.time()),
            )

    def exhausted(self, key: str) -> str | None:
        """Why request ``key`` failed for good when it was last asked; ``None`` when it did
        not (or the store predates the record of such failures)."""
        try:
            row = self._db.execute("SELECT why FROM exhausted WHERE key=?", (key,)).fetchone()
        except sqlite3.OperationalError:  # no such table: an older store, read-only
            return None
        return None if row is None else row[0]

    def _accept(self, slot: Slot, key: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO accepted VALUES (?,?,?,?,?,?,?)",
            (slot.agent, slot.play, slot.kind, slot.round, slot.position, slot.sample, key),
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM answers").fetchone()[0]

    @property
    def _fields(self) -> str:
        return "raw, estimate, tokens_in, tokens_out, latency, cost, " + (
            "problem" if self._problem else "NULL"
        )

    def close(self) -> None:
        """Fold the journal back into the file and close it (again: nothing)."""
        if self._db is None:
            return
        try:
            if not self.path.exists() or self._db.in_transaction:
                return
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError:
            pass  # read-only
        finally:
            self._db.close()
            self._db = None


def _read_only(path: Path) -> sqlite3.Connection:
    """Open a store without writing. Where a killed run left its journal (``-wal``), the
    journal is read too; otherwise the file opens as immutable (nothing is created beside
    it, so a read-only folder will do)."""
    if not path.exists():
        raise ConfigError(f"--store {path}: no such file to replay")
    uri = f"file:{path.resolve()}?mode=ro"
    if not Path(f"{path}-wal").exists():
        return sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False)
    db = sqlite3.connect(uri, uri=True, check_same_thread=False)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        db.close()
        raise ConfigError(f"--store {path}: cannot read its journal ({exc})") from None
    return db


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    """The columns of ``table`` (none when there is no such table)."""
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _foreign(db: sqlite3.Connection) -> str | None:
    """What makes a database another program's (a table of ours that lacks our columns),
    or ``None``. Raises ``sqlite3.DatabaseError`` for a file that is no database."""
    for table, needed in COLUMNS.items():
        have = _columns(db, table)
        missing = [column for column in needed if column not in have]
        if have and missing:
            return f"its table {table} has no column {', '.join(missing)}"
    return None


INSERTED = (*COLUMNS["answers"], "problem")


def _record(row: tuple) -> Record:
    raw, estimate, tokens_in, tokens_out, latency, cost, problem = row
    parsed = None if estimate is None else np.array(json.loads(estimate), dtype=float)
    return Record(raw, parsed, tokens_in, tokens_out, latency, cost, problem)
