"""Tests for misalign.runtime.files: atomic writes, run directories written whole or not at all
(the real
commands on a full disk and in a read-only folder), and the guards for files from someone else."""

import errno
import os
import re
from pathlib import Path

import pytest

from misalign.runtime.errors import ConfigError
from misalign.runtime.files import (
    STAGING,
    UnsafeFile,
    _umask,
    atomic_write,
    open_inside,
    reason,
    refuse_symlinks,
    write_directory,
)


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


# --- run directories written whole or not at all (issue 21 item 9) ------------------------


def _writers(texts: dict[str, str], fail_at: str | None = None, error=None) -> dict:
    """Writers of ``texts`` for ``write_directory``; the one of ``fail_at`` raises ``error``
    after writing half its text (as a write cut off by a full disk)."""

    def writer(name: str, text: str):
        def write(path: Path) -> None:
            path.write_text(text[: len(text) // 2] if name == fail_at else text)
            if name == fail_at:
                raise error

        return write

    return {name: writer(name, text) for name, text in texts.items()}


FILES = {"config.toml": "seed = 1\n", "run.json": '{"a": 1}', "trajectory.png": "png"}


def test_write_directory_puts_a_new_directory_in_place_whole(tmp_path):
    out = tmp_path / "runs" / "abc"
    write_directory(out, _writers(FILES))
    assert {p.name: p.read_text() for p in out.iterdir()} == FILES
    assert sorted(p.name for p in out.parent.iterdir()) == ["abc"]  # no staging left
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_write_directory_replaces_an_old_run_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("old")
    (out / "notes.txt").write_text("mine")
    write_directory(out, _writers(FILES))
    assert {p.name: p.read_text() for p in out.iterdir()} == {**FILES, "notes.txt": "mine"}


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EROFS, "Read-only file system"),
        KeyboardInterrupt(),
    ],
    ids=["full disk", "read-only", "Ctrl-C or SIGTERM"],
)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "re-run"])
def test_a_write_that_fails_leaves_the_run_directory_as_it_was(tmp_path, error, existing):
    out = tmp_path / "out"
    if existing:
        write_directory(out, _writers({name: "old " + text for name, text in FILES.items()}))
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None
    raised = ConfigError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(raised) as caught:
        write_directory(out, _writers(FILES, "trajectory.png", error))
    if raised is ConfigError:
        why = os.strerror(error.errno)
        assert str(caught.value) == f"--out {out}: cannot write {out / 'trajectory.png'} ({why})"
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])


def test_write_directory_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(ConfigError, match=r": a regular file, not a directory$"):
        write_directory(tmp_path / "out", _writers(FILES))
    assert (tmp_path / "out").read_text() == "mine"


def test_atomic_write_names_the_file_a_full_disk_cut_off(tmp_path):
    def cut_off(tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "run.json", cut_off)
    assert caught.value.filename == str(tmp_path / "run.json") and reason(caught.value) == (
        "No space left on device"
    )
    assert list(tmp_path.iterdir()) == []


EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
COMMANDS = {
    "run": ["run", str(EXAMPLES / "two_agents.toml")],
    "design": ["design", str(EXAMPLES / "design.toml"), "--agent", "A", "--seeds", "2"],
    "sweep": ["sweep", "{sweep}", "--workers", "2"],
}
"""The commands that write a run directory, tested on a full disk."""
DISK = 20 * 1024
"""The size of the tiny tmpfs: a sweep's two first files and one chunk file fit, no play's
report or figure does."""
MOST = 4096
"""The largest file a command may write when a full disk is simulated: a configuration
fits, no report, figure or chunk does."""


def _misalign(command: str, out: Path, tmp_path: Path, *extra: str, most: int | None = None):
    """``misalign COMMAND ... --out OUT EXTRA`` in a subprocess (a sweep's file written in
    ``tmp_path``); with ``most``, no file it writes may grow past ``most`` bytes
    (``RLIMIT_FSIZE``: a write beyond fails with EFBIG, as one on a full disk fails)."""
    import resource
    import signal
    import subprocess
    import sys

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (most, most))

    args = COMMANDS[command]
    if command == "sweep":
        import tomli_w

        from misalign.workflows.sweep_test import small

        sweep = tmp_path / "sweep.toml"
        sweep.write_text(tomli_w.dumps(small()))
        args = [arg.format(sweep=sweep) for arg in args]
    return subprocess.run(
        [sys.executable, "-m", "misalign.cli", *args, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=None if most is None else limited,
    )


def _one_line(done, out: Path, why: str) -> None:
    """Exit 2 and one line on stderr naming ``out`` and why; nothing on stdout."""
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith(f"misalign: error: --out {out}: cannot write ")
    assert done.stderr.count("\n") == 1 and f"({why})" in done.stderr, done.stderr


def _no_run_directory(out: Path) -> None:
    """Neither ``out`` nor a staging directory beside it."""
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(STAGING)] == []


@pytest.fixture
def full_disk(tmp_path):
    """A real full disk: a tmpfs of ``DISK`` bytes mounted at ``tmp_path/disk`` (root only)."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(disk)]
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(mount).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_is_one_line_and_leaves_no_half_written_directory(tmp_path, full_disk, command):
    """Issue 21: on a full disk `sweep` printed joblib's UserWarning and exited 1; `run` and
    `design` left a config.toml without their report. On a real tiny tmpfs: one line naming
    the file, exit 2; no run directory; a sweep keeps its whole chunks, and once there is
    room --resume finishes it."""
    import subprocess

    import pyarrow.parquet as pq

    out = full_disk / "out"
    _one_line(_misalign(command, out, tmp_path), out, "No space left on device")
    if command != "sweep":
        _no_run_directory(out)
        return
    kept = list((out / "rows").iterdir())
    assert len(kept) == 1 and pq.read_table(kept[0]).num_rows == 2
    before = kept[0].read_bytes()
    subprocess.run(["mount", "-o", "remount,size=1m", str(full_disk)], check=True)
    resumed = _misalign("sweep", out, tmp_path, "--resume")
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr
    assert len(list((out / "rows").iterdir())) == 3 and kept[0].read_bytes() == before


@pytest.mark.parametrize("command", COMMANDS)
def test_a_write_cut_off_is_one_line_and_a_rerun_keeps_the_old_run_whole(tmp_path, command):
    """Without root, a full disk simulated by a limit on the size of a file (the write fails
    with EFBIG): one line naming the file, exit 2; a new run leaves no directory, and a re-run
    into a finished one leaves its files as they were; a sweep, resumed, finishes."""
    import matplotlib.font_manager  # noqa: F401 - its cache is written now, without a limit

    out = tmp_path / "out"
    _one_line(_misalign(command, out, tmp_path, most=MOST), out, "File too large")
    if command == "sweep":
        assert list((out / "rows").iterdir()) == []
        resumed = _misalign("sweep", out, tmp_path, "--resume")
        assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr
        assert len(list((out / "rows").iterdir())) == 3
        return
    _no_run_directory(out)
    assert _misalign(command, out, tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _one_line(_misalign(command, out, tmp_path, most=MOST), out, "File too large")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be created in, and why: a read-only tmpfs as root (whom file
    permissions do not stop), else a folder without write permission."""
    import shutil
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, "Permission denied"
        folder.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]
    if not shutil.which("mount") or subprocess.run(mount).returncode:
        pytest.skip("mounting a read-only tmpfs failed")
    try:
        yield folder, "Read-only file system"
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_folder_is_one_line(tmp_path, read_only, command):
    folder, why = read_only
    out = folder / "out"
    _one_line(_misalign(command, out, tmp_path), out, why)
    assert list(folder.iterdir()) == []
