"""Tests for the report page's readers (``misalign.workflows.page_read``): numbers as shown, a CSV
table's first rows and counted column, short text files; what is not a regular file inside
the run directory is left out with one line. The page itself: ``page_test``, ``page_kinds_test``."""

import math
import os

import pytest

from misalign.workflows.page_read import ROWS, num, read_table, read_text


@pytest.mark.parametrize(
    "value,shown",
    [
        (None, "not finite"),
        (math.nan, "not finite"),
        (-math.inf, "not finite"),
        (0.0, "0"),
        (1 / 3, "0.333"),
        (12, "12"),
        (True, "True"),
        ("<b>" * 40, "<b>" * 26 + "<b"),
    ],
)
def test_num_shows_what_a_run_recorded(value, shown):
    assert num(value) == shown


def test_a_table_shows_its_first_rows_and_counts_a_column(tmp_path):
    lines = ["point,error"] + [f"{i},{'boom' if i % 7 == 0 else ''}" for i in range(ROWS + 30)]
    (tmp_path / "sweep.csv").write_text("\n".join(lines) + "\n")
    table, missing = read_table(tmp_path, "sweep.csv", "s", print, count="error")
    assert missing == "" and table.total == ROWS + 30 and len(table.rows) == ROWS
    assert table.counted == len(range(0, ROWS + 30, 7)) and table.filename == "s-sweep.csv"
    assert table.source == "sweep.csv" and table.header == ["point", "error"]
    table, _ = read_table(tmp_path, "sweep.csv", "s", print, count="nope")
    assert table.counted == 0


def test_what_is_not_a_regular_file_inside_is_left_out_in_one_line(tmp_path):
    run, lines = tmp_path / "run", []
    run.mkdir()
    (tmp_path / "secret.toml").write_text("key = 'secret'\n")
    (run / "config.toml").symlink_to(tmp_path / "secret.toml")
    os.mkfifo(run / "sweep.csv")
    assert read_text(run, "config.toml", lines.append) == "config.toml left out: a symbolic link"
    assert read_table(run, "sweep.csv", "s", lines.append) == (None, "sweep.csv left out: a FIFO")
    assert [line.split(": ")[1] for line in lines] == ["a symbolic link; left out of the page"] + [
        "a FIFO; left out of the page"
    ]
    assert read_text(run, "sweep.toml", lines.append) == "sweep.toml is missing"
    (run / "sweep.toml").write_bytes(b"\xff")
    assert read_text(run, "sweep.toml", lines.append) == "sweep.toml cannot be read: not UTF-8"
