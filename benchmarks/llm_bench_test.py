"""The language-model benchmark runs and reports every measurement (no timing is asserted)."""

from llm_bench import PHASES, main


def test_llm_benchmark_runs_at_small_size():
    result = main(["--plays", "2", "--rounds", "1", "--latency", "0", "--concurrency", "1", "4"])
    assert [r["concurrency"] for r in result["runs"]] == [1, 4]
    for run in result["runs"]:
        # 2 plays: 4 global probes and the check of the prediction (it holds: the server is
        # affine, so no local refit) each, then 1 round: 12 requests, all stored
        assert run["requests"] == run["stored"] == 12
        assert run["fit_requests"] == 10 and run["play_requests"] == 2
        assert run["wall_s"] > 0 and run["plays_per_s"] > 0 and run["floor_s"] == 0
        assert all(run[f"{name}_s"] >= 0 for name in PHASES)
    assert result["speedup"] > 0
