"""Files: atomic writes (a run killed at any moment leaves the old file or the new one, never
half), and the two guards for files from someone else (run directories, shared tarballs):
nothing is read that is not a regular file (``open_regular``) really inside its directory
(``open_inside``), and nothing is written through a symbolic link (``refuse_symlinks``)."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from misalign.config import ConfigError

KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
"""What a file that is not a regular one is, in words, by its ``S_IFMT`` type."""


class UnsafeFile(Exception):
    """A file ``open_inside`` does not read, and why (``why``, a few words on one line)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = "") -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The file gets the usual mode (``0666`` less the umask), not ``mkstemp``'s ``0600``. A
    symbolic link at ``path`` is replaced by the file, never written through (a rename does not
    follow the link it replaces); ``refuse_symlinks`` refuses such an ``--out`` beforehand.
    ``suffix`` ends the temporary file's name (``".png"`` for a writer that reads the format
    from it, such as matplotlib's ``savefig``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def refuse_symlinks(out: Path, inside: bool = True) -> None:
    """Refuse to write ``out`` (a run directory, or one file such as ``report --out``) when a
    symbolic link could redirect the write: ``out`` itself must not be one, nor, with
    ``inside``, anything in it at any depth (the files a command writes there, such as
    ``config.toml``, ``run.json`` or ``trajectory.png``, and the directories it creates there,
    such as a sweep's ``rows/``). A run directory from someone else (a shared tarball with
    ``runs/<hash>`` a link to another folder) then cannot make a command write outside it.
    Symbolic links higher up, in the directories that hold ``out`` (``runs/`` itself, ``/tmp``
    on macOS), are the user's own path: they are followed, not refused.

    Args:
        out: the output path (``--out`` or its default); it need not exist yet.
        inside: ``out`` is a run directory: check what it holds too (``False``: one file).

    Raises:
        ConfigError: ``--out <out>: <link> is a symbolic link; refusing to write through it``.
    """
    out = Path(out)
    link = next(_symlinks(out), None) if inside else out if out.is_symlink() else None
    if link is not None:
        raise ConfigError(f"--out {out}: {link} is a symbolic link; refusing to write through it")


def _symlinks(path: Path) -> Iterator[Path]:
    """The symbolic links at ``path`` and below it, following none of them.

    Args:
        path: a file or directory; nothing when it does not exist.

    Returns:
        An iterator of the links, ``path`` first when it is one.
    """
    if path.is_symlink():
        yield path
        return
    for root, directories, files in os.walk(path):
        for name in (*directories, *files):
            if Path(root, name).is_symlink():
                yield Path(root, name)


def open_inside(directory: Path, name: str, most: int | None = None) -> BinaryIO:
    """Open ``directory / name`` for reading, only when it is a regular file really inside
    ``directory``: neither ``directory`` nor the file a symbolic link (``lstat``), the file's
    resolved path under the directory's resolved path, and the file regular before it is
    opened, so that a FIFO or a device is refused rather than waited on. It is then opened
    with ``O_NOFOLLOW | O_NONBLOCK`` and checked again (``fstat``), so a file swapped in
    between is refused too. Symbolic links above ``directory`` are the user's own path.

    Args:
        directory: the directory the file must lie in.
        name: the file's name (or a relative path) inside ``directory``.
        most: the most bytes it may hold (``None``: any size).

    Returns:
        The file, open in binary mode.

    Raises:
        UnsafeFile: naming the directory or the file, and why it is not read.
        OSError: it does not exist (``FileNotFoundError``) or cannot be opened.
    """
    directory = Path(directory)
    path = directory / name
    if directory.is_symlink():
        raise UnsafeFile(directory, "a symbolic link")
    _require_regular(path, os.lstat(path).st_mode)
    if not path.resolve().is_relative_to(directory.resolve()):
        raise UnsafeFile(path, f"outside {directory}")
    return open_regular(path, most)


def open_regular(path: Path, most: int | None = None) -> BinaryIO:
    """Open ``path`` for reading, only when it is a regular file: checked before it is opened
    (``lstat``: no link, FIFO or device is waited on or read), then opened with
    ``O_NOFOLLOW | O_NONBLOCK`` and checked again (``fstat``), so a file swapped in between is
    refused too.

    Args:
        path: the file (links in the folders above it are followed; the file itself may not
            be one).
        most: the most bytes it may hold (``None``: any size).

    Returns:
        The file, open in binary mode.

    Raises:
        UnsafeFile: ``<path>: a FIFO`` (a directory, a symbolic link, ...).
        OSError: it does not exist (``FileNotFoundError``) or cannot be opened.
    """
    path = Path(path)
    _require_regular(path, os.lstat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        stat = os.fstat(fd)
        _require_regular(path, stat.st_mode)
        if most is not None and stat.st_size > most:
            raise UnsafeFile(path, f"{stat.st_size:,} bytes, more than {most:,}")
    except UnsafeFile:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _require_regular(path: Path, mode: int) -> None:
    """Raise ``UnsafeFile`` naming ``path`` and its kind when ``mode`` is not a regular file's.

    Args:
        path: the file, for the message.
        mode: its ``st_mode``.

    Raises:
        UnsafeFile: ``<path>: a symbolic link`` (or a directory, a FIFO, ...).
    """
    if not stat.S_ISREG(mode):
        why = KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise UnsafeFile(path, why)
