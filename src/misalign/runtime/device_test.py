"""Tests for misalign.runtime.device: ``--device`` resolved or refused in one line, and the
helpers that give numpy and torch arrays of one kind and device."""

import os

import numpy as np
import pytest

from misalign.runtime import device
from misalign.runtime.errors import ConfigError


def torch_device():
    """The torch device the tests of the device path run on: ``MISALIGN_TEST_DEVICE``
    (``cuda`` on a machine with a GPU), else torch's CPU build; the test is skipped where
    torch is missing."""
    torch = pytest.importorskip("torch")
    return torch.device(os.environ.get("MISALIGN_TEST_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _torch():
    """Every test here needs torch."""
    pytest.importorskip("torch")


try:
    import torch
except ImportError:  # the tests are skipped
    torch = None


def test_no_device_is_numpy_and_cpu_is_torch_on_the_cpu():
    assert device.resolve(None) is None
    assert device.resolve("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    "name,message",
    [
        ("tpu", "--device 'tpu': not a device"),
        ("gpu:x", "--device 'gpu:x': not a device"),
        ("meta", "--device 'meta': the plays run on cuda, cuda:K or cpu"),
        ("cpu:1", "--device 'cpu:1': the plays run on cuda, cuda:K or cpu"),
    ],
)
def test_what_is_not_a_device_is_one_line(name, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")) as error:
        device.resolve(name)
    assert "\n" not in str(error.value)


def test_a_gpu_torch_does_not_see_is_one_line():
    if torch.cuda.is_available():
        assert device.resolve("cuda").type == "cuda"
        with pytest.raises(ConfigError, match="torch sees"):
            device.resolve(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ConfigError, match="^--device cuda: torch sees no GPU"):
            device.resolve("cuda")


def test_missing_torch_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch then fails
    with pytest.raises(ConfigError, match=r"--device cpu needs torch.*misalign\[train\]"):
        device.resolve("cpu")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_helpers_keep_the_kind_and_device_of_what_they_are_given(kind):
    like = (
        np.zeros(2)
        if kind == "numpy"
        else torch.zeros(2, dtype=torch.float64, device=torch_device())
    )
    kind = np.ndarray if kind == "numpy" else torch.Tensor
    assert device.is_numpy(like) == (kind is np.ndarray)
    assert device.namespace(like) is (np if kind is np.ndarray else torch)
    for made in (
        device.on(np.arange(3.0), like),
        device.empty((2, 3), like),
        device.full((2,), -1, like, "int64"),
        device.eye(3, like),
        device.broadcast(np.eye(2), (4, 2, 2), like),
    ):
        assert isinstance(made, kind)
    assert device.full((2,), -1, like, "int64").tolist() == [-1, -1]
    assert device.host(device.on(2.5, like)) == 2.5 and device.host([1, 2]).tolist() == [1, 2]
    assert np.array_equal(device.host(device.eye(3, like)), np.eye(3))
    spread = device.broadcast(np.eye(2), (4, 2, 2), like)
    assert device.shared(spread) and not device.shared(device.empty((4, 2, 2), like))
    assert np.array_equal(device.host(spread), np.broadcast_to(np.eye(2), (4, 2, 2)))


def test_a_thread_has_a_stream_of_its_own_on_a_gpu_only():
    from contextlib import nullcontext

    assert isinstance(device.own_stream(None), nullcontext)
    assert isinstance(device.own_stream(torch.device("cpu")), nullcontext)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        with device.own_stream(gpu):
            first = torch.cuda.current_stream()
            assert first != torch.cuda.default_stream()
        with device.own_stream(gpu):
            assert torch.cuda.current_stream() == first  # one stream per thread
