"""``llm``: language-model agents, offline. The shipped recorded run replays bit for bit from
its store without a server or a key; a loopback server whose answers follow a known affine map
is fitted exactly and the play ends on the predicted equilibrium (docs/theory.md §7).

Part 1, the recorded run (``local_llm.toml`` with its store ``local_llm.sqlite``, shipped in
the package, ``misalign.runtime.shipped``; ``examples/`` holds the same files:
SmolLM2-135M-Instruct against an analytic agent, ``d = 2``, 20 rounds). The store is copied
into a temporary directory and the copy is replayed (``Session(copy, "replay")``: no request
may reach a server, a miss is an error; the shipped file is hashed before and after). The
replay is run twice through the Python API (``setup``, ``fit``, ``simulate``, ``predict``).
This part tests the path (store, replay, parsing, fit, report), not the theory: the small
model does not compute a gradient step and its answers are only roughly affine. Its one claim
on the fit is held out: the global fit (made from its probes) predicts the model's 20 recorded
play answers, at inputs it was not fitted on, within 1.3 times its own residual RMS (0.47
for the shipped run, only because one probe answered 18.3 makes that RMS large; its play
settles on a fixed point that neither fit predicts). (The fit table of docs/llm.md is a
regression test, ``claims_test.py``.)

Part 2, the theory: ``misalign.llm.fake_server.FakeServer`` on ``127.0.0.1`` answers
``A w + c`` (a non-symmetric ``A`` with spectral radius 0.6) in the JSON an OpenAI-compatible
server would; a language-model agent plays it against a noisy-label analytic agent, recorded
into a temporary store. The fits must recover ``A`` and ``c``, the prediction each play
reports must be confirmed (the model's answer at the input it names is the output it names;
for an affine map that is the global fit's, confirmed at its first check with no local refit,
docs/llm.md), and every play must end on the predicted equilibrium. The server is stopped
whatever happens (a context manager).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import fit, predict, setup, simulate
from misalign.config import load_config, parse_config
from misalign.experiments.base import (
    Claim,
    Experiment,
    Result,
    errors_by_matrix_powers,
    errors_from_fixed_point,
    write_run,
)
from misalign.model.observe import classify
from misalign.model.theory import round_map
from misalign.runtime.shipped import RECORDED, shipped
from misalign.runtime.text import plural

NAME = "llm"


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    return {
        "experiment": NAME,
        "recorded": {
            "config": "misalign/data/local_llm.toml",
            "store": "misalign/data/local_llm.sqlite",
            "replays": 2,
            "held_out": 1.3,
        },
        "fake": {
            "dims": [2] if quick else [2, 4],
            "plays": seeds or (3 if quick else 20),
            "rounds": 240,
            "spectral_radius": 0.6,
            "map_seed": 0,
            "A": {"n": 8, "concurrency": 32},
            "B": {"n": 8, "noise": 0.2},
        },
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recorded_estimates(store: Path, agent: str, play: int) -> np.ndarray:
    """The estimates the store's accepted play slots of ``agent`` hold, by round."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT c.round, a.estimate FROM accepted c JOIN answers a ON a.key = c.key"
            " WHERE c.agent = ? AND c.play = ? AND c.kind = 'play' AND c.sample = 0"
            " ORDER BY c.round, c.position",
            (agent, play),
        ).fetchall()
    return np.array([json.loads(estimate) for _, estimate in rows], dtype=float)


def _accepted(store: Path) -> int:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT count(*) FROM accepted").fetchone()[0])


def _replay(toml: Path, store: Path):
    """One replay of the recorded run from ``store``: game, fits, trajectory, prediction and
    the session's counters."""
    from misalign.llm.agent import Session

    session = Session(str(store), "replay")
    try:
        game = setup(load_config(toml), session=session)
        fits = fit(game)
        trajectory = simulate(game)
        prediction = predict(game)
    finally:
        session.close()
    return game, fits, trajectory, prediction, session


def _recorded(cfg: dict[str, Any]):
    """Part 1: replay the shipped run from copies of its store."""
    part = cfg["recorded"]
    runs = []
    with (
        shipped(*RECORDED) as (toml, store),
        tempfile.TemporaryDirectory(prefix="misalign-llm-") as tmp,
    ):
        before = _sha256(store)
        for k in range(part["replays"]):
            copy = Path(tmp) / f"replay-{k}.sqlite"
            shutil.copyfile(store, copy)
            runs.append(_replay(toml, copy))
        recorded = _recorded_estimates(copy, "A", int(runs[0][0].configs[0].seed))
        accepted = _accepted(copy)
        changed = int(_sha256(store) != before)
    game, fits, trajectory, prediction, session = runs[0]
    names = game.schedule.agents
    replayed = trajectory.outputs("A")[:, 0]
    bit_for_bit = (
        float(np.abs(replayed - recorded).max()) if replayed.shape == recorded.shape else np.inf
    )

    def everything(run) -> np.ndarray:
        g, f, t, p, _ = run
        agent = f.agents["A"]
        parts = [t.outputs(n).ravel() for n in names]
        for one in (agent.global_, agent.local or agent.global_):
            parts += [one.map.A.ravel(), one.map.c.ravel(), one.r2_loo]
        parts += [p.fixed_point[n].ravel() for n in names]
        parts += [f.global_prediction.fixed_point[n].ravel() for n in names]
        return np.concatenate(parts)

    again = max(_difference(everything(run), everything(runs[0])) for run in runs[1:])
    from misalign.llm.fit import WARMUP, score

    agent = fits.agents["A"]
    observed = classify(trajectory)
    tail = observed.mean["A"][0]  # A's mean output over the rounds the play was judged on
    equilibrium = {
        "global": fits.global_prediction.fixed_point["A"][0],
        "local": prediction.fixed_point["A"][0],
    }
    inputs, answers = (np.stack([turn[i] for turn in game.agents["A"].history]) for i in (0, 1))
    measured = {
        "observed": observed.as_json(0)["class"],
        "confirmed": int(agent.confirmed[0]),
        "miss": float(agent.miss[0]),
    }
    for key, one in (("global", agent.global_), ("local", agent.local)):
        r2_play, rms_play, _ = score(one.map, inputs, answers)
        gap = float(np.linalg.norm(tail - equilibrium[key]))
        measured |= {
            f"{key}_r2": float(one.r2[0]),
            f"{key}_r2_loo": float(one.r2_loo[0]),
            f"{key}_r2_play": float(r2_play[0]),
            f"{key}_rms": float(one.rms[0]),
            f"{key}_rms_play": float(rms_play[0]),
            f"{key}_gap": gap,
            f"{key}_gap_relative": gap / float(np.linalg.norm(tail)),
        }
    stats = [run[4].stats for run in runs]
    failed = sum(len(run[4].failed) for run in runs)
    # a global prediction without an equilibrium makes the fit run a warm-up play first
    # (misalign.llm.fit.WARMUP rounds): its answers fill the play's first slots, and the play
    # reads them again
    warm_up = 0
    if not np.isfinite(fits.global_prediction.fixed_point["A"]).all():
        warm_up = WARMUP * (len(game.agents["A"].history) // trajectory.rounds)
    reads = accepted + warm_up
    claims = [
        Claim(
            "replay: max |A's output - the estimate recorded in the store| over the 20 rounds"
            " (bit for bit)",
            bit_for_bit,
            0.0,
        ),
        Claim(
            f"replay: max difference between {part['replays']} replays (every output, both"
            " fits' A and c, both predicted equilibria)",
            again,
            0.0,
        ),
        Claim(
            "replay: requests sent to a server, plus answers not read from the store"
            f" (|cached - accepted slots| per replay, {accepted} slots"
            + (
                f" and the warm-up play's {warm_up} answers, read again by the play"
                if warm_up
                else ""
            )
            + "), plus failed plays",
            sum(s.requests + abs(s.cached - reads) for s in stats) + failed,
            0,
        ),
        Claim("replay: the shipped store changed (sha256 before and after)", changed, 0),
        Claim(
            "recorded run: RMS of the global fit's prediction - the model's recorded answer over"
            " the 20 play rounds (inputs not used in the fit) / the fit's own residual RMS"
            f" ({measured['global_rms']:.2f})",
            measured["global_rms_play"] / measured["global_rms"],
            part["held_out"],
        ),
    ]
    rows = []
    for t in range(trajectory.rounds):
        for name in names:
            output = trajectory.outputs(name)[t, 0]
            for i, value in enumerate(output):
                rows.append(
                    _row(
                        "recorded",
                        int(game.configs[0].seed),
                        t + 1,
                        name,
                        i,
                        value,
                        prediction.fixed_point[name][0, i],
                        fits.global_prediction.fixed_point[name][0, i],
                    )
                )
    curves = {"outputs": replayed, "equilibrium": equilibrium, "measured": measured}
    return rows, claims, curves


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b|``, where NaN in both (a prediction without an equilibrium) is no
    difference and NaN in one only is an infinite one."""
    both = np.isnan(a) & np.isnan(b)
    gap = np.where(both, 0.0, np.abs(a - b))
    return float(np.nan_to_num(gap, nan=np.inf).max())


def _row(part, play, round_, agent, coordinate, output, local, global_) -> dict[str, Any]:
    return {
        "part": part,
        "play": play,
        "round": round_,
        "agent": agent,
        "coordinate": coordinate,
        "output": output,
        "equilibrium_predicted": local,
        "equilibrium_global_fit": global_,
    }


def _true_map(d: int, radius: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A non-symmetric ``A`` with spectral radius ``radius``, and ``c``."""
    rng = np.random.default_rng([seed, d])
    A = rng.standard_normal((d, d))
    A *= radius / max(abs(np.linalg.eigvals(A)))
    return A, rng.standard_normal(d)


def _fake(cfg: dict[str, Any]):
    """Part 2: a loopback server answering a known affine map, fitted and played."""
    from misalign.llm.agent import Session
    from misalign.llm.fake_server import FakeServer, affine

    part = cfg["fake"]
    rows, curves = [], {}
    fit_error = equilibrium_error = held_out = 0.0
    unconfirmed = 0
    with tempfile.TemporaryDirectory(prefix="misalign-llm-") as tmp:
        for d in part["dims"]:
            A, c = _true_map(d, part["spectral_radius"], part["map_seed"])
            with FakeServer(affine(A, c)) as server:
                llm = {"kind": "llm", "model": "fake", "base_url": server.base_url}
                agents = {"A": llm | {"api_key_env": ""} | part["A"], "B": part["B"]}
                play = parse_config({"seed": 0, "d": d, "rounds": part["rounds"], "agents": agents})
                session = Session(str(Path(tmp) / f"fake-{d}.sqlite"))
                try:
                    game = setup(play, seeds=range(part["plays"]), session=session)
                    fits = fit(game)
                    trajectory = simulate(game)
                    prediction = predict(game)
                finally:
                    session.close()
            agent = fits.agents["A"]
            for one in (agent.global_, agent.local or agent.global_):
                fit_error = max(
                    fit_error,
                    float(np.abs(one.map.A - A).max()),
                    float(np.abs(one.map.c - c).max()),
                )
                held_out = max(held_out, float(np.max(1 - one.r2_loo)))
            for name in game.schedule.agents:
                final = trajectory.outputs(name)[-1]
                gap = np.abs(final - prediction.fixed_point[name]).max()
                equilibrium_error = max(equilibrium_error, float(gap))
            unconfirmed += int((~agent.confirmed).sum())
            names = game.schedule.agents
            errors, s0 = errors_from_fixed_point(game, trajectory, prediction)
            R = round_map({n: game.agents[n].affine() for n in names}, game.schedule).R
            theory = errors_by_matrix_powers(R, s0, trajectory.rounds)[0]
            size = np.linalg.norm(s0, axis=-1)
            simulated, theory = errors / size, theory / size
            curves[d] = (simulated, theory, float(np.median(prediction.rho)))
            for p in range(part["plays"]):
                for t in range(trajectory.rounds):
                    for name in names:
                        for i in range(d):
                            rows.append(
                                _row(
                                    f"fake d={d}",
                                    p,
                                    t + 1,
                                    name,
                                    i,
                                    trajectory.outputs(name)[t, p, i],
                                    prediction.fixed_point[name][p, i],
                                    fits.global_prediction.fixed_point[name][p, i],
                                )
                            )
    plays = part["plays"] * len(part["dims"])
    claims = [
        Claim(
            f"fake server (A w + c, d = {part['dims']}, {plural(plays, 'play')}): max"
            " |fitted - true| of A and c, global and local fits",
            fit_error,
            1e-6,
        ),
        Claim(
            "fake server: max |final output - predicted equilibrium| over agents and plays",
            equilibrium_error,
            1e-6,
        ),
        Claim(
            "fake server: max 1 - r2_loo (each probe predicted by the fit to the others)",
            held_out,
            1e-9,
        ),
        Claim(
            "fake server: plays whose reported prediction is not confirmed (the model's answer"
            " at the input it names is not the output it names)",
            unconfirmed,
            0,
        ),
    ]
    return rows, claims, curves


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """The recorded run replayed twice, then the fake server's plays."""
    cfg = config(quick, seeds)
    rows, claims, recorded = _recorded(cfg)
    fake_rows, fake_claims, fake = _fake(cfg)
    return write_run(out, cfg, rows + fake_rows, claims + fake_claims, _figure(recorded, fake))


def _figure(recorded, fake):
    from misalign.outputs.figure import new_figure

    fig, (ax, right) = new_figure(2, (12, 4.4))
    outputs = recorded["outputs"]
    rounds = np.arange(1, len(outputs) + 1)
    styles = {"local": "--", "global": ":"}
    for i in range(outputs.shape[1]):
        color = f"C{i}"
        ax.plot(rounds, outputs[:, i], "o", color=color, label=f"replayed output of A, w[{i}]")
        for which, style in styles.items():
            if not np.isfinite(recorded["equilibrium"][which][i]):
                continue  # that fit's prediction names no equilibrium
            ax.axhline(
                recorded["equilibrium"][which][i],
                color=color,
                ls=style,
                label=f"{which} fit's predicted equilibrium, w[{i}]",
            )
    measured = recorded["measured"]
    none = [w for w, x in recorded["equilibrium"].items() if not np.isfinite(x).all()]
    if none:
        fits = " and ".join(none) + (" fits" if len(none) > 1 else " fit")
        ax.text(
            0.98,
            0.97,
            f"no equilibrium predicted by the {fits}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize="small",
        )
    ax.set_ylim(-1.0, 3.0)
    ax.legend(frameon=False, fontsize="x-small", ncol=2, loc="lower left")
    ax.set(
        xlabel="round",
        ylabel="language model's output (coordinate)",
        title=(
            f"recorded SmolLM2 run, replayed ({measured['observed']}): held-out r2"
            f" {measured['global_r2_loo']:.2f} global, {measured['local_r2_loo']:.2f} local"
        ),
    )
    for k, (d, (simulated, theory, rho)) in enumerate(fake.items()):
        color = f"C{k}"
        t = np.arange(1, len(theory) + 1)
        # below 1e-12 (geometric mean) the plays sit at float64 rounding
        log_t = np.log10(np.maximum(theory, 1e-300))
        shown = log_t.mean(axis=1) > -12
        log_t, log_s = log_t[shown], np.log10(np.maximum(simulated[shown], 1e-300))
        right.plot(
            t[shown],
            10 ** log_t.mean(axis=1),
            "-",
            color=color,
            label=f"theory |R^t e_0| / |e_0|, d = {d} (geometric mean)",
        )
        mean, std = log_s.mean(axis=1), log_s.std(axis=1)
        right.errorbar(
            t[shown][::2],
            10 ** mean[::2],
            [10 ** mean[::2] - 10 ** (mean - std)[::2], 10 ** (mean + std)[::2] - 10 ** mean[::2]],
            fmt="o",
            ms=3,
            color=color,
            capsize=2,
            label=f"simulation, d = {d} ± std ({plural(simulated.shape[1], 'play')}, "
            f"rho ~ {rho:.2f})",
        )
    right.set(
        yscale="log",
        xlabel="round",
        ylabel="|s_t - s*| / |s_0 - s*| (log mean ± std over plays)",
        title="fake server answering A w + c: the fitted theory holds",
    )
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="the recorded language-model run replays bit for bit offline; a fitted affine server"
    " ends on its predicted equilibrium",
    typical="9.3 s",
    config=config,
    run=run,
    compares=(
        "replayed outputs of A vs the estimates recorded in the store",
        "one replay vs another (outputs, fits, predicted equilibria)",
        "requests sent and answers not read from the store in replay vs 0 (offline)",
        "the shipped store's sha256 after the replays vs before",
        "the global fit's prediction at the play's inputs (held out) vs the model's recorded"
        " answers, against the fit's own residual RMS",
        "fitted A and c vs the fake server's true map",
        "simulated final outputs vs the equilibrium predicted from the fits",
        "each probe's answers vs the fit to the other probes (held-out r2)",
        "the model's answer at the input the reported prediction names vs the output it names",
    ),
)
