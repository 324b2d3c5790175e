"""Tests for misalign.files: atomic writes, and the guards for files from someone else."""

import os
import re
from pathlib import Path

import pytest

from misalign.config import ConfigError
from misalign.files import UnsafeFile, atomic_write, open_inside, refuse_symlinks


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    """What a rename over a link does: the link is replaced, its target left as it was."""
    target = tmp_path / "elsewhere.txt"
    target.write_text("theirs")
    link = tmp_path / "out" / "config.toml"
    link.parent.mkdir()
    link.symlink_to(target)
    atomic_write(link, lambda tmp: Path(tmp).write_text("ours"))
    assert not link.is_symlink() and link.read_text() == "ours"
    assert target.read_text() == "theirs"


def test_atomic_write_gives_the_temporary_file_its_suffix(tmp_path):
    names = []
    write = lambda tmp: names.append(tmp) or Path(tmp).write_text("x")  # noqa: E731
    atomic_write(tmp_path / "a.png", write, suffix=".png")
    assert Path(names[0]).name.startswith(".a.png.") and names[0].endswith(".png")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


@pytest.mark.parametrize(
    "make,link",
    [
        (lambda out, elsewhere: out.symlink_to(elsewhere), "out"),
        (lambda out, elsewhere: (out / "run.json").symlink_to(elsewhere / "f"), "out/run.json"),
        (lambda out, elsewhere: (out / "gone").symlink_to(out / "nowhere"), "out/gone"),
        (lambda out, elsewhere: (out / "rows").symlink_to(elsewhere), "out/rows"),
        (lambda out, elsewhere: (out / "a" / "b").symlink_to(elsewhere), "out/a/b"),
    ],
    ids=["directory", "file", "dangling", "subdirectory", "nested"],
)
def test_refuse_symlinks_names_the_link(tmp_path, make, link):
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    if link != "out":
        (out / "a").mkdir(parents=True)
    make(out, elsewhere)
    expect = f"--out {out}: {tmp_path / link} is a symbolic link; refusing to write through it"
    with pytest.raises(ConfigError, match=f"^{re.escape(expect)}$"):
        refuse_symlinks(out)


def test_refuse_symlinks_follows_the_users_own_parents(tmp_path):
    """A link above the output (``runs/`` itself, ``/tmp`` on macOS) is the user's own path."""
    (tmp_path / "real" / "run").mkdir(parents=True)
    (tmp_path / "parent").symlink_to(tmp_path / "real")
    refuse_symlinks(tmp_path / "parent" / "run")
    refuse_symlinks(tmp_path / "parent" / "new" / "run")  # need not exist
    (tmp_path / "real" / "run" / "x").symlink_to(tmp_path)
    refuse_symlinks(tmp_path / "real" / "run" / "report.html", inside=False)
    with pytest.raises(ConfigError, match="run/x is a symbolic link"):
        refuse_symlinks(tmp_path / "parent" / "run")


def test_open_inside_reads_a_regular_file(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"x,y\n")
    with open_inside(tmp_path, "a.csv") as handle:
        assert handle.read() == b"x,y\n"
    with pytest.raises(FileNotFoundError):
        open_inside(tmp_path, "missing.csv")


def _fifo(directory: Path) -> str:
    os.mkfifo(directory / "pipe")
    return "pipe"


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda d: (d / "l").symlink_to(d.parent / "secret") or "l", "a symbolic link"),
        (lambda d: (d / "l").symlink_to("inside.txt") or "l", "a symbolic link"),
        (lambda d: (d / "sub").mkdir() or "sub", "a directory"),
        (_fifo, "a FIFO"),
    ],
    ids=["link-outside", "link-inside", "directory", "fifo"],
)
def test_open_inside_refuses_what_is_not_a_regular_file(tmp_path, make, why):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "secret").write_text("secret")
    (run / "inside.txt").write_text("inside")
    name = make(run)
    with pytest.raises(UnsafeFile) as caught:
        open_inside(run, name)
    assert str(caught.value) == f"{run / name}: {why}" and caught.value.why == why


def test_open_inside_refuses_a_device_a_linked_directory_and_a_path_out(tmp_path):
    with pytest.raises(UnsafeFile, match="^/dev/null: a character device$"):
        open_inside(Path("/dev"), "null")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "claims.json").write_text("[]")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafeFile, match=f"^{re.escape(str(tmp_path / 'link'))}: a symbolic"):
        open_inside(tmp_path / "link", "claims.json")
    (tmp_path / "real" / "sub").symlink_to(tmp_path)
    (tmp_path / "outside.txt").write_text("secret")
    with pytest.raises(UnsafeFile, match="outside"):
        open_inside(tmp_path / "real", "sub/outside.txt")
