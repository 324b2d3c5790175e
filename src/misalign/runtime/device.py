"""Where a batch's arrays live: numpy on the CPU by default, torch on a device with
``run --device`` (``cuda``, ``cuda:1``, or ``cpu`` for torch's CPU build).

The model's batch code (``misalign.model``: the prompts' random numbers, the prompts, the
agents' maps, the play and its measurements) is written once, on the array it is given: a
numpy array stays in numpy, bit for bit as before; a torch tensor stays in torch, on its
device, in float64. The few calls whose names differ between the two go through this module.
torch is imported only when a device is asked for.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any

import numpy as np

from misalign.runtime.errors import ConfigError
from misalign.runtime.optional import require_torch


def resolve(device: str | None) -> Any:
    """The torch device of ``--device``, checked; ``None`` for numpy (no device given).

    Args:
        device: ``cuda``, ``cuda:K``, ``cpu``, or ``None``.

    Returns:
        A ``torch.device``, or ``None``.

    Raises:
        ConfigError: one line naming ``--device``: torch is missing, the name is not a
            device, or torch sees no such GPU.
    """
    if device is None:
        return None
    require_torch(f"--device {device}")
    import torch

    try:
        found = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r}: not a device (cuda, cuda:K or cpu)") from None
    if found.type not in ("cuda", "cpu") or (found.type == "cpu" and found.index is not None):
        raise ConfigError(f"--device {device!r}: the plays run on cuda, cuda:K or cpu")
    if found.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch sees no GPU on this machine")
        if found.index is not None and found.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"--device {device}: torch sees {count} GPU(s)")
    return found


def is_numpy(x: Any) -> bool:
    """Whether ``x`` is a numpy array (else a torch tensor)."""
    return isinstance(x, np.ndarray | np.generic)


def namespace(x: Any):
    """The module of ``x``'s array functions: ``numpy`` or ``torch``."""
    if is_numpy(x):
        return np
    import torch

    return torch


def place(value: Any, device: Any):
    """``value`` (a number, numpy array or tensor) on ``device``: a numpy array for ``None``,
    else a tensor of its dtype there (numpy values copied: broadcast them there; a tensor
    already there is itself)."""
    if device is None:
        return np.asarray(host(value))
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    return torch.tensor(np.asarray(value), device=device)


def on(value: Any, like: Any):
    """``value`` (a number or numpy array) as an array of ``like``'s kind and device
    (``place``)."""
    return place(value, None if is_numpy(like) else like.device)


def broadcast(value: Any, shape: tuple[int, ...], like: Any):
    """``value`` (a numpy array, or a tensor on ``like``'s device) broadcast to ``shape``
    without a copy per row, of ``like``'s kind (a numpy view with stride 0, or an expanded
    tensor)."""
    if is_numpy(like):
        return np.broadcast_to(value, shape)
    return on(value, like).expand(*shape)


def shared(x: Any) -> bool:
    """Whether the rows of ``x`` are one array broadcast (stride 0 on the batch axis)."""
    return (x.strides[0] if is_numpy(x) else x.stride(0)) == 0


def host(x: Any) -> np.ndarray:
    """``x`` as a numpy array: itself when it is one, a tensor copied off its device, a number
    or a list as ``np.asarray`` makes it."""
    if is_numpy(x):
        return x
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def empty(shape: tuple[int, ...], like: Any, dtype: str = "float64"):
    """An uninitialised array of ``like``'s kind and device; ``dtype``: ``float64``,
    ``float32``, ``int64`` or ``bool``."""
    if is_numpy(like):
        return np.empty(shape, dtype=dtype)
    import torch

    return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)


def full(shape: tuple[int, ...], value, like: Any, dtype: str = "float64"):
    """``empty`` filled with ``value``."""
    out = empty(shape, like, dtype)
    out[...] = value
    return out


def eye(d: int, like: Any):
    """The ``d x d`` identity of ``like``'s kind and device, float64."""
    if is_numpy(like):
        return np.eye(d)
    import torch

    return torch.eye(d, dtype=torch.float64, device=like.device)


_streams = threading.local()


def own_stream(device: Any):
    """A context in which a thread's work on ``device`` runs on a CUDA stream of its own, so
    that threads sharing a GPU neither serialise on one queue nor wait for each other's
    work when they copy results back; one stream per thread, kept for every chunk it runs
    (torch caches freed memory per stream); nothing for numpy (``None``) or the CPU."""
    if device is None or device.type != "cuda":
        return nullcontext()
    import torch

    mine = getattr(_streams, "by_device", None)
    if mine is None:
        mine = _streams.by_device = {}
    if device not in mine:
        mine[device] = torch.cuda.Stream(device)
    return torch.cuda.stream(mine[device])
