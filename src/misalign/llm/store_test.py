"""Tests of the SQLite store of answers (``misalign.llm.store``)."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from misalign.config import ConfigError
from misalign.llm.store import VERSION, Record, Slot, Store, Tampered, request_key

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
        "from misalign.llm.store import VERSION, Record, Slot, Store, Tampered, request_key\n"
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


OLD_LAYOUTS = {
    "before problem": ("fingerprint", "problem"),
    "before fingerprint": ("fingerprint",),
}
"""Stores an older misalign wrote: the ``LATER`` columns they lack (unstamped: version 0)."""


def old_store(path, dropped: tuple[str, ...]) -> str:
    """A store of an older layout holding one answer (to ``REQUEST``); its key."""
    Store(path).close()
    key = request_key(REQUEST, 0)
    with sqlite3.connect(path) as db:
        for column in dropped:
            db.execute(f"ALTER TABLE answers DROP COLUMN {column}")
        db.execute("PRAGMA user_version=0")
        row = [key, "A", 0, "play", 0, 0, 0, 0, json.dumps(REQUEST, sort_keys=True), "[1, 2]"]
        row += ["[1.0, 2.0]", 10, 3, 0.5, None, 0.0, None, None][: 8 - len(dropped)]
        db.execute(f"INSERT INTO answers VALUES ({','.join('?' * len(row))})", row)
    db.close()
    return key


@pytest.mark.parametrize("dropped", OLD_LAYOUTS.values(), ids=OLD_LAYOUTS.keys())
def test_an_older_store_is_read_untouched_and_extended_for_writing(tmp_path, dropped):
    """A store written before answers had the ``problem`` or ``fingerprint`` column: read as
    it is (read-only: the missing columns read as None, not a byte of the file changed), and
    the columns are added, and the version stamped, when it is opened for writing."""
    path = tmp_path / "old.sqlite"
    key = old_store(path, dropped)
    before = path.read_bytes()
    store = Store(path, readonly=True)
    got = store.get(key, "m", 2)
    assert got.estimate.tolist() == [1.0, 2.0] and got.problem is None and got.fingerprint is None
    store.close()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    store = Store(path)
    answer = Record("[3, 4", None, 1, 1, 0.1, None, "cut", "llama-cpp-python 9; m.gguf")
    cut = put(store, Slot("A", 0, "play", 1, 0), answer, asking("cut"))
    assert store.get(cut, "m", 2) == answer and store.get(key, "m", 2).raw == "[1, 2]"
    store.close()
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(answers)")]
        assert columns[-2:] == ["problem", "fingerprint"]
        assert db.execute("PRAGMA user_version").fetchone()[0] == VERSION
    db.close()


def test_each_answer_keeps_the_servers_build(tmp_path):
    path = tmp_path / "s.sqlite"
    store = Store(path)
    built = Record("[1, 2]", np.array([1.0, 2.0]), 5, 2, 0.5, None, None, "build 1")
    first = put(store, Slot("A", 0, "play", 0, 0), built)
    second = put(store, Slot("A", 0, "play", 1, 0), record((3.0, 4.0)), asking("no build"))
    store.close()
    store = Store(path, readonly=True)
    assert store.get(first, "m", 2).fingerprint == "build 1"
    assert store.get(second, "m", 2).fingerprint is None
    assert store.at(Slot("A", 0, "play", 0, 0), "m", 2).fingerprint == "build 1"
    store.close()


def test_a_build_that_is_not_text_is_tampering(tmp_path):
    path = tmp_path / "s.sqlite"
    store = Store(path)
    key = put(store, Slot("A", 0, "play", 0, 0), record((1.0, 2.0)))
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE answers SET fingerprint = X'00ff'")  # a blob, not text
    db.close()
    store = Store(path, readonly=True)
    with pytest.raises(Tampered, match="a column holds a value of the wrong type"):
        store.get(key, "m", 2)
    store.close()


@pytest.mark.parametrize("readonly", [False, True])
def test_a_store_of_a_newer_version_is_refused_untouched(tmp_path, readonly):
    path = tmp_path / "new.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=rf"schema version is {VERSION + 1}; .* up to {VERSION}"):
        Store(path, readonly=readonly)
    assert path.read_bytes() == before


def _plain(answer: Record) -> tuple:
    """A record's fields, its estimate as a list (comparable)."""
    estimate = None if answer.estimate is None else answer.estimate.tolist()
    return (answer.raw, estimate, answer.tokens_in, answer.problem, answer.fingerprint)


SHIPPED = Path(__file__).resolve().parents[3] / "examples" / "local_llm.sqlite"


def test_the_shipped_store_replays_untouched_and_reads_alike_in_a_copy(tmp_path):
    """``examples/local_llm.sqlite`` (recorded by ``misalign serve``): every row reads and
    passes its checks read-only, with the file unchanged, and names the server's build; a
    copy opened for writing keeps every answer and the schema's version. Stores written
    before the fingerprint column are tested by
    ``test_an_older_store_is_read_untouched_and_extended_for_writing``."""
    with contextlib.closing(sqlite3.connect(f"file:{SHIPPED}?mode=ro&immutable=1", uri=True)) as db:
        rows = db.execute("SELECT key, request, raw FROM answers").fetchall()
    before = SHIPPED.read_bytes()
    store = Store(SHIPPED, readonly=True)
    read = [store.get(key, json.loads(request)["model"], 2) for key, request, _ in rows]
    store.close()
    assert SHIPPED.read_bytes() == before
    assert not Path(f"{SHIPPED}-wal").exists() and not Path(f"{SHIPPED}-shm").exists()
    assert len(rows) > 20 and [r.raw for r in read] == [raw for _, _, raw in rows]
    builds = {r.fingerprint for r in read}
    assert len(builds) == 1 and builds.pop().startswith("llama-cpp-python "), builds
    copy = tmp_path / "copy.sqlite"
    shutil.copyfile(SHIPPED, copy)
    store = Store(copy)
    again = [store.get(key, json.loads(request)["model"], 2) for key, request, _ in rows]
    assert [_plain(r) for r in again] == [_plain(r) for r in read]
    store.close()
    with contextlib.closing(sqlite3.connect(copy)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == VERSION


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
