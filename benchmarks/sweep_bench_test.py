"""The sweep benchmark runs at a small size and reports every figure (no timing is asserted)."""

from sweep_bench import main


def test_benchmark_runs_at_small_size():
    result = main(
        ["--points", "6", "--seeds", "2", "--rounds", "5", "--d", "2", "--chunk", "4"]
        + ["--floor-points", "3", "--backends", "one,local"]
        + ["--batch", "40", "--batch-d", "3", "--batch-rounds", "5", "--repeats", "2"]
    )
    assert set(result["seconds"]) == {"one", "local"}
    assert result["ratio_to_one_process"]["one"] == 1.0
    assert result["end_to_end_per_play_s"] > 0
    assert set(result["end_to_end_over_bare"]) == {"per_point_batch", "one_batch"}
    batch = result["batch"]
    assert batch["plays"] == 40 and batch["repeats"] == 2
    for key in ("setup_us", "simulate_us", "predict_us", "bare_loop_us"):
        assert 0 < batch[key] <= batch["first_run"][key]
    assert batch["total_us"] == batch["setup_us"] + batch["simulate_us"] + batch["predict_us"]
    assert batch["total_over_simulate"] > 1 and batch["total_over_bare_loop"] > 1
