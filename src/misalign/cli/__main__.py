"""``python -m misalign.cli``."""

from misalign.cli import main

main()
