"""The end-to-end benchmark runs at a small size, in both of run's ways of keeping a batch,
and reports its floor and peak memory (no timing is asserted)."""

from run_bench import ROOT, main

from misalign.workflows import batch


def test_end_to_end_benchmark_runs_at_small_size(monkeypatch):
    (recorded,) = main(["--seeds", "20"])
    assert recorded["record"] == "all"
    monkeypatch.setattr(batch, "ALL_BYTES", 0)  # in-process only: the child keeps all
    monkeypatch.setattr(batch, "CHUNK", 8)  # three chunks, two at once
    monkeypatch.setattr(batch, "cores", lambda: 2)
    (streamed,) = main(["--seeds", "20", "--config", str(ROOT / "benchmarks" / "large.toml")])
    assert streamed["record"].startswith("every") and streamed["threads"] == 2
    assert recorded["threads"] == 1 and recorded["floor_s"] == recorded["floor_one_thread_s"]
    for result in (recorded, streamed):
        assert result["end_to_end_s"] > result["play_s"] > 0 and result["floor_s"] > 0
        assert result["floor_one_thread_s"] > 0
        assert 0 < result["peak_gib"] < 4
        assert result["fixed_s"] > 0 and result["rest_over_floor"] == (
            (result["end_to_end_s"] - result["fixed_s"]) / result["floor_s"]
        )


def test_the_benchmark_on_a_torch_device_runs_the_command_with_it(monkeypatch):
    """``--device cpu``: the command with ``--device cpu`` (streamed even when small) against
    the bare loop of the same maps as torch tensors."""
    import pytest

    pytest.importorskip("torch")
    monkeypatch.setattr(batch, "CHUNK", 8)
    (result,) = main(["--seeds", "20", "--device", "cpu"])
    assert result["device"] == "cpu" and result["record"].startswith("every")
    assert result["end_to_end_s"] > result["play_s"] > 0 and result["floor_s"] > 0
    assert result["fixed_s"] > 0
