"""Tests for misalign.agents.train: reaching the optimum, exact resume after a kill, divergence."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from misalign.agents.lsa import LSA, gamma_by_probing, gamma_from_weights
from misalign.agents.train import (
    CHECKPOINT,
    Tasks,
    covariance,
    evaluate,
    load_checkpoint,
    load_model,
    memory_needed,
    schedule,
    train,
)
from misalign.config import ConfigError, TrainConfig

SMALL = {"d": 2, "n": 10, "steps": 400, "batch": 256, "eval_every": 400, "eval_batch": 65536}
TINY = (
    "d = 2\nn = 4\nsteps = 20\n"
    "batch = 16\neval_batch = 64\ncheckpoint_every = 10\neval_every = 10\n"
)


def _tiny(tmp_path) -> str:
    """A training configuration that runs in well under a second."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return str(path)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``misalign train ARGS`` in a real process."""
    command = [sys.executable, "-m", "misalign.cli", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _one_line_error(process: subprocess.CompletedProcess, start: str) -> None:
    """Exit 2 and a single stderr line ``misalign: error: START...``, no traceback."""
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    assert len(process.stderr.splitlines()) == 1, process.stderr
    assert process.stderr.startswith(f"misalign: error: {start}"), process.stderr


def test_a_small_model_reaches_the_optimum_in_seconds(tmp_path):
    result = train(TrainConfig(**SMALL), tmp_path)
    final = result.history[-1]
    assert final.gamma_error < 0.05
    assert final.gamma_loss < 1.01 * final.optimal_loss
    assert abs(final.loss / final.reference_loss - 1) < 0.01  # Monte Carlo, same tasks
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((50, 10, 2)), rng.standard_normal((50, 10))
    model = result.model.double()
    np.testing.assert_allclose(gamma_by_probing(model, X, y), gamma_from_weights(model), atol=1e-12)


def test_anisotropic_training_approaches_the_closed_form_gamma(tmp_path):
    config = TrainConfig(**SMALL | {"spectrum": [2.0, 0.5], "rotate": True, "steps": 800})
    final = train(config, tmp_path).history[-1]
    assert final.gamma_error < 0.05 and final.gamma_loss < 1.01 * final.optimal_loss


def test_tasks_follow_the_covariance():
    config = TrainConfig(**SMALL | {"spectrum": [3.0, 0.5], "rotate": True})
    X, y, xq, yq = Tasks(config, torch.device("cpu"), 0).sample(20000)
    empirical = torch.einsum("bni,bnj->ij", X, X).numpy() / (20000 * 10)
    np.testing.assert_allclose(empirical, covariance(config), atol=0.05)


def test_schedule_warms_up_then_decays_to_zero():
    factor = schedule(TrainConfig(**SMALL | {"warmup": 10, "steps": 110}))
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5) and factor(110) == pytest.approx(0.0)


KILLED = {
    "lsa": "d = 3\nn = 8\nsteps = 3000\nbatch = 128\neval_every = 1000\ncheckpoint_every = 50\n",
    "transformer": (  # killed inside the curriculum
        'model = "transformer"\nd = 3\nn = 6\nnoise = 0.25\nlayers = 1\nwidth = 16\nheads = 2\n'
        "steps = 1500\nbatch = 16\nlr = 0.001\neval_every = 10\neval_batch = 64\n"
        "checkpoint_every = 25\n[curriculum]\nd = 1\nn = 2\nevery = 200\n"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", list(KILLED))
def test_a_killed_run_resumed_ends_with_the_same_weights(tmp_path, model):
    """SIGKILL a real training process after a checkpoint, resume it, compare bit for bit."""
    config = tmp_path / "t.toml"
    config.write_text(KILLED[model])
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    command = [sys.executable, "-m", "misalign.cli", "train", str(config), "--out"]
    process = subprocess.Popen([*command, str(killed)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (killed / CHECKPOINT).exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # as soon as the first checkpoint is there
    process.wait()
    interrupted_at = load_checkpoint(killed / CHECKPOINT)["step"]
    assert 0 < interrupted_at < 1500, "the run was not interrupted"
    subprocess.run([*command, str(killed), "--resume"], check=True, capture_output=True)
    subprocess.run([*command, str(straight)], check=True, capture_output=True)
    resumed, _ = load_model(killed / CHECKPOINT)
    uninterrupted, _ = load_model(straight / CHECKPOINT)
    for a, b in zip(
        resumed.state_dict().values(), uninterrupted.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_divergence_stops_and_writes_no_bad_checkpoint(tmp_path):
    result = train(TrainConfig(**SMALL | {"lr": 1e30}), tmp_path)
    assert result.diverged_at is not None and not (tmp_path / CHECKPOINT).exists()


def test_divergence_after_a_checkpoint_keeps_the_good_weights(tmp_path, monkeypatch):
    """Labels turn to NaN at step 120: training stops there, the checkpoint stays at step 100
    and the returned model holds its weights."""
    sample, calls = Tasks.sample, {"n": 0}

    def poisoned(self, batch):
        X, y, xq, yq = sample(self, batch)
        calls["n"] += 1
        if calls["n"] > 121:  # one evaluation batch, then 120 good training batches
            yq = yq * float("nan")
        return X, y, xq, yq

    monkeypatch.setattr(Tasks, "sample", poisoned)
    config = TrainConfig(**SMALL | {"steps": 200, "checkpoint_every": 50, "eval_every": 1000})
    result = train(config, tmp_path)
    assert result.diverged_at == 120
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert state["step"] == 100
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, state["model"][key])


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a misalign checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    train(TrainConfig(**SMALL | {"steps": 10}), tmp_path)
    with pytest.raises(ConfigError, match="was trained with another lr"):
        train(TrainConfig(**SMALL | {"steps": 10, "lr": 0.02}), tmp_path, resume=True)


def test_a_bad_config_is_refused_before_torch_is_imported(tmp_path):
    """Importing torch took seconds and 238 MB before any configuration error."""
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('torch' in sys.modules))\n"
        f"sys.argv = ['misalign', 'train', {_tiny(tmp_path)!r}, '--set', 'd=0']\n"
        "from misalign.cli import main\n"
        "main()\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    _one_line_error(process, "d: ")
    assert process.stdout.strip() == "False"


class _Allocations(TorchDispatchMode):
    """Sums the bytes of every tensor an operation allocates with leading dimension
    ``batch`` (never subtracting frees: an upper bound on the peak)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.total = batch, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = tree_leaves((args, kwargs))
        old = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            fresh = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in old
            if fresh and t.dim() and t.shape[0] == self.batch:
                self.total += t.untyped_storage().nbytes()
        return out


def _storage_bytes(tensors) -> int:
    return sum(
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()
    )


def _counted_step(batch: int, step) -> tuple[int, int]:
    """One forward and backward pass, counted: ``step()`` draws a batch and returns its
    tensors and the loss (its forward pass runs here, where the tensors saved for the
    backward pass are kept).

    Returns:
        The bytes allocated in all with leading dimension ``batch`` (``_Allocations``), and
        the bytes that must be held at once: the batch and the saved tensors.
    """
    saved = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[0] == batch:
            saved.append(t)
        return t

    with _Allocations(batch) as allocated:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            tensors, loss = step()
        loss.backward()
    return allocated.total, _storage_bytes([*tensors, *saved])


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_the_memory_estimate_bounds_a_direct_count(layers):
    """One training step and one evaluation, counted: the estimate lies between what must be
    held at once (the batch and the tensors saved for the backward pass) and all that is
    ever allocated; the model part covers weights, gradients, Adam moments and masks."""
    config = TrainConfig(d=3, n=5, batch=64, eval_batch=96, layers=layers)
    needed = memory_needed(config)
    model = LSA(config.d, config.layers)
    optimizer = torch.optim.Adam(model.parameters())

    def step():
        batch = Tasks(config, torch.device("cpu"), 0).sample(config.batch)
        return batch, torch.mean((model(*batch[:3])[:, 0] - batch[3]) ** 2)

    allocated, held = _counted_step(config.batch, step)
    assert held <= needed["batch"] <= allocated
    optimizer.step()
    weights = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters())]
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim()]
    assert _storage_bytes(weights + moments) <= needed["d"]
    with _Allocations(config.eval_batch) as allocated:
        held_out = Tasks(config, torch.device("cpu"), 1).sample(config.eval_batch)
        evaluate(model, held_out, config, 0)
    # the draw is counted at full width: for one layer a little above all allocations
    assert _storage_bytes(held_out) <= needed["eval_batch"] <= 1.1 * allocated.total


@pytest.mark.parametrize(
    "setting, error",
    [
        ("batch=1000000000000", "batch: a training batch needs "),
        ("eval_batch=1000000000000", "eval_batch: the evaluation batch needs "),
        ("n=10000000000", "n: the evaluation batch needs "),
        ("d=1000000", "d: the model and the input covariance need "),
    ],
)
def test_a_run_too_large_for_memory_is_refused_at_once(tmp_path, setting, error):
    """These were a torch allocation traceback; now one line, before anything is allocated."""
    start = time.perf_counter()
    process = _cli(_tiny(tmp_path), "--set", setting, "--out", str(tmp_path / "run"))
    _one_line_error(process, error)
    assert process.stderr.rstrip().endswith(" GiB available")
    assert time.perf_counter() - start < 20  # the import of torch, no allocation attempt
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_train_help_gives_the_real_default_directory():
    """It said runs/<config hash>, the play commands' default, not runs/train-<config hash>."""
    process = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"COLUMNS": "200"},
    )
    assert process.returncode == 0
    line = next(
        line for line in process.stdout.splitlines() if line.lstrip("│ |").startswith("--out")
    )
    assert "runs/train-<config hash>" in line


def test_a_finished_cosine_run_extended_by_one_step_still_learns(tmp_path):
    """The schedule is stretched to the new steps: the finished run's last rate was 0, the
    extension's first is the new cosine's at step 20."""
    config = TrainConfig(**SMALL | {"steps": 20, "warmup": 0, "eval_every": 10})
    before = train(config, tmp_path).model.state_dict()
    resumed = []
    extended = train(
        config.model_copy(update={"steps": 21}),
        tmp_path,
        resume=True,
        on_resume=lambda step, steps: resumed.append((step, steps)),
    )
    assert resumed == [(20, 20)] and extended.resumed_from == 20 and extended.steps_run == 1
    assert not torch.equal(before["kq.0"], extended.model.state_dict()["kq.0"])
    assert schedule(config)(20) == 0 < schedule(config.model_copy(update={"steps": 21}))(20)


@pytest.mark.slow
def test_resume_extends_a_finished_run_and_says_from_where(tmp_path):
    config, out = _tiny(tmp_path), str(tmp_path / "run")
    assert _cli(config, "--out", out).returncode == 0
    process = _cli(config, "--out", out, "--resume", "--set", "steps=40", "--json")
    assert process.returncode == 0, process.stderr
    assert process.stderr.splitlines()[0] == (
        f"resuming from step 20 of 40 (checkpoint in {out}); "
        "extended from 20 steps, the learning-rate schedule stretched"
    )
    summary = json.loads(process.stdout)
    assert summary["resumed_from"] == 20 and summary["steps_run"] == 20
    assert [e["step"] for e in summary["history"]] == [10, 20, 30, 40]
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 40
    again = _cli(config, "--out", out, "--resume", "--set", "steps=40")
    assert again.stderr.startswith(f"resuming from step 40 of 40 (checkpoint in {out})\n")
    fresh = json.loads(_cli(config, "--out", str(tmp_path / "new"), "--json").stdout)
    assert fresh["resumed_from"] is None


@pytest.mark.slow
def test_resume_refuses_fewer_steps_and_any_other_change(tmp_path):
    config, out = _tiny(tmp_path), str(tmp_path / "run")
    assert _cli(config, "--out", out, "--set", "steps=40").returncode == 0
    shorter = _cli(config, "--out", out, "--resume")  # steps = 20
    _one_line_error(shorter, "steps: ")
    assert "trained for 40 steps" in shorter.stderr
    other = _cli(config, "--out", out, "--resume", "--set", "steps=60", "--set", "lr=0.5")
    _one_line_error(other, "--resume: ")
    assert other.stderr.rstrip().endswith("was trained with another lr")
