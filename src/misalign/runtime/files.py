"""Files: atomic writes (a run killed at any moment leaves the old file or the new one, never
half), run directories written whole or not at all (``write_directory``), and the two guards
for files from someone else (run directories, shared tarballs): nothing is read that is not a
regular file (``open_regular``) really inside its directory (``open_inside``), and nothing is
written through a symbolic link (``refuse_symlinks``)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from misalign.runtime.errors import ConfigError

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

    Raises:
        OSError: the file cannot be written (a full disk, a read-only file system, no
            permission); its ``filename`` is ``path`` where it named none or the temporary
            file (a write on a full disk names none).
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None or Path(exc.filename).name.startswith(f".{path.name}."):
            exc.filename = str(path)
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask (read by setting it, and set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


STAGING = ".misalign-staged-"
"""The prefix of the temporary directory's name that ``write_directory`` writes a run into."""


def write_directory(out: Path, files: Mapping[str, Callable[[Path], object]]) -> None:
    """Write the run directory ``out`` whole or not at all.

    Each ``write(path)`` of ``files`` writes its file into a new temporary directory
    (``STAGING...``, beside ``out``, or inside it when it exists: on the same file system
    either way). Once every file is written, the directory is renamed to ``out``; where ``out``
    exists already (a re-run of the same configuration), each new file replaces its old copy
    by a rename, and what else ``out`` holds (the user's own files, in an ``--out`` they named)
    is left alone. A failure or an interruption (Ctrl-C, SIGTERM) before then removes the
    temporary directory: ``out`` is as it was, never half written.

    Args:
        out: the run directory (``--out``); its parents are created.
        files: per file name, the function that writes it at the path it is given.

    Raises:
        ConfigError: one line: ``out`` is, or holds, a symbolic link (``refuse_symlinks``) or
            is not a directory, or a file cannot be written (a full disk, a read-only file
            system, no permission): ``--out OUT: cannot write OUT/NAME (why)``.
    """
    out = Path(out)
    refuse_symlinks(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: {kind_of(out)}, not a directory")
    try:
        home = out if out.is_dir() else out.parent
        home.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=home, prefix=STAGING))
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write ({reason(exc)})") from None
    try:
        for name, write in files.items():
            try:
                write(staging / name)
            except OSError as exc:
                raise ConfigError(
                    f"--out {out}: cannot write {out / name} ({reason(exc)})"
                ) from None
        try:
            _move_in(staging, out, list(files))
        except OSError as exc:
            raise ConfigError(f"--out {out}: cannot write ({reason(exc)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_in(staging: Path, out: Path, names: list[str]) -> None:
    """Put the files written in ``staging`` in place: rename ``staging`` to ``out`` where
    ``out`` does not exist, else move each file into ``out`` (each replacing its old copy).

    Args:
        staging: the temporary directory, holding ``names``.
        out: the run directory.
        names: the files to move.

    Raises:
        OSError: a rename failed.
    """
    if staging.parent != out:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 was for the unfinished run
        try:
            os.rename(staging, out)
            return
        except OSError as exc:  # out made meanwhile (another run of the same configuration)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    for name in names:
        os.replace(staging / name, out / name)


def reason(exc: OSError) -> str:
    """Why an ``OSError`` happened, in a few words.

    Args:
        exc: the error.

    Returns:
        The text of its ``errno`` (``No space left on device``, where a library such as
        pyarrow wraps it in a longer message), else its message or its type's name.
    """
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


def kind_of(path: Path) -> str:
    """What ``path`` is, in words: ``a regular file``, ``a directory``, ``a FIFO``, ...

    Args:
        path: an existing path (a symbolic link is one, not what it points to).

    Returns:
        A few words, with their article.
    """
    mode = os.lstat(path).st_mode
    return "a regular file" if stat.S_ISREG(mode) else KINDS.get(stat.S_IFMT(mode), "a file")


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
