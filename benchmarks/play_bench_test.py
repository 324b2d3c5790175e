"""The benchmark runs and its three implementations agree (no timing is asserted)."""

from play_bench import main


def test_benchmark_runs_at_small_size():
    result = main(
        ["--plays", "50", "--rounds", "5", "--d", "3", "--naive-plays", "10", "--repeats", "1"]
    )
    assert result["play_s"] > 0 and result["floor_s"] > 0
