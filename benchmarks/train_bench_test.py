"""The training benchmark runs (no timing is asserted)."""

from train_bench import main


def test_training_benchmark_runs_at_small_size():
    result = main(["--steps", "5", "--d", "2", "--n", "4", "--batch", "8"])
    assert result["train_steps_per_s"] > 0 and result["floor_steps_per_s"] > 0
