"""The ``misalign`` command: a thin layer over ``misalign.api``.

Bad input exits with code 2 and one line naming the field; ``--json`` prints
one JSON object on stdout and nothing else (progress and messages go to stderr).
"""

from __future__ import annotations

import sys
import warnings

from misalign.cli.options import app

# isort: off
from misalign.cli import run  # noqa: F401  (registers its command)
from misalign.cli import theory  # noqa: F401  (registers its command)
from misalign.cli import attacks  # noqa: F401  (registers its command)
from misalign.cli import design  # noqa: F401  (registers its command)
from misalign.cli import train  # noqa: F401  (registers its command)
from misalign.cli import sweep  # noqa: F401  (registers its command)
from misalign.cli import reproduce  # noqa: F401  (registers its command)
from misalign.cli import report  # noqa: F401  (registers its command)
from misalign.cli import studies  # noqa: F401  (registers its command)
from misalign.cli import serve  # noqa: F401  (registers its command)
# isort: on


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors, like config errors, are one line and exit 2.

    Floating-point warnings are not shown: a number that overflows is reported as not
    finite (``null`` in the JSON), not as a numpy warning on stderr. SIGTERM stops a command
    as Ctrl-C does (``misalign.runtime.terminate``): the same cleanup, exit 143 (Ctrl-C: 130).
    """
    from misalign.runtime.terminate import exit_code, sigterm_as_interrupt

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    try:
        with sigterm_as_interrupt():
            code = app(args=argv, standalone_mode=False)
    except MemoryError as exc:
        detail = f" ({exc})" if str(exc) else ""
        print(
            f"misalign: error: out of memory{detail}; reduce --seeds, rounds, d or n",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except Exception as exc:
        usage = getattr(exc, "format_message", None)
        if usage is None or type(exc).__name__ == "NoArgsIsHelpError":
            if usage is None:
                raise
            print(usage())  # bare `misalign`: the help, as before
            raise SystemExit(0) from None
        print(f"misalign: error: {usage()} (see misalign --help)", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(exit_code(code or 0))
