"""The sweep benchmark runs at a small size and reports every figure (no timing is asserted)."""

from sweep_bench import main


def test_benchmark_runs_at_small_size():
    result = main(
        ["--points", "6", "--seeds", "2", "--rounds", "5", "--d", "2", "--chunk", "4"]
        + ["--floor-points", "3", "--backends", "one,local"]
    )
    assert set(result["seconds"]) == {"one", "local"}
    assert result["ratio_to_one_process"]["one"] == 1.0
    assert result["end_to_end_per_play_s"] > 0
    assert set(result["end_to_end_over_bare"]) == {"per_point_batch", "one_batch"}
