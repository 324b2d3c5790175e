"""The design benchmark runs on a small network and its advice is verified (no timing is
asserted)."""

from design_bench import main


def test_design_benchmark_runs_at_small_size():
    (result,) = main(["--agents", "4"])
    assert result["advise_s"] > 0 and result["floor_s"] > 0 and result["verified"]
    assert {"stability", "bias", "checks", "prompt"} <= set(result["stages"])
