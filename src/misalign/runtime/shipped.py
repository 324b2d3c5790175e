"""Files shipped inside the package (``misalign/data``), found through ``importlib.resources``
wherever misalign is installed (a checkout, a wheel in a virtual environment): the recorded
language-model run that ``misalign reproduce llm`` replays, ``local_llm.toml`` and its store
``local_llm.sqlite`` (``examples/`` holds the same two files for users to run; a test,
``shipped_test``, checks that both copies are identical, byte for byte); and the trained
transformer that ``misalign reproduce transformer`` plays, ``transformer.pt`` (trained by
``misalign train examples/training/transformer.toml``)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib import resources
from pathlib import Path

RECORDED = ("local_llm.toml", "local_llm.sqlite")
"""The recorded run: its configuration and its store, as ``examples/`` names them too."""


@contextmanager
def shipped(*names: str) -> Iterator[tuple[Path, ...]]:
    """Paths on disk of shipped files, valid inside the ``with`` block (``importlib.resources``
    extracts them to a temporary file where the package is not a folder, as in a zip).

    Args:
        names: file names inside ``misalign/data``.

    Returns:
        A context manager giving their paths, in the order of ``names``.

    Raises:
        FileNotFoundError: naming the first that this installation lacks.
    """
    folder = resources.files("misalign") / "data"
    with ExitStack() as stack:
        paths = []
        for name in names:
            path = stack.enter_context(resources.as_file(folder / name))
            if not path.is_file():
                why = "shipped with misalign, missing from this installation (reinstall it)"
                raise FileNotFoundError(errno.ENOENT, why, str(path))
            paths.append(path)
        yield tuple(paths)
