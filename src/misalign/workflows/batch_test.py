"""Tests for misalign.workflows.batch: what a batch keeps (``--record``), chosen by size, and
the batch measured in chunks against the batch recorded whole, through the API and the CLI."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from misalign.api import footprint as footprint_of
from misalign.api import predict, setup, simulate
from misalign.cli import app
from misalign.config import ConfigError, load_config, parse_config
from misalign.model.measure_test import CONFIGS
from misalign.outputs.batch import batch, batch_report
from misalign.outputs.report import to_json
from misalign.runtime import sizes
from misalign.runtime.device_test import torch_device
from misalign.runtime.terminate import EXIT
from misalign.workflows import batch as batch_
from misalign.workflows.batch import Record, choose, stream

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
runner = CliRunner()


@pytest.mark.parametrize(
    "text,record",
    [
        ("all", Record("all", 1)),
        ("last", Record("last", 0)),
        ("every 3", Record("every", 3)),
        ("every=12", Record("every", 12)),
        (" Every:1 ", Record("every", 1)),
    ],
)
def test_records_read_as_written(text, record):
    assert Record.parse(text) == record


@pytest.mark.parametrize("text", ["", "some", "every", "every 0", "every -2", "every 2.5"])
def test_other_records_are_one_line(text):
    with pytest.raises(ConfigError, match="^--record .*: all, last or 'every K' with K >= 1$"):
        Record.parse(text)


def test_the_default_record_follows_the_size():
    """Every output while it fits in ``ALL_BYTES``; then the least ``K`` whose distances fit
    in ``KEPT_BYTES`` (and at most ``RECORDED`` rounds); then nothing per round."""
    config = load_config(EXAMPLES / "two_agents.toml")  # 300 rounds, 2 turns, d = 4
    per_play = 300 * 2 * 4 * 8
    assert choose(config, 1) == Record("all")
    assert choose(config, batch_.ALL_BYTES // per_play) == Record("all")
    assert choose(config, 10**5) == Record("every", 2)  # 300 rounds: at most 200 drawn
    huge = choose(config, 10**7)
    kept = len(batch_.recorded_rounds(300, huge.every)) * 10**7 * 2 * 4
    assert huge.mode == "every" and kept <= batch_.KEPT_BYTES
    fewer = len(batch_.recorded_rounds(300, huge.every - 1)) * 10**7 * 2 * 4
    assert fewer > batch_.KEPT_BYTES
    assert choose(config, 10**9) == Record("last", 0)


def test_plays_that_need_their_outputs_are_recorded_whole():
    attack = load_config(EXAMPLES / "attack.toml")
    assert choose(attack, 10**7) == Record("all")
    with pytest.raises(ConfigError, match=r"^--record every 2: an attack; .* \(all\)$"):
        choose(attack, 10, Record("every", 2))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("record", [Record("every", 1), Record("every", 4), Record("last", 0)])
@pytest.mark.parametrize("workers", [1, 3])
def test_a_batch_in_chunks_is_the_batch_recorded_whole(name, record, workers, monkeypatch):
    """Chunks of 7 plays, played without keeping outputs, on one thread or three (chunks
    ending in any order), give the batch summary of the batch recorded whole, bit for bit
    (its JSON text), and a figure."""
    monkeypatch.setattr(batch_, "CHUNK", 7)
    config = parse_config({"rounds": 40, "seed": 11, **CONFIGS[name]})
    seeds = range(11, 41)
    game = setup(config, seeds=seeds)
    whole = batch(game, predict(game), simulate(game))
    streamed = stream(config, seeds, record, workers=workers)
    assert streamed.workers == workers
    chunked = batch_report(streamed.measured, streamed.seeds, str(record))
    assert chunked.pop("record") == str(record) and whole.pop("record") is None
    assert to_json(chunked) == to_json(whole)
    kept = batch_.recorded_rounds(40, record.every)
    assert list(streamed.measured.recorded) == list(kept)
    first = setup(config)
    assert np.array_equal(simulate(streamed.first).turns, simulate(first).turns)


def _run(tmp_path, *args):
    return runner.invoke(app, ["run", *args, "--out", str(tmp_path / "out"), "--json"])


def test_the_command_keeps_what_it_is_asked_and_reports_the_same(tmp_path):
    config = str(EXAMPLES / "two_agents.toml")
    outputs = {}
    for record in ("all", "every 5", "last"):
        done = _run(tmp_path / record.replace(" ", ""), config, "--seeds", "40", "--record", record)
        assert done.exit_code == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["batch"].pop("record") == record
        assert data["generator"] == "philox4x32-10/box-muller"
        outputs[record] = data
    assert outputs["all"] == outputs["every 5"] == outputs["last"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seeds", "3", "--record", "sometimes"], "--record 'sometimes': all, last or"),
        (["--record", "all"], "--record applies to a batch"),
        (["--seeds", "3", "--workers", "2"], "--workers applies to a batch kept as measurements"),
    ],
)
def test_a_record_that_cannot_apply_is_one_line(tmp_path, args, message):
    done = _run(tmp_path, str(EXAMPLES / "two_agents.toml"), *args)
    assert done.exit_code == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr


def test_an_attack_refuses_to_keep_less_than_everything(tmp_path):
    done = _run(tmp_path, str(EXAMPLES / "attack.toml"), "--seeds", "3", "--record", "last")
    assert done.exit_code == 2 and "an attack; such plays are recorded whole" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_batch_that_cannot_fit_is_refused_before_anything_is_built(monkeypatch):
    config = load_config(EXAMPLES / "two_agents.toml")
    with pytest.raises(ConfigError, match=r"^seeds: a batch of 1,000,000,000 plays needs .* GiB"):
        stream(config, range(10**9), Record("last", 0))


def test_threads_by_default_are_the_cores_the_memory_holds(monkeypatch):
    """Every core, at most one a chunk, while the chunks fit; fewer when the memory holds
    fewer chunks beside the measurements; one at least (``require`` then refuses what one
    chunk cannot fit)."""
    config = load_config(EXAMPLES / "two_agents.toml")
    record = Record("every", 2)
    monkeypatch.setattr(batch_, "cores", lambda: 64)
    monkeypatch.setattr(batch_, "CHUNK", 100)
    assert stream(config, range(300), record).workers == 3  # three chunks
    one = sum(batch_.footprint(config, 10**4, record, 1).values())
    each = sum(batch_.footprint(config, 10**4, record, 2).values()) - one
    monkeypatch.setattr(batch_, "available_memory", lambda: (one + 5.5 * each) / batch_.USABLE)
    assert batch_.threads(config, 10**4, record) == 6
    monkeypatch.setattr(batch_, "available_memory", lambda: one / 2)
    assert batch_.threads(config, 10**4, record) == 1


def test_a_long_play_streams_in_the_memory_of_its_measurements(monkeypatch):
    """A chunk records nothing, so its set-up is sized without its outputs: a batch whose
    chunks could not be recorded whole still streams (it was refused, sized as recorded),
    and its few unsettled plays are replayed in groups that fit."""
    monkeypatch.setattr(batch_, "CHUNK", 50)
    monkeypatch.setattr(batch_, "REPLAYED", 2**20)  # groups of 5 plays of 3000 rounds
    config = load_config(EXAMPLES / "two_agents.toml").model_copy(update={"rounds": 3000})
    record = Record("last", 0)
    recorded = sum(footprint_of(config, 50).values())  # one chunk, every output kept
    need = sum(batch_.footprint(config, 100, record, 1).values())
    assert need < recorded / 2
    room = (need + recorded) / 2 / sizes.USABLE
    monkeypatch.setattr(sizes, "available_memory", lambda: room)
    monkeypatch.setattr(batch_, "available_memory", lambda: room)
    with pytest.raises(ConfigError, match="needs"):  # recorded whole, it does not fit
        setup(config, seeds=range(50))
    streamed = stream(config, range(100), record, workers=1)
    assert (streamed.measured.code >= 0).all() and streamed.measured.rounds == 3000


def test_more_threads_than_chunks_are_charged_for_the_chunks_only():
    """``--workers 64`` on a batch of two chunks runs two at once: the estimate charges two,
    and what the extra chunks cost is named ``--workers``."""
    config = load_config(EXAMPLES / "two_agents.toml")
    record = Record("every", 2)
    two = batch_.footprint(config, 2 * batch_.CHUNK, record, 2)
    assert batch_.footprint(config, 2 * batch_.CHUNK, record, 64) == two
    one = batch_.footprint(config, 2 * batch_.CHUNK, record, 1)
    assert two["--workers"] == sum(v for k, v in one.items() if k not in ("seeds", "rounds"))
    assert "--workers" not in batch_.footprint(config, batch_.CHUNK, record, 64)


@pytest.mark.slow
@pytest.mark.parametrize(("sent", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, EXIT)])
def test_a_signal_stops_a_streamed_batch_on_threads_at_once(tmp_path, sent, code):
    """Ctrl-C or SIGTERM while two chunks play (each about a minute of rounds): the chunks
    stop within a round, nothing is written, nothing is said, exit 130 or 143 (it waited
    for the running chunks to end)."""
    config = tmp_path / "long.toml"
    text = (
        (ROOT / "benchmarks" / "large.toml").read_text().replace("rounds = 100", "rounds = 20000")
    )
    config.write_text(text)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "misalign.cli", "run", str(config), "--seeds", "40000"]
    process = subprocess.Popen(
        [*command, "--workers", "2", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(8)  # start-up, then the first chunks set up and playing
    assert process.poll() is None
    process.send_signal(sent)
    stdout, stderr = process.communicate(timeout=30)
    assert (process.returncode, stdout, stderr) == (code, "", "")
    assert not out.exists()


def test_the_summary_says_how_the_batch_ran(tmp_path):
    done = runner.invoke(
        app,
        ["run", str(EXAMPLES / "two_agents.toml"), "--seeds", "40", "--record", "every 5"]
        + ["--workers", "2", "--out", str(tmp_path / "out")],
    )
    assert done.exit_code == 0, done.stderr
    assert "record every 5: the plays ran in chunks on 1 thread, measured" in done.stdout


def _close(got, want, path="batch"):
    """``got`` is ``want`` with every number within ``1e-12`` of its scale (``max(1, |x|)``),
    every count, flag and text the same."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), path
        for key in want:
            _close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            _close(a, b, f"{path}[{k}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, float | int), path
        same = got == want or (np.isnan(got) and np.isnan(want))
        assert same or abs(got - want) <= 1e-12 * max(1.0, abs(want)), (path, got, want)
    else:
        assert got == want, path


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("record", [Record("every", 3), Record("last", 0)])
@pytest.mark.parametrize("workers", [1, 3])
def test_a_batch_on_torch_is_the_batch_on_numpy(name, record, workers, monkeypatch):
    """``stream(..., device=cpu)`` (set up, played and measured with torch) in chunks of 7
    plays on one thread or three: the batch summary of numpy's, every number within
    ``1e-12`` of its scale and every count the same (the single-precision distances kept
    per round within a float32 rounding)."""
    monkeypatch.setattr(batch_, "CHUNK", 7)  # torch's CPU takes numpy's chunks
    monkeypatch.setattr(batch_, "DEVICE_CHUNK", 7)  # a GPU's (MISALIGN_TEST_DEVICE=cuda)
    config = parse_config({"rounds": 60, "seed": 3, **CONFIGS[name]})
    seeds = range(3, 33)
    want = stream(config, seeds, record)
    on = torch_device()
    got = stream(config, seeds, record, workers=workers, device=on)
    assert (got.device, got.workers, want.device) == (str(on), workers, "numpy")
    for name_, kept in want.measured.distance.items():
        np.testing.assert_allclose(got.measured.distance[name_], kept, rtol=2**-23, atol=0)
    report = json.loads(to_json(batch_report(got.measured, got.seeds, str(record))))
    _close(report, json.loads(to_json(batch_report(want.measured, want.seeds, str(record)))))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--device", "cpu"], "--device applies to a batch (--seeds N with N > 1)"),
        (["--seeds", "3", "--record", "all", "--device", "cpu"], "--device applies to a batch"),
        (["--seeds", "3", "--device", "tpu"], "--device 'tpu': not a device"),
    ],
)
def test_a_device_that_cannot_apply_is_one_line(tmp_path, args, message):
    pytest.importorskip("torch")
    done = _run(tmp_path, str(EXAMPLES / "two_agents.toml"), *args)
    assert done.exit_code == 2 and not (tmp_path / "out").exists()
    assert done.stderr.count("\n") == 1 and message in done.stderr


@pytest.mark.parametrize(
    "example,message",
    [
        ("attack.toml", "--device: an attack; such plays are recorded whole, on numpy"),
        ("helper.toml", "--device: agents.H is a helper; such plays are recorded whole"),
    ],
)
def test_plays_a_device_cannot_play_are_one_line(tmp_path, example, message):
    pytest.importorskip("torch")
    done = _run(tmp_path, str(EXAMPLES / example), "--seeds", "3", "--device", "cpu")
    assert done.exit_code == 2 and done.stderr.count("\n") == 1 and message in done.stderr


def test_the_command_on_torch_reports_numpys_numbers(tmp_path):
    """``run --seeds 40 --device cpu``: the run's JSON is numpy's within ``1e-12``, the
    batch names the device, and the summary says torch played it."""
    where = str(torch_device())
    config = str(EXAMPLES / "two_agents.toml")
    args = ["--seeds", "40", "--record", "every 5", "--workers", "1"]
    on = _run(tmp_path / "torch", config, *args, "--device", where)
    assert on.exit_code == 0, on.stderr
    numpy_ = _run(tmp_path / "numpy", config, *args)
    got, want = json.loads(on.stdout), json.loads(numpy_.stdout)
    assert got["batch"].pop("device") == where and want["batch"].pop("device") == "numpy"
    _close(got, want, "run")
    summary = runner.invoke(app, ["run", config, *args, "--device", where, "--out", str(tmp_path)])
    assert f"ran in chunks on 1 thread with torch on {where}" in summary.stdout


def test_chunks_on_a_gpu_are_as_many_as_its_memory_holds(monkeypatch):
    """By default, fewer chunks at once where the GPU's free memory holds fewer; asked for
    more than fit, or with no room for one, one line naming the device (torch's report of
    free memory stubbed: no GPU here)."""
    torch = pytest.importorskip("torch")
    config = load_config(EXAMPLES / "two_agents.toml")
    every = Record("every", 2)
    one = batch_.device_footprint(config, every, 100)
    gpu = torch.device("cuda", 0)
    for free, asked, expected in [(10 * one, False, 4), (2.5 * one / sizes.USABLE, False, 2)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _, f=free: (f, 8 * f))
        assert batch_._on_gpu(config, every, 100, 4, gpu, asked) == expected
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _: (2.5 * one / sizes.USABLE, 0))
    with pytest.raises(ConfigError, match="^--device cuda:0: 4 chunks .*use fewer --workers$"):
        batch_._on_gpu(config, every, 100, 4, gpu, True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _: (one / 2, 0))
    with pytest.raises(ConfigError, match=r"^--device cuda:0: 1 chunk of 100 plays"):
        batch_._on_gpu(config, every, 100, 4, gpu, False)
    assert batch_._on_gpu(config, every, 100, 4, torch.device("cpu"), True) == 4


def test_a_chunk_on_a_device_takes_about_what_is_estimated():
    """``device_footprint`` of a chunk of ``large.toml`` against the bytes of the tensors its
    game keeps on the device (maps, prompts, preconditioners; torch's CPU build has no count
    of peak device memory, so the draws' temporaries are not measured here): at least those,
    and within 4x of them."""
    torch = pytest.importorskip("torch")
    config = load_config(ROOT / "benchmarks" / "large.toml").model_copy(update={"rounds": 2})
    game = setup(config, seeds=range(2000), device=torch.device("cpu"))
    kept = 0
    for name in game.schedule.agents:
        f, prompt = game.agents[name].affine(), game.prompts[name].batch
        tensors = [f.A, f.c, prompt.X, prompt.y, prompt.target, game.agents[name].gamma]
        kept += sum(t.untyped_storage().nbytes() for t in tensors)
    estimate = batch_.device_footprint(config, Record("every", 1), 2000)
    assert kept <= estimate <= 4 * kept


def test_a_batch_on_a_device_copies_back_only_through_host(monkeypatch):
    """On a GPU a tensor becomes a numpy array only when copied back (``np.asarray`` of a
    CUDA tensor raises): simulated on torch's CPU build by refusing every conversion but
    ``misalign.runtime.device.host``'s, over every test config, the default ``lsa-optimal``
    and ``newton`` preconditioners and a given start."""
    torch = pytest.importorskip("torch")
    from misalign import api
    from misalign.runtime import device

    copying = []
    real_host, real_numpy = device.host, torch.Tensor.numpy

    def host(x):
        copying.append(True)
        try:
            return real_host(x)
        finally:
            copying.pop()

    def numpy_(self, *args, **kwargs):
        if not copying:
            raise TypeError("a device tensor turned into numpy outside device.host")
        return real_numpy(self, *args, **kwargs)

    def array(self, *args, **kwargs):
        raise TypeError("a device tensor turned into numpy implicitly")

    monkeypatch.setattr(device, "host", host)
    monkeypatch.setattr(api, "host", host)
    monkeypatch.setattr(torch.Tensor, "numpy", numpy_)
    monkeypatch.setattr(torch.Tensor, "__array__", array)
    newton = {"d": 3, "start": [1.0, 0.0, -1.0], "agents": {"A": {"n": 4}, "B": {"n": 2}}}
    newton["agents"]["B"]["preconditioner"] = "newton"
    for spec in [*CONFIGS.values(), newton]:
        config = parse_config({"rounds": 12, **spec})
        got = stream(config, range(9), Record("every", 2), device=torch.device("cpu"))
        want = stream(config, range(9), Record("every", 2))
        assert np.array_equal(got.measured.code, want.measured.code)
