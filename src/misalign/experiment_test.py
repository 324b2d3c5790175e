"""Tests for misalign.experiment: the Python API."""

import numpy as np
import pytest

from misalign.config import parse_config
from misalign.experiment import predict, setup, simulate

CONFIG = {
    "seed": 3,
    "d": 3,
    "rounds": 60,
    "agents": {
        "A": {"n": 6, "spectrum": [1.0, 0.5, 2.0], "rotate": True, "noise": 0.1},
        "B": {"n": 5, "preconditioner": "identity", "eta": 0.4, "target": [0.0, 1.0, 0.0]},
    },
}


def test_same_config_same_play_bit_for_bit():
    config = parse_config(CONFIG)
    a, b = simulate(setup(config)), simulate(setup(config))
    assert a.turns.tobytes() == b.turns.tobytes()


def test_batch_member_equals_the_single_run_of_its_seed():
    config = parse_config(CONFIG)
    batch = setup(config, seeds=[7, 3, 11])
    together = simulate(batch)
    alone = simulate(setup(config.model_copy(update={"seed": 11})))
    np.testing.assert_allclose(together.turns[:, 2], alone.turns[:, 0], rtol=1e-13, atol=1e-15)
    assert predict(batch).rho.shape == (3,)


def test_batch_of_different_configs():
    configs = [parse_config(CONFIG | {"seed": s}) for s in (1, 2)]
    configs.append(parse_config({**CONFIG, "agents": {**CONFIG["agents"], "B": {"n": 9}}}))
    game = setup(configs)
    assert game.agents["B"].gamma.shape == (3, 3, 3)
    with pytest.raises(ValueError, match="a batch needs one d"):
        setup(
            [configs[0], parse_config({**CONFIG, "d": 2, "agents": {"A": {"n": 2}, "B": {"n": 2}}})]
        )
