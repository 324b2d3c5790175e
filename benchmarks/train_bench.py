"""Benchmark: ``misalign.agents.train`` steps per second against a minimal hand-written torch loop.

The floor trains the same single-layer LSA (two (d+1) x (d+1) matrices, the same forward
pass written inline) with Adam on the same batches, with nothing else: no schedule, no
evaluation, no checkpoints, no progress. Both run with one CPU thread (what
``TrainConfig.threads`` sets) on the same device.

    python benchmarks/train_bench.py              # d = 5, n = 20, batch 1024, 1000 steps
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from misalign.agents.train import pick_device, train
from misalign.config import TrainConfig


def floor(config: TrainConfig, device: torch.device) -> float:
    """Seconds for ``config.steps`` steps of the bare loop."""
    d, n, batch = config.d, config.n, config.batch
    g = torch.Generator(device=device).manual_seed(0)
    kq = (0.1 * torch.randn(d + 1, d + 1, device=device)).requires_grad_()
    pv = (0.1 * torch.randn(d + 1, d + 1, device=device)).requires_grad_()
    optimizer = torch.optim.Adam([kq, pv], lr=config.lr)
    start = time.perf_counter()
    for _ in range(config.steps):
        x = torch.randn(batch, n + 1, d, generator=g, device=device)
        w = torch.randn(batch, d, 1, generator=g, device=device)
        labels = (x @ w)[..., 0]
        data = torch.cat([x[:, :-1], labels[:, :-1, None]], -1).transpose(1, 2)
        query = torch.cat([x[:, -1:], torch.zeros(batch, 1, 1, device=device)], -1).transpose(1, 2)
        scores = data.transpose(1, 2) @ kq
        prediction = -(query + (pv @ data) @ (scores @ query) / n)[:, -1, 0]
        loss = torch.mean((prediction - labels[:, -1]) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--d", type=int, default=5)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args(argv)
    config = TrainConfig(
        d=args.d,
        n=args.n,
        batch=args.batch,
        steps=args.steps,
        eval_every=10**9,
        checkpoint_every=10**9,
        eval_batch=1,
    )
    device = pick_device(config.device)
    torch.set_num_threads(config.threads)
    floor(config.model_copy(update={"steps": 20}), device)  # warm-up
    t_floor = floor(config, device)
    with tempfile.TemporaryDirectory() as out:
        t_train = train(config, Path(out)).seconds
    result = {
        "device": str(device),
        "steps": args.steps,
        "floor_steps_per_s": args.steps / t_floor,
        "train_steps_per_s": args.steps / t_train,
        "train_over_floor_throughput": t_floor / t_train,
    }
    print(json.dumps(result, indent=1))
    print(
        f"misalign.agents.train runs at {t_floor / t_train:.2f}x the steps/s of the bare torch loop"
    )
    return result


if __name__ == "__main__":
    main()
