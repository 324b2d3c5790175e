"""Tests for misalign.agents.transformer: the causal model, Garg et al.'s baselines against
direct computations, the agent against a per-play loop, and the fitted-map path recovering a
linear self-attention model's exact map."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from misalign.agents.lsa import LSA, LSAAgent
from misalign.agents.train import CHECKPOINT, load_model, train
from misalign.agents.train_test import _one_line_error
from misalign.agents.transformer import Transformer, TransformerAgent, baselines
from misalign.config import ConfigError, TrainConfig, parse_config
from misalign.model.agent import Turn, black_boxes
from misalign.model.prompt import Prompt

TINY = {
    "model": "transformer",
    "d": 3,
    "n": 6,
    "noise": 0.25,
    "layers": 1,
    "width": 16,
    "heads": 2,
    "steps": 30,
    "batch": 16,
    "lr": 0.001,
    "eval_every": 10,
    "eval_batch": 64,
    "checkpoint_every": 10,
}


def _model(seed: int = 0, d: int = 3, context: int = 10) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(d, 2, 16, 4, context, torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():  # GPT-2's 0.02 start is nearly constant; spread the weights out
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 7))
def test_a_prediction_reads_only_the_examples_before_it(seed, cut):
    """Changing examples ``cut ..`` leaves the predictions of labels ``0 .. cut`` as they were."""
    model = _model(seed % 7)
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((2, 9, 3)), rng.standard_normal((2, 9))
    other_X, other_y = X.copy(), y.copy()
    other_X[:, cut + 1 :] = rng.standard_normal(other_X[:, cut + 1 :].shape)
    other_y[:, cut:] = rng.standard_normal(other_y[:, cut:].shape)
    with torch.no_grad():
        a = model.predictions(torch.as_tensor(X), torch.as_tensor(y))
        b = model.predictions(torch.as_tensor(other_X), torch.as_tensor(other_y))
    torch.testing.assert_close(a[:, : cut + 1], b[:, : cut + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, cut + 1 :], b[:, cut + 1 :])


@pytest.mark.parametrize("seed", range(5))
def test_each_query_is_answered_as_the_last_label_of_its_own_prompt(seed):
    """``forward`` (every query at once) against ``predictions`` of the prompt with the query
    appended as one more example, one query at a time."""
    model = _model(seed)
    rng = np.random.default_rng(seed)
    X, y, queries = (
        torch.as_tensor(rng.standard_normal(s)) for s in ((4, 7, 3), (4, 7), (4, 5, 3))
    )
    with torch.no_grad():
        together = model(X, y, queries)
        for q in range(5):
            alone = model.predictions(
                torch.cat([X, queries[:, q : q + 1]], dim=1), torch.cat([y, y[:, :1]], dim=1)
            )[:, -1]
            torch.testing.assert_close(together[:, q], alone, rtol=0, atol=1e-12)


def test_a_prompt_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match="exceed the context of 10 examples"):
        _model()(
            torch.zeros(1, 11, 3, dtype=torch.float64),
            torch.zeros(1, 11).double(),
            torch.zeros(1, 1, 3).double(),
        )


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from([0.0, 0.3]))
def test_baselines_match_a_direct_computation(seed, noise):
    """Least squares by ``lstsq`` (minimum norm), ridge by its normal equations and averaging
    by a sum, task by task and prompt length by prompt length."""
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((3, 7, 3)), rng.standard_normal((3, 7))
    found = baselines(X, y, noise)
    for b in range(3):
        assert found["least_squares"][b, 0] == found["ridge"][b, 0] == 0.0
        for i in range(1, 7):
            Xi, yi, xq = X[b, :i], y[b, :i], X[b, i]
            w = np.linalg.lstsq(Xi, yi, rcond=None)[0]
            np.testing.assert_allclose(found["least_squares"][b, i], xq @ w, atol=1e-8)
            ridge = (
                w if noise == 0 else np.linalg.solve(Xi.T @ Xi + noise**2 * np.eye(3), Xi.T @ yi)
            )
            np.testing.assert_allclose(found["ridge"][b, i], xq @ ridge, atol=1e-8)
            average = sum(y[b, j] * X[b, j] for j in range(i)) / i
            np.testing.assert_allclose(found["averaging"][b, i], xq @ average, atol=1e-12)


def _prompts(seeds, d=3, n=6):
    prompts = []
    for s in seeds:
        rng = np.random.default_rng(s)
        X, target = rng.standard_normal((n, d)), rng.standard_normal(d)
        prompts.append(Prompt(X, X @ target + 0.1 * rng.standard_normal(n), target, np.eye(d)))
    return prompts


class _Fits:
    probes, refits, samples = None, 2, 1


def test_the_agent_answers_the_estimate_plus_the_models_step_for_every_play():
    """The batched answer, per play: ``w + model(X, y - X w, e_1..e_d)`` computed one play and
    one query at a time; a non-finite estimate is answered NaN; ``ask`` answers the same."""
    model, seeds = _model(3), [4, 5, 6]
    prompts = _prompts(seeds)
    agent = TransformerAgent("A", _Fits(), model, prompts, seeds)
    agent.start(3)
    w = np.random.default_rng(0).standard_normal((3, 3))
    w[1] = np.nan
    out = agent.respond(w, Turn(0, 0, "B"))
    for b in (0, 2):
        X, y = (torch.as_tensor(a)[None] for a in (prompts[b].X, prompts[b].y))
        residual = y - (X @ torch.as_tensor(w[b]))
        expected = [
            w[b, i] + model(X, residual, torch.eye(3, dtype=X.dtype)[None, i : i + 1]).item()
            for i in range(3)
        ]
        np.testing.assert_allclose(out[b], expected, rtol=0, atol=1e-12)
    assert np.isnan(out[1]).all()
    asked = agent.ask([(2, w[2], None), (0, w[0], None)])
    np.testing.assert_array_equal(np.stack(asked), out[[2, 0]])
    assert len(agent.history) == 1 and agent.gamma is None and agent.affine() is None


def test_a_play_in_a_batch_is_the_single_run_of_its_seed():
    model = _model(1)
    batch = TransformerAgent("A", _Fits(), model, _prompts([7, 8, 9]), [7, 8, 9])
    alone = TransformerAgent("A", _Fits(), model, _prompts([8]), [8])
    w = np.random.default_rng(1).standard_normal((3, 3))
    np.testing.assert_array_equal(batch.answer(np.arange(3), w)[1], alone.answer([0], w[1:2])[0])


def test_the_fitted_map_of_a_linear_self_attention_model_is_its_exact_map(tmp_path):
    """The black-box path (probes, least squares, refits, the check) on a trained LSA, which is
    exactly affine in the estimate: the fitted ``A`` and ``c`` are those of its ``Gamma``,
    the held-out r2 is 1 and the prediction is confirmed at its first check (no local refit)."""
    from misalign.api import fit, predict, setup

    lsa = train(TrainConfig(d=3, n=10, steps=200, batch=256, eval_every=200), tmp_path).model
    config = parse_config(
        {
            "seed": 0,
            "d": 3,
            "rounds": 20,
            "agents": {
                "A": {"kind": "gd", "n": 10, "target": [1.0, 0.0, 0.0]},
                "B": {"kind": "gd", "n": 10, "target": [0.0, 1.0, 0.0]},
            },
        }
    )
    game = setup(config, seeds=[0, 1, 2])
    exact = LSAAgent("A", lsa, game.prompts["A"])
    box = TransformerAgent("A", _Fits(), LSA(3, 1, coupled=False), game.prompts["A"], [0, 1, 2])
    box.model.load_state_dict({k: v.double() for k, v in lsa.state_dict().items()})
    game.agents["A"] = box
    game = dataclasses.replace(
        game,
        configs=tuple(
            c.model_copy(update={"agents": c.agents | {"A": _box_config(c.agents["A"])}})
            for c in game.configs
        ),
    )
    assert list(black_boxes(game.agents)) == ["A"]
    fits = fit(game)
    truth = exact.affine()
    assert fits.agents["A"].local is None
    for reported in (fits.agents["A"].global_,):
        np.testing.assert_allclose(reported.map.A, truth.A, rtol=0, atol=1e-9)
        np.testing.assert_allclose(reported.map.c, truth.c, rtol=0, atol=1e-9)
        assert np.all(reported.r2_loo > 1 - 1e-12)
    assert fits.agents["A"].confirmed.all() and fits.agents["A"].noise_allowed is None
    game.agents["A"] = exact
    np.testing.assert_allclose(
        predict(game).fixed_point["A"], fits.global_prediction.fixed_point["A"], atol=1e-9
    )


def _box_config(agent):
    from misalign.config import TransformerAgentConfig

    return TransformerAgentConfig(
        kind="transformer", checkpoint="-", n=agent.n, target=agent.target, refits=2
    )


def test_curriculum_stages_grow_to_the_configured_size():
    config = TrainConfig(**TINY | {"curriculum": {"d": 1, "n": 2, "every": 5}})
    stages = [config.stage(step) for step in range(0, 40, 5)]
    assert stages[:3] == [(1, 2), (2, 4), (3, 6)] and stages[-1] == (3, 6)
    assert TrainConfig(**TINY).stage(10**6) == (3, 6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "lsa"}, 'noise: applies to model = "transformer" only'),
        ({"heads": 3}, "heads: must divide width = 16 (got 3)"),
        ({"context": 5}, "context: must be at least n = 6 (got 5)"),
        ({"curriculum": {"d": 4}}, "curriculum.d: must be at most d = 3"),
    ],
)
def test_bad_transformer_settings_are_one_line_naming_the_field(change, message):
    from misalign.config import _validated

    with pytest.raises(ConfigError) as info:
        _validated(TrainConfig, TINY | change)
    assert str(info.value) == message


def test_training_records_the_loss_at_every_prompt_length_beside_the_baselines(tmp_path):
    result = train(TrainConfig(**TINY), tmp_path)
    final = result.history[-1]
    assert set(final.curve) == {"transformer", "least_squares", "ridge", "averaging"}
    assert all(len(v) == 2 * 6 + 1 for v in final.curve.values())  # 0 .. context examples
    assert final.loss == final.curve["transformer"][6]
    assert final.reference_loss == final.curve["least_squares"][6]
    model, config = load_model(tmp_path / CHECKPOINT)
    assert isinstance(model, Transformer) and config.model == "transformer"
    assert next(model.parameters()).dtype == torch.float64


@pytest.mark.parametrize("layers", [1, 3])
def test_the_memory_estimate_bounds_a_direct_count(layers):
    """One training step and one evaluation of a transformer, counted as for the linear
    self-attention model (``train_test``): the estimate lies between what must be held at once
    (the batch and the tensors saved for the backward pass) and all that is ever allocated;
    the model part covers weights, gradients and Adam moments; the evaluation part holds the
    held-out prompts."""
    from misalign.agents.train import HeldOut, Tasks, build, memory_needed
    from misalign.agents.train_test import _counted_step, _storage_bytes

    config = TrainConfig(**TINY | {"layers": layers, "batch": 32, "eval_batch": 48})
    needed = memory_needed(config)
    model = build(config)
    optimizer = torch.optim.Adam(model.parameters())

    def step():
        X, y = Tasks(config, torch.device("cpu"), 0).sequences(config.batch, 3, config.n + 1)
        return (X, y), torch.mean((model.predictions(X, y) - y) ** 2)

    allocated, held = _counted_step(config.batch, step)
    assert held <= needed["batch"] <= allocated
    optimizer.step()
    weights = [*model.parameters(), *(p.grad for p in model.parameters())]
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim()]
    assert _storage_bytes(weights + moments) <= needed["width"]
    held_out = HeldOut(config, torch.device("cpu"))
    assert _storage_bytes([held_out.X, held_out.y]) <= needed["eval_batch"]


def test_a_transformer_too_wide_for_memory_is_refused_at_once(tmp_path):
    config = tmp_path / "t.toml"
    config.write_text("\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in TINY.items()))
    settings = ["--set", "width=4096", "--set", "layers=10000"]
    process = _misalign("train", str(config), *settings, "--out", str(tmp_path / "run"))
    _one_line_error(process, "width: the model needs ")
    assert not (tmp_path / "run").exists()


def _misalign(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """``misalign ARGS`` in a real process."""
    command = [sys.executable, "-m", "misalign.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


def _tiny_checkpoint(tmp_path, **change) -> str:
    train(TrainConfig(**TINY | {"d": 2, "n": 6} | change), tmp_path / "model")
    return str(tmp_path / "model" / CHECKPOINT)


def _play(tmp_path, agent: dict) -> str:
    lines = ["seed = 0", "d = 2", "rounds = 30", "[agents.A]"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in agent.items()]
    lines += ["n = 6", "target = [1.0, 0.0]", "[agents.B]", "n = 6", "target = [0.0, 1.0]"]
    path = tmp_path / "play.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_run_plays_a_transformer_agent_and_predicts_through_its_fitted_map(tmp_path):
    """The command line end to end: the JSON holds the observed class, the fitted maps (with
    held-out r2, the check where the prediction points) and the prediction made from them."""
    import json

    checkpoint = _tiny_checkpoint(tmp_path)
    play = _play(tmp_path, {"kind": "transformer", "checkpoint": checkpoint})
    process = _misalign("run", play, "--json", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    report = json.loads(process.stdout)
    assert report["observed"]["class"] in ("fixed point", "cycle", "bounded", "growing")
    fit = report["fit"]["A"]
    assert fit["global"]["probes"] == 2 * 2 + 1 and fit["noise_allowed"] is None
    assert fit["confirmed"] in (True, False) and fit["global"]["r2_loo"] is not None
    assert "B" not in report["fit"] and report.get("llm") is None


@pytest.mark.parametrize(
    ("agent", "message"),
    [
        ({"kind": "transformer", "checkpoint": "missing.pt"}, "agents.A.checkpoint: missing.pt"),
        ({"kind": "lsa", "checkpoint": "TRANSFORMER"}, "agents.A.checkpoint: an lsa agent needs"),
        ({"kind": "transformer", "checkpoint": "TRANSFORMER", "n": 13}, "agents.A.n: the "),
    ],
)
def test_a_checkpoint_that_cannot_play_is_one_line_naming_the_field(tmp_path, agent, message):
    checkpoint = _tiny_checkpoint(tmp_path)
    agent = {k: checkpoint if v == "TRANSFORMER" else v for k, v in agent.items()}
    play = _play(tmp_path, {k: v for k, v in agent.items() if k != "n"})
    if "n" in agent:
        text = Path(play).read_text().replace("[agents.A]\n", "[agents.A]\nn = 13\n", 1)
        Path(play).write_text(text.replace("n = 6\ntarget = [1.0, 0.0]", "target = [1.0, 0.0]"))
    process = _misalign("run", play, "--out", str(tmp_path / "r"), cwd=tmp_path)
    _one_line_error(process, message)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 32}, "not a misalign checkpoint (its weights do not fit its configuration)"),
        ({"context": 50}, "not a misalign checkpoint (its weights do not fit its configuration)"),
        ({"layers": 10**7}, "its configuration describes a model of "),
    ],
)
def test_a_doctored_checkpoint_is_one_line_and_allocates_nothing_it_cannot_hold(
    tmp_path, change, message
):
    """A checkpoint from elsewhere whose configuration does not describe its weights was a
    torch traceback (size mismatch); one describing a huge model would have been built."""
    checkpoint = _tiny_checkpoint(tmp_path)
    state = torch.load(checkpoint, weights_only=True)
    state["config"] |= change
    doctored = tmp_path / "doctored.pt"
    torch.save(state, doctored)
    play = _play(tmp_path, {"kind": "transformer", "checkpoint": str(doctored)})
    process = _misalign("run", play, "--out", str(tmp_path / "r"), cwd=tmp_path)
    _one_line_error(process, f"agents.A.checkpoint: {doctored}: {message}")
