"""A GPT-2-style causal softmax transformer for in-context linear regression.

The setting of Garg, Tsipras, Liang & Valiant 2022 ("What can transformers learn in-context?
A case study of simple function classes", NeurIPS 2022, §2-3): the model reads the sequence

    x_1, y_1, x_2, y_2, ..., x_n, y_n, x_q

with each ``y`` embedded as the vector ``(y, 0, ..., 0)`` in ``R^d``, through a linear
read-in, learned positional embeddings, ``L`` pre-norm blocks (multi-head causal softmax
attention, then a GELU MLP four times as wide, each with layer norm and a residual), a final
layer norm and a linear read-out. Its output at the position of ``x_i`` is its prediction of
``y_i`` from the ``i - 1`` examples before it, so one forward pass of a prompt of ``n``
examples trains and evaluates every prompt length ``0 .. n - 1`` at once.

Unlike the linear self-attention model (``misalign.agents.lsa``) its map from a prompt to a
prediction is nonlinear and has no ``Gamma`` to read; as an agent it is a black box whose map
is fitted from probes (``misalign.llm.fit``, docs/theory.md §7 and §10).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from misalign.agents.lsa import residual_step, use_threads
from misalign.model.agent import BlackBox


class Block(nn.Module):
    """One pre-norm block: ``h + attention(norm(h))``, then ``h + mlp(norm(h))``.

    Args:
        width: the residual stream's width.
        heads: attention heads (``width`` must be a multiple).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_attention = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.project = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, width = h.shape
        q, k, v = self.qkv(self.norm_attention(h)).split(width, dim=-1)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.project(mixed.transpose(1, 2).reshape(B, T, width))
        return h + self.mlp(self.norm_mlp(h))


class Transformer(nn.Module):
    """The causal transformer of Garg et al. 2022, sized by ``layers``, ``width``, ``heads``.

    Args:
        d: input dimension.
        layers: blocks ``L``.
        width: the residual stream's width.
        heads: attention heads per block.
        context: the most examples a prompt may hold (the positional embeddings cover
            ``2 (context + 1)`` tokens: ``context`` examples and a query, or ``context + 1``
            examples); positions past the trained ``n`` are never trained.
        generator: the random stream of the initial weights (GPT-2's: normal, std 0.02).
    """

    def __init__(
        self,
        d: int,
        layers: int = 2,
        width: int = 64,
        heads: int = 2,
        context: int = 40,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.d, self.context = d, context
        self.read_in = nn.Linear(d, width)
        self.position = nn.Parameter(torch.zeros(2 * (context + 1), width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.read_out = nn.Linear(width, 1)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    continue
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=generator))

    @property
    def layers(self) -> int:
        return len(self.blocks)

    def _outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The read-out at every position of ``(B, T, d)`` tokens: ``(B, T)``."""
        T = tokens.shape[1]
        if self.position.shape[0] < T:
            raise ValueError(f"{T} tokens exceed the context of {self.context} examples")
        h = self.read_in(tokens) + self.position[:T]
        for block in self.blocks:
            h = block(h)
        return self.read_out(self.norm(h))[..., 0]

    def predictions(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The prediction of every label from the examples before it.

        Args:
            X: ``(B, n, d)`` inputs; y: ``(B, n)`` labels.

        Returns:
            ``(B, n)``: entry ``i`` predicts ``y_{i+1}`` from the first ``i`` examples.
        """
        labels = torch.zeros_like(X)
        labels[..., 0] = y
        tokens = torch.stack([X, labels], dim=2).flatten(1, 2)  # x_1, y_1, x_2, y_2, ...
        return self._outputs(tokens)[:, ::2]

    def forward(self, X: torch.Tensor, y: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Predict the labels of ``queries`` from the prompt ``(X, y)``, each query on its own
        (the sequence ``x_1, y_1, ..., x_n, y_n, x_q`` per query), in one forward pass.

        Args:
            X: ``(B, n, d)`` inputs; y: ``(B, n)`` labels; queries: ``(B, q, d)``.

        Returns:
            ``(B, q)`` predictions.
        """
        B, n, d = X.shape
        q = queries.shape[1]
        labels = torch.zeros_like(X)
        labels[..., 0] = y
        prompt = torch.stack([X, labels], dim=2).flatten(1, 2)  # (B, 2n, d)
        tokens = torch.cat(
            [prompt[:, None].expand(B, q, 2 * n, d), queries[:, :, None]], dim=2
        ).reshape(B * q, 2 * n + 1, d)
        return self._outputs(tokens)[:, -1].reshape(B, q)


def parameters(model: nn.Module) -> int:
    """The number of trained parameters."""
    return sum(p.numel() for p in model.parameters())


def baselines(X: np.ndarray, y: np.ndarray, noise: float) -> dict[str, np.ndarray]:
    """Garg et al.'s baselines, each predicting ``y_{i+1}`` from the first ``i`` examples
    (``i = 0 .. n - 1``), in float64.

    * ``least_squares``: the minimum-norm least-squares fit (``pinv(X_i) y_i``);
    * ``ridge``: the posterior mean under the training prior ``w ~ N(0, I)`` with label noise
      ``sigma``, ``(X_i^T X_i + sigma^2 I)^{-1} X_i^T y_i`` (the Bayes-optimal predictor;
      ``sigma = 0`` is least squares' minimum-norm limit);
    * ``averaging``: ``w = X_i^T y_i / i`` (Garg et al.'s "averaging").

    Args:
        X: ``(B, n, d)``; y: ``(B, n)``; noise: the label noise ``sigma``.

    Returns:
        Each baseline's predictions, ``(B, n)``.
    """
    B, n, d = X.shape
    out = {name: np.zeros((B, n)) for name in ("least_squares", "ridge", "averaging")}
    for i in range(1, n):
        Xi, yi, xq = X[:, :i], y[:, :i], X[:, i]
        w = np.linalg.pinv(Xi) @ yi[..., None]
        out["least_squares"][:, i] = (xq[:, None] @ w)[:, 0, 0]
        if noise > 0:
            gram = Xi.transpose(0, 2, 1) @ Xi + noise**2 * np.eye(d)
            w = np.linalg.solve(gram, Xi.transpose(0, 2, 1) @ yi[..., None])
        out["ridge"][:, i] = (xq[:, None] @ w)[:, 0, 0]
        out["averaging"][:, i] = np.einsum("bd,bid,bi->b", xq, Xi, yi) / i
    return out


CHUNK = 4096
"""Plays per forward pass: memory grows with ``plays d (2 n + 1) width``."""


class TransformerAgent(BlackBox):
    """A trained model as a black-box agent (docs/theory.md §10): fed the incoming estimate
    ``w`` as residual labels ``y_j - x_j^T w``, it answers ``w`` plus its regression
    estimate, read by the basis queries ``e_1 .. e_d``; for a model that has learned least
    squares, about the least-squares solution whatever ``w`` is. Every play of a batch, and
    every probe asked at once, runs in one batched forward pass (``CHUNK`` plays at a time),
    in float64 on one CPU thread. Its map is fitted from probes (``misalign.llm.fit``).

    Args:
        name: the agent's name.
        config: its configuration (``probes``, ``refits``).
        model: the trained model (a ``Transformer``; any model answering
            ``model(X, y, queries)`` serves, a linear self-attention one too).
        prompts: one prompt per play.
        seeds: each play's seed.
    """

    deterministic = True

    def __init__(self, name: str, config, model: nn.Module, prompts: list, seeds: list[int]):
        use_threads()
        self.name, self.config, self.seeds = name, config, list(seeds)
        self.model = model.double().eval()
        self.X = torch.as_tensor(np.stack([p.X for p in prompts]))
        self.y = torch.as_tensor(np.stack([p.y for p in prompts]))
        self.history = []

    def default_probes(self, d: int) -> int:
        """``2 d + 1``: answers are cheap, and one probe more than the two-sided star lets a
        local fit (whose first probe is the predicted input itself) leave every probe out, so
        it has a held-out r2."""
        return 2 * d + 1

    def start(self, batch: int) -> None:
        if batch != len(self.X):
            raise ValueError(f"agent {self.name} holds {len(self.X)} plays, not {batch}")
        self.history = []

    @torch.no_grad()
    def answer(self, plays: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The answers of the given plays to the estimates ``w``.

        Args:
            plays: ``(k,)`` play indices (repeats allowed); w: ``(k, d)`` estimates.

        Returns:
            ``(k, d)``: ``w + model(X, y - X w, I)`` per play (``residual_step``).
        """
        out = np.empty_like(w)
        for start in range(0, len(plays), CHUNK):
            part = slice(start, start + CHUNK)
            index = torch.as_tensor(plays[part])
            step = residual_step(self.model, self.X[index], self.y[index], torch.as_tensor(w[part]))
            out[part] = step.numpy()
        return out

    def respond(self, w: np.ndarray, turn) -> np.ndarray:
        """Every play's answer; NaN where the incoming estimate is not finite."""
        out = np.full(w.shape, np.nan) if turn.out is None else turn.out
        out[...] = np.nan
        live = np.flatnonzero(np.isfinite(w).all(axis=-1))
        out[live] = self.answer(live, w[live])
        self.history.append((w.copy(), out.copy()))
        return out

    def ask(self, requests) -> list[np.ndarray]:
        """Answers to ``(play, estimate, slot)`` requests, all in one batched pass."""
        if not requests:
            return []
        plays = np.array([play for play, _, _ in requests])
        return list(self.answer(plays, np.stack([w for _, w, _ in requests])))
