"""Linear self-attention (LSA) transformers for in-context linear regression.

Parametrisation (Zhang, Frei & Bartlett 2024, "Trained transformers learn linear models
in-context"; Ahn et al. 2023; von Oswald et al. 2023). Tokens are the columns of

    Z = [[x_1 ... x_n  x_q],
         [y_1 ... y_n  0  ]]          in R^{(d+1) x (n+1)},

and each layer adds ``W_PV Z M (Z^T W_KQ Z) / n`` with ``M = diag(1, ..., 1, 0)`` (the
query is not a key). The prediction is read from the query's label slot, negated:
``y^ = -Z[d, n]``. This is von Oswald et al.'s sign convention, in which ``L`` layers
with label-row value scalar ``-1`` and key-query block ``eta_l I`` carry out ``L``
gradient steps from ``w = 0`` (the data label slots hold the residuals
``y_j - x_j^T w_l``, the query's holds ``-x_q^T w_l``). With one layer and only those
blocks non-zero, ``y^ = x_q^T Gamma X^T y / n`` with

    Gamma = -v K^T,   v = W_PV[d, d],   K = W_KQ[:d, :d],

which is how ``gamma_from_weights`` reads it. The model is linear in the labels only
while the other label-row and label-column blocks stay zero, as they do at the optimum
``Gamma*`` (``misalign.model.agent.lsa_optimal_gamma``); ``label_coupling`` measures them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def use_threads(threads: int = 1) -> None:
    """The CPU thread policy of training and play: ``threads`` torch threads (``0``: torch's
    default, one per core). These models are small, so one thread is fastest: more only
    contend, the more so on a shared machine.

    Args:
        threads: the number of threads, or ``0`` to leave torch's setting alone.
    """
    if threads > 0:
        torch.set_num_threads(threads)


class LSA(nn.Module):
    """An ``L``-layer linear self-attention stack.

    The label-coupling blocks (``W_PV[d, :d]``, the label row and column of ``W_KQ``)
    start at zero, as in Zhang, Frei & Bartlett's initialisation; the other entries
    start at ``init_scale * N(0, 1)``. Gradient flow on the population loss keeps those
    blocks at zero, but minibatch noise under Adam does not (they jitter at the scale of
    the learning rate, which biases the play about as much), so unless ``coupled`` a
    mask holds them at zero and the model is exactly linear in the labels.

    Args:
        d: input dimension.
        layers: number of layers ``L``.
        init_scale: standard deviation of the initial weights.
        generator: the random stream of the initial weights.
        coupled: train the label-coupling blocks too.
    """

    def __init__(
        self,
        d: int,
        layers: int = 1,
        init_scale: float = 0.1,
        generator: torch.Generator | None = None,
        coupled: bool = False,
    ) -> None:
        super().__init__()
        self.d = d
        mask_kq, mask_pv = torch.ones(d + 1, d + 1), torch.ones(d + 1, d + 1)
        mask_kq[d, :], mask_kq[:, d], mask_pv[d, :d] = 0, 0, 0

        def weights(start: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(start * init_scale * torch.randn(d + 1, d + 1, generator=generator))

        # The label-coupling blocks start at zero (Zhang, Frei & Bartlett's initialisation).
        self.kq = nn.ParameterList([weights(mask_kq) for _ in range(layers)])
        self.pv = nn.ParameterList([weights(mask_pv) for _ in range(layers)])
        if coupled:
            mask_kq, mask_pv = torch.ones_like(mask_kq), torch.ones_like(mask_pv)
        self.register_buffer("mask_kq", mask_kq)
        self.register_buffer("mask_pv", mask_pv)

    @property
    def layers(self) -> int:
        return len(self.kq)

    def forward(self, X: torch.Tensor, y: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Predict the labels of ``queries`` from the prompt ``(X, y)``.

        Args:
            X: ``(B, n, d)`` inputs.
            y: ``(B, n)`` labels.
            queries: ``(B, q, d)``: ``q`` queries per prompt, answered independently
                (each sees the prompt, not the other queries).

        Returns:
            ``(B, q)`` predictions.
        """
        B, n, _ = X.shape
        q = queries.shape[1]
        data = torch.cat([X, y[..., None]], dim=-1).transpose(1, 2)  # (B, d+1, n)
        query = torch.cat([queries, queries.new_zeros(B, q, 1)], dim=-1).transpose(1, 2)
        for layer, (kq, pv) in enumerate(zip(self.kq, self.pv, strict=True)):
            kq, pv = kq * self.mask_kq, pv * self.mask_pv
            # Keys are the data tokens only; every token (data and query) is updated,
            # the data tokens only while a later layer will read them.
            scores_data = data.transpose(1, 2) @ kq  # (B, n, d+1): z_i^T W_KQ
            values = pv @ data  # (B, d+1, n)
            query = query + values @ (scores_data @ query) / n
            if layer + 1 < self.layers:
                data = data + values @ (scores_data @ data) / n
        return -query[:, -1, :]


def gamma_from_weights(model: LSA) -> np.ndarray:
    """``Gamma = -v K^T`` of a single-layer model (see the module docstring)."""
    if model.layers != 1:
        raise ValueError(f"a Gamma is read off single-layer models only (got {model.layers})")
    d = model.d
    v = model.pv[0][d, d].item()
    K = (model.kq[0] * model.mask_kq)[:d, :d].detach().double().cpu().numpy()
    return -v * K.T


@torch.no_grad()
def gamma_by_probing(model: LSA, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``Gamma`` read from predictions: with basis queries ``e_1 .. e_d`` the model answers
    ``e_i^T Gamma X^T y / n``; probing with prompts whose moments ``X^T y / n`` span
    ``R^d`` recovers ``Gamma`` by least squares.

    Args:
        model: the trained model.
        X: ``(P, n, d)`` probe prompts.
        y: ``(P, n)`` their labels.

    Returns:
        ``Gamma``, ``(d, d)``.
    """
    d = model.d
    queries = torch.eye(d, dtype=torch.float64).expand(len(X), d, d)
    answers = _double(model)(torch.as_tensor(X), torch.as_tensor(y), queries).numpy()  # (P, d)
    moments = np.einsum("pkd,pk->pd", X, y) / X.shape[1]  # (P, d)
    return np.linalg.lstsq(moments, answers, rcond=None)[0].T


def residual_step(model, X: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A trained model's answer as an agent: it reads the incoming estimate ``w`` as the
    residual labels ``y - X w`` and answers ``w`` plus its regression estimate of them, read
    by the basis queries ``e_1 .. e_d`` (docs/theory.md §1 and §10).

    Args:
        model: answers ``model(X, y, queries)`` (``LSA``, or the softmax ``Transformer``).
        X: ``(B, n, d)`` inputs; y: ``(B, n)`` labels; w: ``(B, d)`` estimates.

    Returns:
        ``w + model(X, y - X w, I)``, ``(B, d)``.
    """
    residual = y - (X @ w[..., None])[..., 0]
    queries = torch.eye(X.shape[-1], dtype=X.dtype).expand(len(X), -1, -1)
    return w + model(X, residual, queries)


def label_coupling(model: LSA) -> float:
    """Largest weight in the blocks that must vanish for a single layer's prediction to be
    linear in the labels (``W_PV[d, :d]`` and ``W_KQ[d, :d]``; the label column of ``W_KQ``
    meets the query's zero label and never acts), relative to ``|v| max |K|``."""
    d = model.d
    pv = (model.pv[0] * model.mask_pv).detach().double()
    kq = (model.kq[0] * model.mask_kq).detach().double()
    stray = torch.cat([pv[d, :d], kq[d, :d]]).abs().max().item()
    scale = abs(pv[d, d].item()) * kq[:d, :d].abs().max().item()
    return stray / max(scale, 1e-300)


def _double(model: LSA) -> LSA:
    """A float64 copy on the CPU, for exact reading and play."""
    copy = LSA(model.d, model.layers, coupled=True)
    copy.load_state_dict({k: v.detach().double().cpu() for k, v in model.state_dict().items()})
    return copy.double()


class LSAAgent:
    """A trained single-layer LSA as an agent (docs/theory.md §1).

    The model is linear in the labels, so fed the residual labels ``y - X w`` and the
    basis queries ``e_1 .. e_d`` it answers the step ``Gamma X^T (y - X w) / n =
    f(w) - w``: the agent outputs ``w`` plus that answer, for all plays at once. The
    theory uses the ``Gamma`` read off the weights (``gamma_from_weights``). Plays run on
    one CPU thread (``use_threads``), as training does by default.

    Args:
        name: the agent's name.
        model: the trained model (run in float64 on the CPU).
        prompts: one prompt per play.
    """

    def __init__(self, name: str, model: LSA, prompts: list) -> None:
        from misalign.model.agent import GradientAgent

        use_threads()
        self.name = name
        self.model = _double(model)
        self.X = torch.as_tensor(np.stack([p.X for p in prompts]))
        self.y = torch.as_tensor(np.stack([p.y for p in prompts]))
        gamma = np.broadcast_to(gamma_from_weights(model), (len(prompts), model.d, model.d))
        self._theory = GradientAgent.on_prompts(name, np.ascontiguousarray(gamma), prompts)

    @property
    def gamma(self) -> np.ndarray:
        return self._theory.gamma

    def start(self, batch: int) -> None:
        pass

    @torch.no_grad()
    def respond(self, w: np.ndarray, turn) -> np.ndarray:
        return residual_step(self.model, self.X, self.y, torch.as_tensor(w)).numpy()

    def affine(self):
        return self._theory.affine()
