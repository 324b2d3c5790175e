"""The end-to-end benchmark runs and its play matches its floor (no timing is asserted)."""

from run_bench import main


def test_end_to_end_benchmark_runs_at_small_size():
    result = main(["--seeds", "20"])
    assert result["end_to_end_s"] > result["play_s"] > 0 and result["floor_s"] > 0
