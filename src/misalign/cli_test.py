"""Tests for misalign.cli: exit codes, one-line errors, JSON on stdout, artifacts."""

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from misalign.api import predict, setup
from misalign.cli import app, main
from misalign.cli.attacks import ATTACK_COLUMNS
from misalign.config import load_config
from misalign.llm.fake_server import FakeServer, Reply, affine, constant, estimate_of

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
runner = CliRunner()

GOOD = """seed = 1
d = 2
rounds = 40
[agents.A]
n = 4
[agents.B]
n = 5
preconditioner = "identity"
eta = 0.5
"""


def _invoke(tmp_path, *args):
    return runner.invoke(app, [*args, "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("command", ["run", "theory"])
def test_json_is_one_object_on_stdout(tmp_path, command):
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    result = _invoke(tmp_path, command, str(config), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"agents", "prediction", "config", "config_hash"} <= set(data)
    assert ("outputs" in data) == (command == "run") == ("distance" in data)
    written = json.loads((tmp_path / "out" / f"{command}.json").read_text())
    assert written == data
    assert (tmp_path / "out" / "config.toml").exists()
    assert (tmp_path / "out" / "trajectory.png").exists() == (command == "run")


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_examples_run(tmp_path, example, monkeypatch):
    """Every example runs. A language-model example replays its shipped store where there is
    one (and leaves it untouched), else plays against the fake server of an affine map."""
    path, extra = EXAMPLES / example, []
    llm = [n for n, a in load_config(path).agents.items() if a.kind == "llm"]
    shipped = path.with_suffix(".sqlite")
    if llm and shipped.exists():
        before = sorted(p.name for p in EXAMPLES.iterdir()), shipped.read_bytes()
        extra = ["--replay", "--store", str(shipped)]
    elif llm:
        d = load_config(path).d
        server = FakeServer(affine(0.5 * np.eye(d), np.ones(d))).start()
        monkeypatch.setenv("MISALIGN_FAKE_KEY", "sk-fake")
        extra = ["--store", str(tmp_path / "s.sqlite"), "--allow-host", "127.0.0.1"]
        for name in llm:
            extra += ["--set", f"agents.{name}.base_url='{server.base_url}'"]
            extra += ["--set", f"agents.{name}.api_key_env='MISALIGN_FAKE_KEY'"]
    try:
        result = _invoke(tmp_path, "run", str(path), *extra)
    finally:
        if llm and not shipped.exists():
            server.stop()
    assert result.exit_code == 0, result.stderr
    assert "rho" in result.stdout and "nan" not in result.stdout.lower()
    if llm and shipped.exists():
        assert (sorted(p.name for p in EXAMPLES.iterdir()), shipped.read_bytes()) == before
        assert "0 requests" in result.stdout


def test_divergent_play_is_reported_not_an_error(tmp_path):
    result = _invoke(tmp_path, "run", str(EXAMPLES / "diverging.toml"))
    assert result.exit_code == 0 and "diverges (rho = " in result.stdout
    data = json.loads(_invoke(tmp_path, "run", str(EXAMPLES / "diverging.toml"), "--json").stdout)
    assert data["prediction"]["converges"] is False and data["prediction"]["A"] is None
    assert data["prediction"]["rho"] > 1
    assert data["diverged_at"] == len(data["outputs"]["A"])


EXACT_AND_SLOW = """seed = 0
d = 1
rounds = 5
schedule = ["A", "B", "C"]
[agents.A]
n = 4
preconditioner = "newton"
reads = "C"
[agents.B]
n = 4
preconditioner = "identity"
eta = 0.1
reads = "C"
[agents.C]
n = 4
preconditioner = "identity"
eta = 0.1
reads = "B"
"""


def test_the_agent_named_farthest_from_the_prediction_is_not_one_at_gap_zero(tmp_path):
    """A (a Newton step, d = 1) ends exactly on its limit (gap 0.0); B and C, slow, do not
    within 5 rounds: the summary names the farthest of them, never A."""
    config = tmp_path / "c.toml"
    config.write_text(EXACT_AND_SLOW)
    data = json.loads(_invoke(tmp_path, "run", str(config), "--json").stdout)
    gap = data["agreement"]["gap"]
    assert data["agreement"]["holds"] is False and gap["A"] == 0.0
    farthest = max(("B", "C"), key=gap.get)
    result = _invoke(tmp_path, "run", str(config))
    assert result.exit_code == 0, result.stderr
    assert f"prediction ({farthest}: {gap[farthest]:.3g} from it after 5 rounds)" in result.stdout


@pytest.mark.parametrize(
    "text,field",
    [
        (GOOD.replace("n = 4", "n = 0"), "agents.A.n"),
        (GOOD.replace("d = 2", "d = 0"), "d:"),
        (GOOD + "spectrum = [1.0]\n", "agents.B.spectrum"),
        (GOOD + "spectrum = [1.0, -2.0]\n", "agents.B.spectrum"),
        (GOOD + "target = [1.0, 2.0, 3.0]\n", "agents.B.target"),
        (GOOD + "target = [1.0, nan]\n", "agents.B.target"),
        (GOOD + "eta2 = 1\n", "agents.B.eta2: unknown key"),
        (GOOD.replace("n = 5", 'n = 5\nkind = "oracle"'), "agents.B.kind"),
        ('schedule = ["A", "C"]\n' + GOOD, "schedule: names no agent: 'C'"),
        (GOOD.replace("rounds = 40", "rounds = inf"), "rounds"),
        ("d = [", "invalid TOML"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, text, field):
    config = tmp_path / "c.toml"
    config.write_text(text)
    for command in ("run", "theory"):
        result = _invoke(tmp_path, command, str(config), "--json")
        assert result.exit_code == 2
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and field in lines[0] and lines[0].startswith("misalign: error:")


def test_missing_file_and_bad_override(tmp_path):
    result = _invoke(tmp_path, "run", str(tmp_path / "nope.toml"))
    assert result.exit_code == 2 and "no such file" in result.stderr
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    result = _invoke(tmp_path, "theory", str(config), "--set", "agents.A.eta=-1")
    assert result.exit_code == 2 and result.stderr.startswith("misalign: error: agents.A.eta:")


def test_existing_artifacts_survive_a_bad_run(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    assert _invoke(tmp_path, "run", str(config)).exit_code == 0
    before = (tmp_path / "out" / "run.json").read_bytes()
    assert _invoke(tmp_path, "run", str(config), "--set", "d=0").exit_code == 2
    assert (tmp_path / "out" / "run.json").read_bytes() == before


def test_real_process_help_and_error_without_traceback(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "run" in help_text.stdout and "theory" in help_text.stdout
    config = tmp_path / "c.toml"
    config.write_text(GOOD + "noise = -1\n")
    bad = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "run", str(config)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip()
        == "misalign: error: agents.B.noise: input should be greater than or equal to 0 (got -1)"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["run"], "Missing argument 'CONFIG'"),
        (["run", "a.toml", "--bogus"], "No such option: --bogus"),
        (["frob"], "No such command 'frob'"),
        (["attacks", "a.toml", "--seeds", "1"], "--seeds"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    done = subprocess.run(
        [sys.executable, "-m", "misalign.cli", *args], capture_output=True, text=True
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_each_attack_is_one_sided_in_the_summary_and_json(tmp_path):
    for method in ('"decoy"', '"geometry"', '"per-turn"'):
        args = ["run", str(EXAMPLES / "attack.toml"), "--set", f"attack.method={method}"]
        text = _invoke(tmp_path, *args)
        assert text.exit_code == 0 and "one-sided: B ends exactly on target" in text.stdout
        data = json.loads(_invoke(tmp_path, *args, "--json").stdout)
        assert data["distance"]["B"] < 1e-8 and data["prediction"]["one_sided"] == "B"
        assert data["distance"]["A"] == pytest.approx(data["prediction"]["distance"]["A"])


def test_an_infeasible_attack_exits_2(tmp_path):
    args = ["run", str(EXAMPLES / "attack.toml"), "--set", "agents.B.n=2"]
    result = _invoke(tmp_path, *args)
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "misalign: error: attack.method: decoy needs an invertible H_B, "
        "got a singular one (n = 2 < d = 4)"
    )


def test_attack_study_command(tmp_path):
    args = ["attacks", str(EXAMPLES / "attack.toml"), "--seeds", "10", "--set", "rounds=40"]
    result = _invoke(tmp_path, *args, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["rows"]) == 20 and data["seeds"] == 10
    assert (tmp_path / "out" / "attacks.png").exists()
    table = _invoke(tmp_path, *args)
    assert "ROC AUC" in table.stdout


def test_old_study_commands_are_aliases_of_reproduce(tmp_path):
    """helper-study and lsa-study run the registry's helper and lsa entries."""
    for command, name in (("helper-study", "helper"), ("lsa-study", "lsa")):
        out = tmp_path / name
        result = runner.invoke(
            app, [command, "--quick", "--seeds", "2", "--out", str(out), "--json"]
        )
        assert result.exit_code == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["experiment"] == name and data["passed"] is True
        assert data["claims"] == json.loads((out / "claims.json").read_text())
        assert json.loads((out / "config.json").read_text())["experiment"] == name
    bad = _invoke(tmp_path, "helper-study", "--dims", "2")
    assert bad.exit_code == 2 and "No such option: --dims" in bad.stderr


def test_training_example_runs(tmp_path):
    args = ["train", str(EXAMPLES / "training" / "lsa_d5.toml"), "--set", "steps=20", "--json"]
    result = _invoke(tmp_path, *args, "--set", "eval_every=10", "--set", "eval_batch=1000")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["steps_run"] == 20 and len(data["history"]) == 2
    assert (tmp_path / "out" / "checkpoint.pt").exists()
    bad = _invoke(tmp_path, "train", str(EXAMPLES / "training" / "lsa_d5.toml"), "--set", "lr=0")
    assert bad.exit_code == 2 and bad.stderr.startswith("misalign: error: lr:")


def test_training_divergence_exits_1_with_one_line(tmp_path):
    args = ["train", str(EXAMPLES / "training" / "lsa_d5.toml"), "--set", "lr=1e30"]
    result = _invoke(tmp_path, *args)
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("misalign: error: training diverged at step")
    )


def test_lsa_play_example_against_a_trained_checkpoint(tmp_path):
    train = ["train", str(EXAMPLES / "training" / "lsa_d5.toml"), "--set", "steps=200"]
    assert runner.invoke(app, [*train, "--out", str(tmp_path / "lsa")]).exit_code == 0
    checkpoint = f'agents.{{}}.checkpoint="{tmp_path / "lsa" / "checkpoint.pt"}"'
    args = ["run", str(EXAMPLES / "training" / "lsa_play.toml"), "--json"]
    args += ["--set", checkpoint.format("A"), "--set", checkpoint.format("B")]
    result = _invoke(tmp_path, *args)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    for name in ("A", "B"):
        assert data["distance"][name] == pytest.approx(
            data["prediction"]["distance"][name], rel=1e-6
        )
    wrong_d = _invoke(
        tmp_path,
        *args,
        "--set",
        "d=4",
        "--set",
        "agents.A.target=[1,0,0,0]",
        "--set",
        "agents.B.target=[0,1,0,0]",
    )
    assert wrong_d.exit_code == 2 and "trained for d = 5, the play has d = 4" in wrong_d.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["attacks", str(EXAMPLES / "helper.toml")], "attack study needs a two-agent play"),
    ],
)
def test_study_inputs_are_checked(tmp_path, args, message):
    result = _invoke(tmp_path, *args)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_attack_study_needs_gd_agents(tmp_path):
    config = tmp_path / "lsa.toml"
    config.write_text(
        'd = 2\nrounds = 5\n[agents.A]\nkind = "lsa"\ncheckpoint = "x.pt"\nn = 3\n'
        "[agents.B]\nn = 3\n"
    )
    result = _invoke(tmp_path, "attacks", str(config))
    assert result.exit_code == 2 and "needs two gd agents (got gd, lsa)" in result.stderr


def test_a_foreign_torch_file_is_one_clean_line(tmp_path):
    import torch

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    args = ["run", str(EXAMPLES / "training" / "lsa_play.toml")]
    result = _invoke(tmp_path, *args, "--set", f'agents.A.checkpoint="{tmp_path / "tensor.pt"}"')
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1
    assert lines[0].endswith("not a misalign checkpoint (TypeError)")


MIXED = """seed = 0
d = 2
rounds = 200
[agents.A]
n = 4
preconditioner = "identity"
eta = 2.0
[agents.B]
n = 5
"""


def _process(*args, timeout=120):
    """The real command in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "misalign.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _strict_json(text):
    """JSON that has no NaN or Infinity (Python's json accepts them unless told not to)."""

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_run_over_seeds_tells_one_story_in_text_json_and_figure(tmp_path):
    """A batch where some seeds diverge: the summary, the JSON and the figure agree on which
    plays converge, and the converging plays' quantiles are those of the per-seed values."""
    config = tmp_path / "c.toml"
    config.write_text(MIXED)
    out = tmp_path / "out"
    result = _process("run", str(config), "--seeds", "20", "--json", "--out", str(out))
    assert result.returncode == 0, result.stderr
    batch = _strict_json(result.stdout)["batch"]
    rho = np.array(batch["rho"]["per_seed"])
    assert batch["seeds"] == list(range(20)) and 0 < batch["converging"] < 20
    diverging = [s for s, r in zip(batch["seeds"], rho, strict=True) if r >= 1]
    assert batch["diverging_seeds"] == diverging and batch["converging"] == 20 - len(diverging)
    for row in batch["distance"].values():
        simulated = np.array([x for x in row["simulated"] if x is not None])
        assert len(simulated) == batch["converging"]
        assert row["simulated_median"] == pytest.approx(np.median(simulated))
        assert row["simulated_q90"] == pytest.approx(np.quantile(simulated, 0.9))
    alone = _strict_json(
        _process("run", str(config), "--set", "seed=4", "--json", "--out", str(tmp_path)).stdout
    )
    play = batch["seeds"].index(4)
    if 4 not in diverging:
        assert batch["distance"]["A"]["simulated"][play] == alone["distance"]["A"]
    title = Image.open(out / "trajectory.png").text["Description"]
    good = batch["converging"]
    assert f"{good} of 20 plays converge" in title and f"{len(diverging)} diverge" in title
    assert "diverges (rho" not in title and "rho over 20 plays" in title
    text = _process("run", str(config), "--seeds", "20", "--out", str(out)).stdout
    assert f"20 plays (seeds 0..19): {good} predicted to converge" in text
    assert f"{len(diverging)} without a predicted limit" in text
    assert ", ".join(map(str, diverging[:3])) in text
    counts = batch["observed"]["counts"]
    assert (
        sum(counts.values()) == 20 and f"observed: {counts['fixed point']} at a fixed point" in text
    )
    assert "converges (rho" not in text  # no single-seed headline in a batch's story


@pytest.mark.parametrize(
    "override,field",
    [
        ("agents.A.target=[1e300, 0, 0, 0]", "agents.A.target.0"),
        ("agents.A.noise=1e308", "agents.A.noise"),
        ("agents.A.sampling_std=1e200", "agents.A.sampling_std"),
        ("agents.A.eta=1e-320", "agents.A.eta"),
        ("agents.A.steps_per_turn=1000", "agents.A"),  # in range, but the map overflows
    ],
)
def test_inputs_that_overflow_are_one_line_and_exit_2(tmp_path, override, field):
    extra = ["--set", "agents.A.preconditioner=identity", "--set", "agents.A.eta=1e3"]
    extra = extra if "steps_per_turn" in override else []
    for command in ("run", "theory"):
        args = [command, str(EXAMPLES / "two_agents.toml"), "--set", override, *extra, "--json"]
        result = _process(*args, "--out", str(tmp_path))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert len(lines) == 1 and lines[0].startswith(f"misalign: error: {field}"), lines


def test_a_play_that_overflows_inside_the_arithmetic_is_sound_json(tmp_path):
    """In-range inputs whose play overflows: strict JSON, the divergence stated."""
    args = ["run", str(EXAMPLES / "two_agents.toml"), "--json", "--out", str(tmp_path)]
    args += ["--set", "agents.A.preconditioner=identity", "--set", "agents.A.eta=1e30"]
    args += ["--set", "agents.A.sampling_std=1e30"]
    result = _process(*args)
    assert result.returncode == 0 and result.stderr == ""
    data = _strict_json(result.stdout)
    assert data["prediction"]["converges"] is False and data["diverged_at"] is not None
    text = _process(*[a for a in args if a != "--json"]).stdout
    assert "diverges" in text and "nan" not in text.lower() and "inf" not in text.lower()


@pytest.mark.parametrize(
    "args,field",
    [
        (["run", "two_agents.toml", "--seeds", "10000000000"], "seeds: a batch of 10,000,000,000"),
        (["run", "attack.toml", "--seeds", "10000000"], "seeds: a batch of 10000000 plays"),
        (["attacks", "attack.toml", "--seeds", "10000000"], "seeds: a batch of 10000000 plays"),
        (["run", "two_agents.toml", "--set", "agents.A.n=100000000"], "agents.A.n: the play"),
        (["run", "two_agents.toml", "--set", "rounds=1000000000"], "rounds: the play needs"),
        (["theory", "GOOD", "--set", "d=100000"], "d: the play needs"),
    ],
)
def test_sizes_that_cannot_fit_are_refused_at_once(tmp_path, args, field):
    command, example, *rest = args
    config = EXAMPLES / example
    if example == "GOOD":  # no spectrum or target, so that d alone can grow
        config = tmp_path / "good.toml"
        config.write_text(GOOD)
    started = time.perf_counter()
    result = _process(command, str(config), *rest, "--out", str(tmp_path), timeout=60)
    seconds = time.perf_counter() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"misalign: error: {field}") and "GiB available" in lines[0]
    assert seconds < 10  # refused before allocating: no build-up of prompts or outputs


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "agents.Z.n=3"], "--set agents.Z.n: no agent 'Z' (agents: A, B)"),
        (["--set", "agents.b.n=12"], "--set agents.b.n: no agent 'b'; did you mean 'B'?"),
        (["--set", "agents.A.n=true"], "agents.A.n: input should be a valid integer"),
        (["--set", 'agents.A.n="12"'], "agents.A.n: input should be a valid integer"),
    ],
)
def test_typos_and_wrong_types_are_refused(tmp_path, args, message):
    result = _process("run", str(EXAMPLES / "two_agents.toml"), *args, "--out", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(f"misalign: error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


_HUGE = st.sampled_from([1e300, -1e308, 1e30, -1e30, 1e29, 1e-320, 5e-324, 0.0, -1.0, 1e-30])
_SIZES = st.sampled_from([0, -1, 1, 3, 10**9, 10**12, 2**63, 10**100])
_OVERRIDES = st.one_of(
    st.tuples(st.sampled_from(["d", "rounds", "agents.A.n", "agents.B.n", "seed"]), _SIZES),
    st.tuples(st.sampled_from(["agents.A.steps_per_turn", "agents.B.steps_per_turn"]), _SIZES),
    st.tuples(
        st.sampled_from(
            ["agents.A.eta", "agents.A.noise", "agents.B.sampling_std", "agents.A.probe_scale"]
        ),
        _HUGE,
    ),
    st.tuples(
        st.sampled_from(["agents.A.target", "agents.B.spectrum", "start"]),
        st.lists(_HUGE, min_size=2, max_size=2),
    ),
    st.tuples(st.just("agents.B.preconditioner"), st.sampled_from(["identity", "newton"])),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    overrides=st.lists(_OVERRIDES, min_size=1, max_size=4),
    command=st.sampled_from(["run", "theory"]),
    seeds=st.sampled_from([1, 3, 10**8, 10**9]),
)
def test_fuzz_values_that_overflow_and_sizes_that_cannot_fit(
    tmp_path_factory, overrides, command, seeds
):
    """Whatever the values and sizes: exit 0 with strict JSON, or exit 2 with one line; never
    a traceback, another exit code, or a run of more than a few seconds."""
    config = tmp_path_factory.mktemp("fuzz") / "c.toml"
    config.write_text(GOOD)
    argv = [command, str(config), "--json", "--out", str(config.parent / "out")]
    argv += [f"--set={key}={json.dumps(value)}" for key, value in overrides]
    if command == "run":
        argv += ["--seeds", str(seeds)]
    stdout, stderr = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with (
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        pytest.raises(SystemExit) as exit_,
    ):
        main(argv)
    assert time.perf_counter() - started < 10
    if exit_.value.code == 0:
        _strict_json(stdout.getvalue())
        assert stderr.getvalue() == ""
    else:
        lines = stderr.getvalue().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("misalign: error:")


def test_documented_attack_table_has_the_columns_the_cli_prints():
    page = (EXAMPLES.parent / "docs" / "attacks.md").read_text()
    header = next(line for line in page.splitlines() if line.startswith("| attack | defence"))
    assert tuple(cell.strip() for cell in header.strip("|").split("|")) == ATTACK_COLUMNS


def test_train_help_and_theory_artifacts_are_as_documented(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    assert _process("theory", str(config), "--out", str(tmp_path / "t")).returncode == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["config.toml", "theory.json"]
    page = (EXAMPLES.parent / "docs" / "cli.md").read_text()
    assert "`theory` predicts only and writes\n`config.toml` and `theory.json`" in page


def test_long_steps_show_progress_on_a_terminal(tmp_path):
    """On a terminal (a real pty for stderr), a large batch shows a bar while its prompts are
    sampled and the play runs, and spinners name the prediction and the writing; the JSON on
    stdout stays clean."""
    import os
    import pty

    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    master, slave = pty.openpty()
    args = ["run", str(config), "--seeds", "3000", "--json", "--out", str(tmp_path / "o")]
    stdout_file = (tmp_path / "stdout.json").open("w+b")  # a file: a full pipe would block
    child = subprocess.Popen(
        [sys.executable, "-m", "misalign.cli", *args],
        stdout=stdout_file,
        stderr=slave,
        stdin=subprocess.DEVNULL,
    )
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the pty
            break
        if not chunk:
            break
        shown += chunk
    assert child.wait(timeout=120) == 0
    os.close(master)
    stdout_file.seek(0)
    stdout = stdout_file.read().decode()
    stdout_file.close()
    text = shown.decode(errors="replace")
    for step in ("prompts", "play", "predicting: 4 x 4 round map of 3000 plays", "writing"):
        assert step in text, step
    assert _strict_json(stdout)["batch"]["plays"] == 3000


def test_attack_summary_names_probe_turns_only_for_the_gray_box(tmp_path):
    white = _process("run", str(EXAMPLES / "attack.toml"), "--out", str(tmp_path)).stdout
    assert "attack: B attacks the agent it reads\n" in white and "None" not in white
    args = ["--set", "attack.knowledge=gray-box", "--set", "attack.probe_turns=10"]
    gray = _process("run", str(EXAMPLES / "attack.toml"), *args, "--out", str(tmp_path)).stdout
    assert "attack: B attacks the agent it reads after 10 probe turns" in gray


def test_a_model_that_never_answers_with_numbers_is_reported_not_crashed(tmp_path):
    """Every answer is prose: the fit fails, the play fails at round 0, and the run says so
    (no prediction, which agent failed) and strict JSON, never 'diverges' or 'overflowed';
    nothing succeeded, so it exits 1 with one line saying so (its files are written)."""
    with FakeServer(constant("I cannot say.")) as server:
        config = tmp_path / "c.toml"
        config.write_text(
            GOOD.replace("[agents.A]\n", "[agents.A]\nkind = 'llm'\nmodel = 'fake'\n")
        )
        overrides = [
            f"agents.A.base_url='{server.base_url}'",
            "agents.A.api_key_env=''",
            "agents.A.max_retries=0",
        ]
        args = [arg for o in overrides for arg in ("--set", o)]
        store = ["--store", str(tmp_path / "s.sqlite")]
        text = _invoke(tmp_path, "run", str(config), *args, *store)
        as_json = _invoke(tmp_path, "run", str(config), *args, *store, "--json")
    for done in (text, as_json):
        assert done.exit_code == 1 and done.stderr.startswith("misalign: every play failed")
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert (tmp_path / "out" / "run.json").exists()
    assert "no prediction: the fit of A failed" in text.stdout
    assert "observed: failed at round 0: A gave no answer" in text.stdout
    assert "diverges" not in text.stdout and "overflowed" not in text.stdout
    data = json.loads(as_json.stdout, parse_constant=lambda c: pytest.fail(c))
    assert data["prediction"]["rho"] is None and data["fit"]["A"]["global"]["A"][0] == [None] * 2
    assert {f["seed"] for f in data["llm"]["failed"]} == {data["config"]["seed"]}


def test_counts_of_one_are_singular_and_the_help_names_the_extra(tmp_path):
    """One refit, one agent, one play of two converging and one diverging: "1 refit", "got 1
    agent", "1 at a fixed point", "1 growing" (never "1 refits", "1 agents"); and
    `serve --help` names the extra it needs, '.[local]' (the help's markup dropped "[local]")."""
    config = tmp_path / "c.toml"
    config.write_text(
        GOOD.replace("[agents.A]\n", "[agents.A]\nkind = 'llm'\nmodel = 'fake'\nrefits = 1\n")
    )

    def curved(body, index):  # not affine: the global prediction is refitted once
        w = estimate_of(body, 2)
        return Reply(content=json.dumps({"estimate": (0.8 * np.tanh(2 * w) + 1).tolist()}))

    with FakeServer(curved) as server:
        overrides = [f"agents.A.base_url='{server.base_url}'", "agents.A.api_key_env=''"]
        args = [arg for o in overrides for arg in ("--set", o)]
        result = _invoke(tmp_path, "run", str(config), *args, "--store", str(tmp_path / "s"))
    assert result.exit_code == 0, result.stderr
    assert "local (1 refit)" in result.stdout and "1 refits" not in result.stdout
    lone = tmp_path / "lone.toml"
    lone.write_text("d = 2\nrounds = 5\n[agents.A]\nn = 4\n")
    refused = _process("attacks", str(lone), "--out", str(tmp_path / "a"))
    assert refused.returncode == 2
    assert refused.stderr.endswith("needs a two-agent play (got 1 agent)\n")
    assert refused.stderr.count("\n") == 1
    help_text = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        env=os.environ | {"COLUMNS": "200"},
    ).stdout
    assert "needs pip install '.[local]'." in help_text
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(MIXED)
    # Seeds 0 and 1 of MIXED: one converges and one diverges (the counts of one this checks
    # need a pair of draws like that; with the counter-based generator seed 0 diverges, rho
    # 1.29, and seed 1 converges, rho 0.28). Which one is named comes from the theory.
    rho = predict(setup(load_config(mixed), seeds=[0, 1])).rho
    assert (rho >= 1).sum() == 1, rho
    diverging = int(np.argmax(rho >= 1))
    batch = _invoke(tmp_path, "run", str(mixed), "--seeds", "2").stdout
    assert "2 plays (seeds 0..1): 1 predicted to converge; " in batch
    assert "observed: 1 at a fixed point, 1 growing " in batch
    listed = (
        f"1 without a predicted limit (rho >= 1, or outputs that overflowed): seeds {diverging}"
    )
    assert listed in batch


MARKUP = ("[/bold]", "[link=http://x]y[/link]", "[bold red]", "[/]", "[on #000000]", ":smile:")
"""Answers that Rich would read as markup (a closing tag that matches none raises its
``MarkupError``) or as an emoji code."""


def _markup_answers(body, index):
    """The k-th request gets the k-th of ``MARKUP``, round and round: never numbers."""
    return Reply(content=f"no numbers {MARKUP[index % len(MARKUP)]} here")


def test_answers_and_paths_that_look_like_markup_print_literally_live_and_on_replay(tmp_path):
    """A model whose answers are Rich markup fails every probe and the play; the real command
    prints each answer in its failure lines as written (and the --out path holding tags too),
    exits 1 as a model answering prose does (nothing succeeded), and so does --replay of the
    store it wrote."""
    config, store = tmp_path / "c.toml", tmp_path / "s.sqlite"
    config.write_text(GOOD.replace("[agents.A]\n", "[agents.A]\nkind = 'llm'\nmodel = 'fake'\n"))
    out = tmp_path / "[bold red]out[on #000000]"
    with FakeServer(_markup_answers) as server:
        overrides = [f"agents.A.base_url='{server.base_url}'", "agents.A.api_key_env=''"]
        overrides += ["agents.A.max_retries=0", "agents.A.probes=5"]
        args = [str(config), "--store", str(store), "--out", str(out)]
        args += [arg for o in overrides for arg in ("--set", o)]
        live = _process("run", *args)
        asked = len(server.requests)
    replay = _process("run", *args, "--replay")
    assert asked == 6  # five probes and the play's first turn: each payload once
    for result in (live, replay):
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        text = " ".join(result.stdout.split())  # long failure lines wrap at 160 columns
        assert text.count("failed: agent A, seed 1,") == 6
        for payload in MARKUP:
            assert f"last answer: 'no numbers {payload} here'" in text, payload
        assert f"artifacts: {out} (figure trajectory.png)" in text


def test_a_network_summary_says_who_feeds_back_and_the_distance_to_pooled_least_squares(
    tmp_path,
):
    """Three or more agents, simultaneous rounds or weighted reads: the table gains each
    limit's distance to the pooled least-squares solution, from the JSON report's network."""
    debate = str(EXAMPLES / "debate.toml")
    text = _invoke(tmp_path, "theory", debate)
    data = json.loads(_invoke(tmp_path, "theory", debate, "--json").stdout)
    assert text.exit_code == 0, text.stderr
    assert "limit to pooled LS" in text.stdout
    assert "feed back are A, B, C, D, E" in text.stdout
    assert f"{data['network']['spread']:.3g}" in text.stdout
    two = _invoke(tmp_path, "theory", str(EXAMPLES / "two_agents.toml"))
    assert two.exit_code == 0 and "pooled" not in two.stdout and "network:" not in two.stdout


# --- language-model options checked before anything is written (issue 21 item 10) ----------

LLM = EXAMPLES / "local_llm.toml"
"""A play with a language-model agent (20 rounds, its server on 127.0.0.1:8765, no key)."""


def _refused(done, starts: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr that starts by naming the option."""
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith(f"misalign: error: {starts}") and done.stderr.count("\n") == 1


def _nothing_written(tmp_path: Path) -> None:
    """No run directory and no store in ``tmp_path``."""
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".toml") == []


@pytest.mark.parametrize(
    ("args", "starts"),
    [
        (["run", LLM, "--fork-at", "50"], "--fork-at 50: must be from 1 to rounds = 20 (the "),
        (["run", EXAMPLES / "two_agents.toml", "--fork-at", "3"], "--fork-at: applies to "),
        (["run", EXAMPLES / "two_agents.toml", "--replay"], "--replay: applies to "),
        (["theory", EXAMPLES / "two_agents.toml", "--replay"], "--replay: applies to "),
        (["run", EXAMPLES / "two_agents.toml", "--refresh"], "--refresh: applies to "),
    ],
    ids=["fork past the last round", "fork", "replay", "theory replay", "refresh"],
)
def test_language_model_flags_that_cannot_apply_are_refused(tmp_path, args, starts):
    """Issue 21: `--fork-at 50` with 20 rounds, and `--fork-at` or `--replay` on a play with
    no language-model agent, were accepted silently."""
    done = _process(*args, "--store", tmp_path / "s.sqlite", "--out", tmp_path / "out")
    _refused(done, starts)
    if "applies to" in starts:
        assert done.stderr.endswith(
            "applies to language-model agents (kind = 'llm'); this play has none\n"
        )
    _nothing_written(tmp_path)


def test_simultaneous_rounds_of_one_agent_are_refused_as_a_self_read(tmp_path):
    """Issue 21: a lone agent in simultaneous rounds read its own output, while a weighted
    read that names the reader is refused."""
    config = tmp_path / "c.toml"
    config.write_text('schedule = "simultaneous"\n' + GOOD.split("[agents.B]")[0])
    done = _process("run", config, "--out", tmp_path / "out")
    _refused(done, "schedule: simultaneous rounds need at least two agents: each reads the ")
    assert "an agent cannot read itself" in done.stderr
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("not a url", "must not hold spaces or control characters"),
        ("ftp://127.0.0.1/v1", "must be an http:// or https:// URL with a host"),
    ],
)
def test_a_base_url_that_is_no_server_is_refused_before_any_request(tmp_path, url, says):
    """Issue 21: these said "unreachable after 3 attempts"; they are refused as they are
    read, before any request, and no store is made."""
    started = time.monotonic()
    done = _process(
        "run",
        LLM,
        "--set",
        f"agents.A.base_url='{url}'",
        *("--store", tmp_path / "s.sqlite"),
        *("--out", tmp_path / "out"),
    )
    _refused(done, f"agents.A.base_url: {says}")
    assert "unreachable" not in done.stderr and time.monotonic() - started < 30
    _nothing_written(tmp_path)


@pytest.mark.parametrize("mode", [[], ["--replay"]], ids=["live", "replay"])
def test_a_store_that_is_a_directory_is_one_line(tmp_path, mode):
    """Issue 21: `--store <a directory>` said "disk I/O error"."""
    (tmp_path / "store").mkdir()
    done = _process("run", LLM, "--store", tmp_path / "store", *mode, "--out", tmp_path / "out")
    _refused(done, f"--store {tmp_path / 'store'}: a directory, not a store file")
    assert list((tmp_path / "store").iterdir()) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "why",
    [
        ["--max-requests", "1"],
        [
            *(
                "--set",
                "agents.A.base_url='http://127.0.0.1:9/v1'",
                "--set",
                "agents.A.max_retries=0",
            )
        ],
    ],
    ids=["a refused budget", "an unreachable server"],
)
def test_a_run_that_fails_before_any_answer_makes_no_store(tmp_path, why):
    """Issue 21: the store file was made even when the run failed before any request; it is
    made by the first answer written (the other tests here make one)."""
    store = tmp_path / "new" / "s.sqlite"
    done = _process("run", LLM, "--store", store, *why, "--out", tmp_path / "out")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    _nothing_written(tmp_path)


# --- outputs: never written through a symbolic link -----------------------------------------

WRITERS = {
    "run": (["run", "{config}"], "trajectory.png"),
    "theory": (["theory", "{config}"], "theory.json"),
    "attacks": (
        ["attacks", str(EXAMPLES / "attack.toml"), "--seeds", "2", "--set", "rounds=20"],
        "attacks.png",
    ),
    "design": (["design", "{config}", "--agent", "A", "--seeds", "2"], "design.json"),
    "train": (["train", str(EXAMPLES / "training" / "lsa_d5.toml")], "checkpoint.pt"),
    "sweep": (["sweep", str(EXAMPLES / "sweeps" / "eta_by_n.toml"), "--workers", "1"], "rows"),
    "reproduce": (["reproduce", "single-agent", "--quick"], "figure.png"),
    "helper-study": (["helper-study", "--quick", "--seeds", "2"], "claims.json"),
}
"""Every command that writes a run directory: its arguments and one thing it writes there."""

LINKS = {
    "the run directory": lambda out, theirs, written: out.symlink_to(theirs, True) or out,
    "a file in it": lambda out, theirs, written: _link_in(out, "config.toml", theirs / "keep"),
    "what it writes there": lambda out, theirs, written: _link_in(out, written, theirs),
    "a subdirectory of it": lambda out, theirs, written: _link_in(out, "sub/rows", theirs),
}
"""Where a run directory from someone else hides a link out; each returns the link."""


def _link_in(out: Path, name: str, target: Path) -> Path:
    """A link ``out/name`` to ``target``, in a real ``out`` (and subfolder); returns it."""
    link = out / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def _main(argv: list[str]) -> tuple[int, str, str]:
    """The real CLI in this process: exit code, stdout, stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        pytest.raises(SystemExit) as exit_,
    ):
        main(argv)
    return exit_.value.code, stdout.getvalue(), stderr.getvalue()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", LINKS)
@pytest.mark.parametrize("command", WRITERS)
def test_no_command_writes_through_a_symlinked_run_directory(tmp_path, command, where):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep").write_text("theirs")
    before = _snapshot(theirs)
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    args, written = WRITERS[command]
    out = tmp_path / "out"
    link = LINKS[where](out, theirs, written)
    argv = [arg.format(config=config) for arg in args]
    code, stdout, stderr = _main([*argv, "--out", str(out)])
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"misalign: error: --out {out}: {link} is a symbolic link; refusing to write through it\n"
    )
    assert _snapshot(theirs) == before and link.is_symlink()
    if not out.is_symlink():  # nothing written beside the link either
        files = [Path(root, f) for root, _, names in os.walk(out) for f in names]
        assert all(f.is_symlink() for f in files)


def test_symlinks_above_the_run_directory_are_the_users_own(tmp_path, monkeypatch):
    """``runs/`` itself, or a folder above ``--out`` (``/tmp`` on macOS), may be a link."""
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    Path("runs").symlink_to(elsewhere)
    code, _, stderr = _main(["theory", str(config), "--json"])
    assert code == 0, stderr
    digest = load_config(config).digest()
    assert (elsewhere / digest / "theory.json").exists()
    code, _, stderr = _main(["run", str(config), "--json", "--out", "runs/mine/play"])
    assert code == 0, stderr
    assert (elsewhere / "mine" / "play" / "trajectory.png").exists()


def test_a_batch_exits_1_only_when_every_play_failed(tmp_path):
    """A model that answers numbers for one seed's prompt and prose for the others: the batch
    has a play left, so it exits 0 with the failures listed; with every play failing it exits
    1 (one line); `theory` without any fitted map exits 1 too."""
    answer = affine(0.5 * np.eye(2), np.ones(2))
    config = tmp_path / "c.toml"
    config.write_text(GOOD.replace("[agents.A]\n", "[agents.A]\nkind = 'llm'\nmodel = 'fake'\n"))
    marker: list[str] = []

    def one_seed(body, index):
        if marker and marker[0] in str(body["messages"]):
            return answer(body, index)
        return Reply(content="I cannot say.")

    with FakeServer(one_seed) as server:
        args = ["--set", f"agents.A.base_url='{server.base_url}'"]
        args += ["--set", "agents.A.api_key_env=''"]
        args += ["--set", "agents.A.max_retries=0"]
        store = [f"--store={tmp_path / name}" for name in ("a.sqlite", "b.sqlite", "c.sqlite")]
        fails = _invoke(tmp_path, "run", str(config), "--seeds", "3", *args, store[0])
        theory = _invoke(tmp_path, "theory", str(config), *args, store[1])
        from misalign.api import setup
        from misalign.config import load_config
        from misalign.llm.agent import Session

        overrides = [a for a in args if a != "--set"]
        probe = Session(str(tmp_path / "probe.sqlite"))
        try:
            game = setup(load_config(config, overrides), seeds=[2], session=probe)
        finally:
            probe.close()
        marker.append(f"x = {game.prompts['A'][0].X[0].tolist()}")
        some = _invoke(tmp_path, "run", str(config), "--seeds", "3", *args, store[2])
    assert fails.exit_code == 1 and fails.stderr.startswith("misalign: every play failed (3 plays")
    assert theory.exit_code == 1 and "no prediction: the fit of A failed" in theory.stderr
    assert some.exit_code == 0, some.stderr
    assert "observed: 1 at a fixed point, 2 failed" in some.stdout
