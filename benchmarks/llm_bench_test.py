"""The language-model benchmark runs and reports every measurement (no timing is asserted)."""

from llm_bench import PHASES, main


def test_llm_benchmark_runs_at_small_size():
    result = main(["--plays", "2", "--rounds", "1", "--latency", "0", "--concurrency", "1", "4"])
    assert [r["concurrency"] for r in result["runs"]] == [1, 4]
    for run in result["runs"]:
        # 2 plays: 4 global and 4 local probes each, then 1 round: 18 requests, all stored
        assert run["requests"] == run["stored"] == 18
        assert run["fit_requests"] == 16 and run["play_requests"] == 2
        assert run["wall_s"] > 0 and run["plays_per_s"] > 0 and run["floor_s"] == 0
        assert all(run[f"{name}_s"] >= 0 for name in PHASES)
    assert result["speedup"] > 0
