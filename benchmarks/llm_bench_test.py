"""The language-model benchmark runs and reports every measurement (no timing is asserted)."""

import pytest
from llm_bench import PHASES, main

from misalign.config import ConfigError
from misalign.llm.serve import check_installed


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


def _missing() -> str | None:
    try:
        check_installed()
    except ConfigError as error:
        return str(error)
    return None


MISSING = _missing()


@pytest.mark.local_llm
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_the_local_benchmark_runs_one_play_with_one_and_two_workers():
    result = main(["--local", "--plays", "1", "--rounds", "1", "--workers", "2"])
    pairs = [(r["workers"], r["concurrency"]) for r in result["runs"]]
    assert pairs == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert result["identical"] and set(result["speedups"]) == {"1x1", "1x2", "2x1", "2x2"}
    for run in result["runs"]:
        assert run["requests"] >= 9 and run["stored"] >= 9 and run["failed"] == 0
        assert run["build"].startswith("llama-cpp-python ") and run["answer_s"] > 0
