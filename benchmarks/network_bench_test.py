"""The network benchmark runs and its play matches its floor (no timing is asserted)."""

from network_bench import main


def test_network_benchmark_runs_at_small_size():
    result = main(["--agents", "6", "--d", "3", "--plays", "5", "--rounds", "20"])
    assert result["play_s"] > 0 and result["floor_s"] > 0 and result["predict_s"] > 0
    assert result["converges"] == 5
