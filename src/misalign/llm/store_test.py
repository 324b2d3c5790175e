"""Tests of the SQLite store of answers (``misalign.llm.store``)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from misalign.config import ConfigError
from misalign.llm.store import Record, Slot, Store, request_key

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "w = [1.5, -2.0]"}]}


def record(estimate=(1.0, 2.0), raw: str | None = None, problem: str | None = None) -> Record:
    """An answer whose text is its estimate (unless ``raw`` says otherwise)."""
    parsed = None if estimate is None else np.array(estimate, dtype=float)
    if raw is None:
        raw = json.dumps(parsed.tolist())
    return Record(raw, parsed, 10, 3, 0.25, None, problem)


def asking(content: str) -> dict:
    """A request to model ``m``."""
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


def put(store: Store, slot: Slot, answer: Record, request: dict = REQUEST) -> str:
    """Record ``answer`` to ``request`` at ``slot``; the request's key."""
    key = request_key(request, slot.sample)
    store.put(key, slot, 0, request, answer)
    return key


def test_request_key_is_canonical():
    reordered = {"messages": REQUEST["messages"], "model": "m"}
    assert request_key(REQUEST, 0) == request_key(reordered, 0)
    assert request_key(REQUEST, 0) != request_key(REQUEST, 1)
    assert request_key(REQUEST, 0) != request_key({**REQUEST, "seed": 1}, 0)
    assert len(request_key(REQUEST, 0)) == 64


def test_put_then_get_in_a_new_folder(tmp_path):
    store = Store(tmp_path / "new" / "store.sqlite")
    key = request_key(REQUEST, 1)
    assert store.get(key, "m", 2) is None and len(store) == 0
    put(store, Slot("A", 3, "play", 7, 1, sample=1), record((0.1, 1 / 3)))
    got = store.get(key, "m", 2)
    assert got.raw == "[0.1, 0.3333333333333333]" and got.estimate.tolist() == [0.1, 1 / 3]
    assert (got.tokens_in, got.tokens_out, got.latency, got.cost) == (10, 3, 0.25, None)
    store.close()
    again = Store(tmp_path / "new" / "store.sqlite")
    assert len(again) == 1 and again.get(key, "m", 2).estimate.tolist() == [0.1, 1 / 3]
    again.close()


def test_a_lazy_store_is_made_by_its_first_write(tmp_path):
    """A new store opened lazily (a run's) reads as empty and leaves no file when nothing is
    written; the first answer makes it, and a re-run reads it."""
    path = tmp_path / "new" / "store.sqlite"
    store = Store(path, lazy=True)
    assert store.get(request_key(REQUEST, 0), "m", 2) is None and len(store) == 0
    store.close()
    assert not (tmp_path / "new").exists()
    store = Store(path, lazy=True)
    key = put(store, Slot("A", 0, "play", 0, 0), record())
    assert path.exists() and store.get(key, "m", 2).estimate.tolist() == [1.0, 2.0]
    store.close()
    again = Store(path, lazy=True)
    assert len(again) == 1 and again.get(key, "m", 2).raw == "[1.0, 2.0]"
    again.close()


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("lazy", [False, True])
def test_a_store_that_is_not_a_file_or_cannot_be_made_is_one_line(tmp_path, readonly, lazy):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match=r"^--store .*/folder: a directory, not a store file$"):
        Store(tmp_path / "folder", readonly, lazy)
    (tmp_path / "file").write_text("")
    if not readonly:  # not even lazily: a run is refused at once, before any request
        with pytest.raises(ConfigError, match=r"/s.sqlite: cannot create the store there \(Not a"):
            Store(tmp_path / "file" / "s.sqlite", readonly, lazy)


def test_a_bad_answer_is_kept_without_an_estimate(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    key = put(store, Slot("A", 0, "play", 0, 0), record(None, "no idea"))
    assert store.get(key, "m", 2).estimate is None and store.get(key, "m", 2).raw == "no idea"
    assert store.at(Slot("A", 0, "play", 0, 0), "m", 2) is None  # nothing accepted there
    store.close()


def test_put_replaces_an_older_answer_to_the_same_request(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    slot = Slot("A", 0, "play", 0, 0)
    put(store, slot, record((1.0, 1.0)))
    key = put(store, slot, record((2.0, 2.0)))  # --refresh
    assert len(store) == 1 and store.get(key, "m", 2).estimate.tolist() == [2.0, 2.0]
    store.close()


def test_at_finds_the_answer_a_slot_took_even_from_the_store(tmp_path):
    """A repeated request is answered from the store; its slot still knows the answer."""
    store = Store(tmp_path / "s.sqlite")
    first, repeat = Slot("A", 0, "play", 3, 0), Slot("A", 0, "play", 4, 0)
    key = put(store, first, record((5.0, 6.0)))
    assert store.at(repeat, "m", 2) is None
    store.accept(repeat, key)
    assert store.at(repeat, "m", 2).estimate.tolist() == [5.0, 6.0]
    put(store, first, record((7.0, 8.0)), asking("later"))  # a later run, another request
    assert store.at(first, "m", 2).estimate.tolist() == [7.0, 8.0]
    assert store.at(Slot("A", 1, "play", 3, 0), "m", 2) is None
    assert store.at(Slot("A", 0, "play", 3, 0, sample=1), "m", 2) is None
    store.close()


def test_at_reads_a_store_without_the_accepted_table(tmp_path):
    path = tmp_path / "s.sqlite"
    store = Store(path)
    put(store, Slot("A", 0, "play", 2, 0), record((9.0, 9.0)))
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE accepted")
    store = Store(path)
    assert store.at(Slot("A", 0, "play", 2, 0), "m", 2).estimate.tolist() == [9.0, 9.0]
    store.close()


def test_read_only_opens_nothing_beside_the_file(tmp_path):
    path = tmp_path / "s.sqlite"
    Store(path).close()
    store = Store(path, readonly=True)
    assert len(store) == 0
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.sqlite"]


def test_read_only_reads_the_journal_of_a_killed_run(tmp_path):
    """A process that dies without closing leaves its answers in the -wal journal."""
    path = tmp_path / "s.sqlite"
    code = (
        "import os, numpy as np\n"
        "from misalign.llm.store import Record, Slot, Store, request_key\n"
        f"store = Store({str(path)!r})\n"
        "for i in range(5):\n"
        "    record = Record('[1, 1]', np.ones(2), 1, 1, 0.1, None)\n"
        "    request = {'model': 'm', 'i': i}\n"
        "    store.put(request_key(request, 0), Slot('A', 0, 'play', i, 0), 0, request, record)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "s.sqlite-wal").exists()
    store = Store(path, readonly=True)
    got = store.get(request_key({"model": "m", "i": 4}, 0), "m", 2)
    assert len(store) == 5 and got.estimate.tolist() == [1.0, 1.0]
    store.close()


def test_read_only_refuses_a_missing_file_and_never_creates_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^--store .*nothing\.sqlite: no such file to replay"):
        Store(tmp_path / "nothing.sqlite", readonly=True)
    assert not (tmp_path / "nothing.sqlite").exists()


@pytest.mark.parametrize("readonly", [False, True])
def test_a_file_that_is_not_a_store(tmp_path, readonly):
    path = tmp_path / "notes.txt"
    path.write_text("not a database, just some notes " * 100)
    with pytest.raises(ConfigError, match=r"^--store .*notes\.txt: not a misalign store"):
        Store(path, readonly=readonly)


def test_exhausted_requests_are_remembered(tmp_path):
    path = tmp_path / "s.sqlite"
    store = Store(path)
    assert store.exhausted("k") is None
    store.exhaust("k", Slot("A", 0, "play", 4, 0), "timeout after 3 attempts")
    store.close()
    store = Store(path, readonly=True)
    assert store.exhausted("k") == "timeout after 3 attempts" and store.get("k", "m", 2) is None
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE exhausted")  # a store written before this table
    store = Store(path, readonly=True)
    assert store.exhausted("k") is None
    store.close()


@pytest.mark.parametrize(
    "where",
    [
        lambda tmp_path: "/proc/misalign-no-such-folder/x.sqlite",  # no folder can be made
        lambda tmp_path: tmp_path / "file.txt" / "x.sqlite",  # a file where a folder should be
        lambda tmp_path: tmp_path,  # a folder where the file should be
    ],
)
def test_a_store_that_cannot_be_created_is_one_line(tmp_path, where):
    (tmp_path / "file.txt").write_text("a file")
    path = where(tmp_path)
    with pytest.raises(ConfigError) as info:
        Store(path)
    assert str(info.value).startswith(f"--store {path}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("readonly", [False, True])
def test_another_programs_database_is_refused_untouched(tmp_path, readonly):
    """A SQLite file with a table ``answers`` of other columns is no store: refused on
    opening, before anything is read from it or written into it."""
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE answers (question TEXT, answer TEXT)")
        db.execute("INSERT INTO answers VALUES ('6 x 7', '42')")
    db.close()
    before = path.read_bytes()
    with pytest.raises(
        ConfigError, match=r"^--store .*other\.sqlite: not a misalign store \(its"
    ) as e:
        Store(path, readonly=readonly)
    assert "table answers has no column key" in str(e.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.sqlite"]


def test_a_store_from_before_the_problem_column_is_read_and_extended(tmp_path):
    """A store written before answers had a ``problem`` column: read as it is (read-only),
    and the column is added when it is opened for writing."""
    path = tmp_path / "old.sqlite"
    Store(path).close()
    key = request_key(REQUEST, 0)
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE answers DROP COLUMN problem")
        db.execute(
            "INSERT INTO answers VALUES (?,'A',0,'play',0,0,0,0,?,'[1, 2]','[1.0, 2.0]',"
            "10,3,0.5,NULL,0.0)",
            (key, json.dumps(REQUEST, sort_keys=True)),
        )
    db.close()
    store = Store(path, readonly=True)
    got = store.get(key, "m", 2)
    assert got.estimate.tolist() == [1.0, 2.0] and got.problem is None
    store.close()
    store = Store(path)
    cut = put(store, Slot("A", 0, "play", 1, 0), record(None, "[3, 4", "cut"), asking("cut"))
    assert store.get(cut, "m", 2).problem == "cut" and store.get(key, "m", 2).raw == "[1, 2]"
    store.close()


def test_close_twice(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.close()
    store.close()


def test_writes_wait_in_memory_while_another_connection_holds_the_lock(tmp_path):
    """While another connection holds the write lock, answers and failures are held in
    memory, and read from there; the next write after the lock frees writes them all."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    first = put(store, Slot("A", 0, "play", 0, 0), record((1.0, 2.0)))
    store.exhaust("k", Slot("A", 0, "play", 1, 0), "timeout")
    assert store.get(first, "m", 2).estimate.tolist() == [1.0, 2.0] and len(store) == 0
    assert store.exhausted("k") == "timeout"
    other.execute("COMMIT")
    other.close()
    second = put(store, Slot("A", 0, "play", 2, 0), record((3.0, 4.0)), asking("second"))
    assert len(store) == 2 and store.at(Slot("A", 0, "play", 0, 0), "m", 2) is not None
    store.close()
    store = Store(path, readonly=True)
    assert store.get(second, "m", 2).estimate.tolist() == [3.0, 4.0]
    assert store.exhausted("k") == "timeout"
    store.close()
