"""Optional dependencies: torch is needed only to train and play linear self-attention
models (``misalign train``, ``kind = "lsa"`` agents, ``reproduce lsa``) and to play a batch on
a device (``run --device``), so it is the ``train`` extra; whoever needs it without it gets
one line saying what to install.
"""

from __future__ import annotations

from misalign.runtime.errors import ConfigError

TORCH = "pip install 'misalign[train]' (torch 2.13.0; its CPU build is enough)"
"""What to install for torch."""


def require_torch(what: str) -> None:
    """Check that torch can be imported, for ``what``.

    Args:
        what: who needs it, for the message (``misalign train``, ``agents.A``).

    Raises:
        ConfigError: one line naming ``what`` and the install command.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs torch, which is not installed: {TORCH}") from None
