"""Tests for misalign.cli: exit codes, one-line errors, JSON on stdout, artifacts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from misalign.cli import app

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
def test_examples_run(tmp_path, example):
    result = _invoke(tmp_path, "run", str(EXAMPLES / example))
    assert result.exit_code == 0, result.stderr
    assert "rho" in result.stdout and "nan" not in result.stdout.lower()


def test_divergent_play_is_reported_not_an_error(tmp_path):
    result = _invoke(tmp_path, "run", str(EXAMPLES / "diverging.toml"))
    assert result.exit_code == 0 and "diverges (rho = " in result.stdout
    data = json.loads(_invoke(tmp_path, "run", str(EXAMPLES / "diverging.toml"), "--json").stdout)
    assert data["prediction"]["converges"] is False and data["prediction"]["A"] is None
    assert data["prediction"]["rho"] > 1
    assert data["diverged_at"] == len(data["outputs"]["A"])


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


def test_helper_study_command(tmp_path):
    args = ["helper-study", "--dims", "2", "--kappas", "10", "--seeds", "2", "--cap", "2000"]
    result = _invoke(tmp_path, *args, "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert {r["method"] for r in rows} == {
        "A alone",
        "plain alternation",
        "white-box helper",
        "secant helper",
    }
    bad = _invoke(tmp_path, "helper-study", "--dims", "two")
    assert bad.exit_code == 2 and bad.stderr.startswith("misalign: error: --dims:")


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
        (["helper-study", "--kappas", "inf"], "--kappas: each must be between 1 and 1e8"),
        (["helper-study", "--kappas", "nan"], "--kappas: each must be between 1 and 1e8"),
        (["helper-study", "--dims", "0"], "--dims: each must be between 1 and 200"),
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
    assert f"20 plays (seeds 0..19): {good} converge" in text
    assert f"{len(diverging)} diverge" in text and ", ".join(map(str, diverging[:3])) in text
    assert "converges (rho" not in text  # no single-seed headline in a batch's story
