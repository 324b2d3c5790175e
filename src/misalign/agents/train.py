"""Training an in-context regression model: a linear self-attention model or a causal
softmax transformer.

Every step draws a fresh batch of tasks on the device (``x ~ N(0, Lambda)``,
``w ~ N(0, I)``, labels with optional noise) and takes an Adam step on the squared error:
of the query's prediction (linear self-attention), or of every label's prediction from the
examples before it, over Garg et al. 2022's curriculum when one is set (transformer).
Evaluation compares a linear self-attention model with the closed-form optimum
(``misalign.model.agent.lsa_optimal_gamma`` and ``icl_loss``), and a transformer with Garg
et al.'s baselines (least squares, ridge at the noise level, averaging) at every prompt
length up to its ``context``, past the trained ``n`` too. Checkpoints hold
the model, the optimizer, the schedule and the data stream's state, written
atomically, so a run killed at any point and resumed from its last checkpoint
ends with the same weights as an uninterrupted run.

Why one module: the task stream, the step, the evaluation and the checkpoint share one state
(model, optimizer, schedule, random streams) that a resumed run must restore as a whole.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from misalign.agents.lsa import LSA, gamma_from_weights, use_threads
from misalign.agents.transformer import Transformer, baselines
from misalign.config import ConfigError, TrainConfig
from misalign.model.agent import icl_loss, lsa_optimal_gamma
from misalign.model.prompt import haar_rotation
from misalign.runtime import sizes
from misalign.runtime.files import atomic_write, refuse_symlinks
from misalign.runtime.progress import progress_bar

CHECKPOINT = "checkpoint.pt"
GIB = 2**30


def pick_device(choice: str = "auto") -> torch.device:
    """``cuda`` when asked for or, with ``auto``, when one is present; else the CPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no GPU is present")
    return torch.device(choice)


def memory_needed(config: TrainConfig) -> dict[str, int]:
    """Bytes of the largest arrays a run holds, by the field that sizes them: an upper
    estimate, counted before anything is allocated (float32 tensors, float64 numpy).

    Args:
        config: the training configuration.

    Returns:
        ``d``: per layer two ``(d+1)^2`` weight blocks with their gradients, Adam moments,
        masked copies and their gradients, the masks, and a few ``d x d`` float64 arrays
        (the input covariance, its root, ``Gamma*``); ``batch``: a training batch, its
        ``(n+1)(d+1)`` token entries per prompt twice (the draw and the inputs) and per
        layer the keys, scores and values kept for the backward pass (the data tokens'
        update and their ``n x n`` attention too between layers), twice with their
        gradients; ``eval_batch``: the held-out tasks, kept all along, and their draw or
        evaluation.
    """
    if config.model == "transformer":
        return _transformer_memory(config)
    d, n, layers = config.d, config.n, config.layers
    tokens = (n + 1) * (d + 1)
    activations = layers * 3 * n * (d + 1) + (layers - 1) * n * (n + d + 1)
    return {
        "d": 4 * (12 * layers + 2) * (d + 1) ** 2 + 8 * 8 * d * d,
        "batch": 4 * config.batch * 2 * (tokens + activations),
        "eval_batch": 4 * config.eval_batch * (2 * tokens + activations),
    }


def _transformer_memory(config: TrainConfig) -> dict[str, int]:
    """``memory_needed`` of a transformer: ``width``: the parameters with their gradients and
    Adam moments; ``batch``: per block and token the activations kept for the backward pass
    and their gradients (counted on the CPU: about 11 ``width`` numbers held, 25 allocated in
    all; 16 here), and the attention weights where a kernel keeps them (``heads T^2`` per
    prompt), ``T = 2 (n + 1)`` tokens; ``eval_batch``: the held-out prompts of
    ``context + 1`` examples, one block's activations at a time, and their baselines in
    float64."""
    width, layers, heads = config.width, config.layers, config.heads
    params = layers * (12 * width + 13) * width + (2 * config.examples + config.d + 6) * width + 1
    tokens, held = 2 * (config.n + 1), 2 * (config.examples + 1)
    per_prompt = layers * (16 * width * tokens + heads * tokens * tokens)
    per_held = 4 * (20 * width * held + 2 * heads * held * held) + 8 * 8 * held * config.d
    return {
        "width": 4 * 4 * params,
        "batch": 4 * config.batch * per_prompt,
        "eval_batch": config.eval_batch * per_held,
    }


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, else
    ``misalign.runtime.sizes.available_memory``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return sizes.available_memory()


def check_memory(config: TrainConfig, device: torch.device) -> None:
    """Refuse, before allocating anything, a run that cannot fit in ``device``'s memory
    (``memory_needed`` against ``available_memory``).

    Raises:
        ConfigError: naming ``d`` when the model alone cannot fit, else the field that
            sizes the largest part (``n`` where it outgrows the batch), with the GiB
            needed and available.
    """
    needed, available = memory_needed(config), available_memory(device)
    total = sum(needed.values())
    if total <= available:
        return
    model = "width" if config.model == "transformer" else "d"
    part = model if needed[model] > available else max(needed, key=needed.__getitem__)
    what = {
        "d": "the model and the input covariance need",
        "width": "the model needs",
        "batch": "a training batch needs",
        "eval_batch": "the evaluation batch needs",
    }[part]
    field = "n" if part != model and config.n > getattr(config, part) else part
    in_all = "" if needed[part] > available else f" ({total / GIB:.1f} GiB in all)"
    raise ConfigError(
        f"{field}: {what} {needed[part] / GIB:.1f} GiB{in_all}, {available / GIB:.1f} GiB available"
    )


def covariance(config: TrainConfig) -> np.ndarray:
    """``Lambda = R diag(spectrum) R^T``; ``R`` is drawn from the model seed when ``rotate``."""
    spectrum = np.ones(config.d) if config.spectrum is None else np.asarray(config.spectrum)
    R = (
        haar_rotation(np.random.default_rng(config.seed), config.d)
        if config.rotate
        else np.eye(config.d)
    )
    return (R * spectrum) @ R.T


class Tasks:
    """Batches of regression tasks, drawn on the device from one generator.

    Args:
        config: the training configuration.
        device: where to draw.
        seed: the stream's seed.
    """

    def __init__(self, config: TrainConfig, device: torch.device, seed: int) -> None:
        self.d, self.n, self.noise = config.d, config.n, config.noise
        root = np.linalg.cholesky(covariance(config))
        self.root = torch.as_tensor(root.T, dtype=torch.float32, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.device = device

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(X, y, x_q, y_q)`` with ``X`` ``(batch, n, d)`` and one query per task."""
        z = torch.randn(batch, self.n + 1, self.d, generator=self.generator, device=self.device)
        x = z @ self.root
        w = torch.randn(batch, self.d, 1, generator=self.generator, device=self.device)
        labels = (x @ w)[..., 0]
        return x[:, :-1], labels[:, :-1], x[:, -1:], labels[:, -1]

    def sequences(self, batch: int, d: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, y)``: ``batch`` prompts of ``n`` examples, ``(batch, n, d)`` and ``(batch, n)``,
        the input coordinates past ``d`` set to zero (Garg et al.'s curriculum), labels with
        noise of standard deviation ``noise``."""
        z = torch.randn(batch, n, self.d, generator=self.generator, device=self.device)
        x = z @ self.root
        x[..., d:] = 0
        w = torch.randn(batch, self.d, 1, generator=self.generator, device=self.device)
        noise = torch.randn(batch, n, generator=self.generator, device=self.device)
        return x, (x @ w)[..., 0] + self.noise * noise


@dataclass
class Evaluation:
    """One evaluation of the model against the closed-form optimum.

    Attributes:
        step: training steps taken.
        loss: Monte Carlo ICL loss on the fixed evaluation tasks.
        reference_loss: the loss of the optimal predictor ``x_q^T Gamma* X^T y / n`` on the
            same tasks (the Monte Carlo counterpart of ``optimal_loss``).
        optimal_loss: ``icl_loss(Gamma*)``, the best any LSA can do.
        gamma_error: ``|Gamma - Gamma*| / |Gamma*|`` (Frobenius) for the weights' ``Gamma``;
            ``None`` for multi-layer models.
        gamma_loss: exact ICL loss of the weights' ``Gamma``.

    A transformer's evaluation has ``loss`` at ``n`` examples, ``reference_loss`` that of
    least squares, ``optimal_loss`` that of ridge at the noise level (the Bayes-optimal
    predictor), no ``Gamma``, and ``curve``: each predictor's loss at ``0 .. context``
    examples, all on the same held-out prompts.
    """

    step: int
    loss: float
    reference_loss: float
    optimal_loss: float
    gamma_error: float | None
    gamma_loss: float | None
    curve: dict[str, list[float]] | None = None

    @property
    def excess(self) -> float:
        """``loss / optimal_loss - 1``."""
        return self.loss / self.optimal_loss - 1


def schedule(config: TrainConfig):
    """The learning-rate factor per step: linear warm-up, then constant or cosine to zero at
    ``config.steps``. A run resumed with a larger ``steps`` follows the schedule of its new
    length from the step it reached: the cosine is stretched, so the rate rises again (and
    the run differs from one of the new length from the start)."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def evaluate(
    model: LSA, tasks: tuple[torch.Tensor, ...], config: TrainConfig, step: int
) -> Evaluation:
    """Evaluate on fixed tasks and against ``Gamma*``."""
    X, y, xq, yq = tasks
    Lam = covariance(config)
    best = lsa_optimal_gamma(Lam, config.n)
    with torch.no_grad():
        loss = torch.mean((model(X, y, xq)[:, 0] - yq) ** 2).item()
        gamma_star = torch.as_tensor(best, dtype=X.dtype, device=X.device)
        optimal = torch.einsum("bqi,ij,bnj,bn->bq", xq, gamma_star, X, y)[:, 0] / config.n
        reference = torch.mean((optimal - yq) ** 2).item()
    error = gamma_loss = None
    if model.layers == 1:
        gamma = gamma_from_weights(model)
        error = float(np.linalg.norm(gamma - best) / np.linalg.norm(best))
        gamma_loss = icl_loss(gamma, Lam, config.n)
    return Evaluation(step, loss, reference, icl_loss(best, Lam, config.n), error, gamma_loss)


class HeldOut:
    """A transformer's evaluation prompts (``context + 1`` examples each, every coordinate
    active) and its baselines' losses on them, computed once.

    Args:
        config: the training configuration.
        device: where the prompts live.
    """

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        tasks = Tasks(config, device, config.seed + 2)
        self.X, self.y = tasks.sequences(config.eval_batch, config.d, config.examples + 1)
        X, y = self.X.double().cpu().numpy(), self.y.double().cpu().numpy()
        self.baselines = {
            name: np.mean((predicted - y) ** 2, axis=0).tolist()
            for name, predicted in baselines(X, y, config.noise).items()
        }

    def evaluate(self, model: Transformer, config: TrainConfig, step: int) -> Evaluation:
        """The model's loss at every prompt length, beside the baselines'."""
        with torch.no_grad():
            predicted = model.predictions(self.X, self.y)
        curve = {"transformer": torch.mean((predicted - self.y) ** 2, dim=0).tolist()}
        curve |= self.baselines
        n = config.n
        return Evaluation(
            step,
            curve["transformer"][n],
            curve["least_squares"][n],
            curve["ridge"][n],
            None,
            None,
            curve,
        )


def build(config: TrainConfig) -> LSA | Transformer:
    """The untrained model of ``config`` (float32, CPU), its weights drawn from ``seed``."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.model == "transformer":
        return Transformer(
            config.d, config.layers, config.width, config.heads, config.examples, generator
        )
    return LSA(config.d, config.layers, config.init_scale, generator, coupled=config.coupled)


def save(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically (``misalign.runtime.files.atomic_write``)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


@dataclass
class TrainResult:
    """What a training run ended with; ``resumed_from`` is the step of the checkpoint it
    continued from (``None`` for a fresh run)."""

    model: LSA | Transformer
    history: list[Evaluation]
    diverged_at: int | None
    seconds: float
    steps_run: int
    resumed_from: int | None


def check_resumable(trained: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Refuse to resume a checkpoint under another configuration; only ``steps`` may grow.

    Args:
        trained: the checkpoint's configuration (``model_dump(mode="json")``).
        config: the configuration to resume with.
        path: the checkpoint, for the message.

    Raises:
        ConfigError: naming the changed fields, or ``steps`` where it shrank.
    """
    now = config.model_dump(mode="json")
    trained = TrainConfig.model_validate(trained).model_dump(mode="json")  # defaults filled in
    changed = sorted(k for k, v in now.items() if k != "steps" and trained.get(k) != v)
    if changed:
        raise ConfigError(f"--resume: {path} was trained with another {', '.join(changed)}")
    if config.steps < trained["steps"]:
        raise ConfigError(
            f"steps: {path} was trained for {trained['steps']} steps; a resumed run can be "
            f"extended, not shortened (got {config.steps})"
        )


def train(
    config: TrainConfig,
    out: Path,
    resume: bool = False,
    progress: bool = False,
    report=None,
    on_resume=None,
) -> TrainResult:
    """Train, evaluating and checkpointing on the way.

    Args:
        config: the training configuration.
        out: the run directory; holds ``checkpoint.pt``.
        resume: continue from ``out/checkpoint.pt`` when it exists; ``config`` must be the
            checkpoint's, except that ``steps`` may grow (``check_resumable``; the
            learning-rate schedule is then stretched, see ``schedule``).
        progress: show a progress bar (loss, steps/s) on stderr.
        report: called with each ``Evaluation``.
        on_resume: called, on resuming, with the checkpoint's step and its ``steps``.

    Returns:
        The model at the last good step, its evaluations, and the step at which the
        loss stopped being finite (``None`` if it never did; no checkpoint is then
        written past the last good one).

    Raises:
        ConfigError: no GPU where one is asked for, a run too large for the memory
            (``check_memory``), ``out`` is or holds a symbolic link (``refuse_symlinks``), or a
            checkpoint to resume of another configuration.
    """
    device = pick_device(config.device)
    check_memory(config, device)
    refuse_symlinks(out)
    if device.type == "cpu":
        use_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    model = build(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(config))
    tasks = Tasks(config, device, config.seed + 1)
    if config.model == "transformer":
        held = HeldOut(config, device)

        def loss_at(step: int) -> torch.Tensor:
            d, n = config.stage(step)  # prompts of n examples and a query: n + 1 labels
            X, y = tasks.sequences(config.batch, d, n + 1)
            return torch.mean((model.predictions(X, y) - y) ** 2)

        def evaluation(step: int) -> Evaluation:
            return held.evaluate(model, config, step)
    else:
        held_out = Tasks(config, device, config.seed + 2).sample(config.eval_batch)

        def loss_at(step: int) -> torch.Tensor:
            X, y, xq, yq = tasks.sample(config.batch)
            return torch.mean((model(X, y, xq)[:, 0] - yq) ** 2)

        def evaluation(step: int) -> Evaluation:
            return evaluate(model, held_out, config, step)

    history: list[Evaluation] = []
    step, saved, resumed_from = 0, None, None  # saved: the step of this run's last checkpoint
    path = out / CHECKPOINT
    if resume and path.exists():
        state = load_checkpoint(path, device)
        check_resumable(state["config"], config, path)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            tasks.generator.set_state(state["generator"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not a misalign checkpoint ({_mismatch(exc)})") from None
        history = [Evaluation(**e) for e in state["history"]]
        step = saved = resumed_from = state["step"]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * schedule(config)(step)  # the saved rate, unless steps grew
        if on_resume is not None:
            on_resume(step, state["config"]["steps"])

    def checkpoint() -> None:
        save(
            path,
            {
                "config": config.model_dump(mode="json"),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": tasks.generator.get_state(),
                "history": [e.__dict__ for e in history],
                "step": step,
            },
        )

    bar = (
        progress_bar(
            config.steps,
            "train",
            done=step,
            columns=("loss {task.fields[loss]:.4f}", "{task.fields[rate]:.0f} step/s"),
            loss=float("nan"),
            rate=0.0,
        )
        if progress
        else None
    )
    start, first, diverged = time.perf_counter(), step, None
    while step < config.steps:
        loss = loss_at(step)
        if not torch.isfinite(loss):
            diverged = step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if step % config.eval_every == 0 or step == config.steps:
            history.append(evaluation(step))
            if report is not None:
                report(history[-1])
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint()
            saved = step
        if bar is not None and (step % 25 == 0 or step == config.steps):
            rate = (step - first) / (time.perf_counter() - start)
            bar.update(bar.task_ids[0], completed=step, loss=loss.item(), rate=rate)
    if bar is not None:
        bar.stop()
    if diverged is not None and saved is not None:  # back to the last good weights
        model.load_state_dict(load_checkpoint(path, device)["model"])
    seconds = time.perf_counter() - start
    return TrainResult(model, history, diverged, seconds, step - first, resumed_from)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``train``.

    Raises:
        ConfigError: the file is missing or is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about some foreign files
            state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(type(state).__name__)
        config = TrainConfig.model_validate(state["config"])
        state["model"]["read_in.weight" if config.model == "transformer" else "kq.0"]  # noqa: B018
    except Exception as exc:  # torch raises many kinds on a corrupt file
        raise ConfigError(f"{path}: not a misalign checkpoint ({exc.__class__.__name__})") from None
    return state


def load_model(path: str | Path) -> tuple[LSA | Transformer, TrainConfig]:
    """The trained model (float64, CPU, in evaluation mode) and its configuration.

    Raises:
        ConfigError: the file is not a checkpoint (``load_checkpoint``), its configuration
            describes a model too large for the memory (``memory_needed``: a file from
            elsewhere allocates nothing it cannot hold), or its weights do not fit the model
            its configuration describes.
    """
    state = load_checkpoint(path)
    config = TrainConfig.model_validate(state["config"])
    weights = memory_needed(config)["width" if config.model == "transformer" else "d"]
    if weights > sizes.available_memory():
        raise ConfigError(
            f"{path}: its configuration describes a model of {weights / GIB:.1f} GiB, "
            f"{sizes.available_memory() / GIB:.1f} GiB available"
        )
    model = build(config)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a misalign checkpoint ({_mismatch(exc)})") from None
    return model.double().eval(), config


def _mismatch(exc: Exception) -> str:
    """Why a checkpoint's saved state does not load, in a few words."""
    signs = ("size mismatch", "Missing key", "Unexpected key")
    if any(sign in str(exc) for sign in signs):
        return "its weights do not fit its configuration"
    return exc.__class__.__name__
