"""The attack study: every attack against every defence over many seeds (docs/theory.md §3).

One call plays, for each attack (none, decoy, gray-box decoy, geometry,
per-turn) and each defence of the victim (none, damping, monitor, predict),
the base configuration once per seed as one batch, and measures the victim's
and the attacker's final distance to their own targets, how often and how fast
the victim's monitor flags the partner, and the monitor's ROC: its score on
honest plays against its score on attacked plays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import Game, check_size, predict, setup, simulate
from misalign.config import ConfigError, PlayConfig, parse_config
from misalign.runtime.progress import progress_bar

ATTACKS: dict[str, dict[str, str] | None] = {
    "honest": None,
    "decoy": {"method": "decoy"},
    "gray-box decoy": {"method": "decoy", "knowledge": "gray-box"},
    "geometry": {"method": "geometry"},
    "per-turn": {"method": "per-turn"},
}
DEFENCES: tuple[str, ...] = ("none", "damping", "monitor", "predict")


@dataclass(frozen=True)
class Cell:
    """One attack against one defence, over the seeds.

    Attributes:
        victim, attacker: final distance to own target per seed (``None`` where no attack).
        distance: median over seeds of the victim's and attacker's distance per round.
        flagged_at: per seed, the round the monitor first flagged (``-1``: never), or ``None``.
        score: per seed, the monitor's largest score, or ``None``.
        refused: per seed, whether the predictive victim stopped reading its partner.
        victim_predicted, attacker_predicted: per seed, the final distance to own target that
            the theory predicts for the play (``misalign.api.predict`` after it, so of
            the regime each agent ended in).
        rho: per seed, the predicted rate of that play (``>= 1``: it does not converge).
    """

    victim: np.ndarray
    attacker: np.ndarray
    distance: dict[str, np.ndarray]
    flagged_at: np.ndarray | None
    score: np.ndarray | None
    refused: np.ndarray | None
    victim_predicted: np.ndarray | None = None
    attacker_predicted: np.ndarray | None = None
    rho: np.ndarray | None = None


def roles(config: PlayConfig) -> tuple[str, str]:
    """``(attacker, victim)``: the ``[attack]`` table's agent, else the second agent."""
    names = list(config.agents)
    attacker = config.attack.agent if config.attack else names[1]
    return attacker, names[1 - names.index(attacker)]


def run_study(
    config: PlayConfig, seeds: int = 200, progress: bool = False
) -> tuple[dict[tuple[str, str], Cell], dict[str, str]]:
    """Play every attack against every defence.

    Args:
        config: a two-agent configuration (its ``[attack]``/``[defence]`` tables only name roles).
        seeds: plays per cell, seeds ``0..seeds-1`` (targets sampled where the config has none).
        progress: show a progress bar on stderr.

    Returns:
        The cells by ``(attack, defence)``, and the attacks that could not run with why.

    Raises:
        ConfigError: the plays of one cell would not fit in memory.
    """
    check_size(config, seeds)
    attacker, victim = roles(config)
    cells, skipped = {}, {}
    todo = [(a, d) for a in ATTACKS for d in DEFENCES]
    bar = progress_bar(len(todo), "attack study") if progress else None
    for attack, defence in todo:
        data = config.model_dump(exclude_none=True)
        data["attack"] = None if ATTACKS[attack] is None else {"agent": attacker, **ATTACKS[attack]}
        data["defence"] = None if defence == "none" else {"agent": victim, "method": defence}
        if attack in skipped:
            continue
        try:
            game = setup(parse_config(data), seeds=range(seeds), progress=progress)
        except ConfigError as exc:
            skipped[attack] = str(exc)
            continue
        cells[attack, defence] = _measure(game, attacker, victim)
        if bar is not None:
            bar.advance(bar.task_ids[0])
    if bar is not None:
        bar.stop()
    return cells, skipped


def _measure(game: Game, attacker: str, victim: str) -> Cell:
    trajectory = simulate(game)
    prediction = predict(game)
    targets = game.targets
    distance = {n: trajectory.distance(n, targets[n]) for n in (victim, attacker)}
    guard = game.agents[victim]
    flagged = getattr(guard, "flagged_at", None)
    score = getattr(guard, "score", None)
    refused = getattr(guard, "refused_at", None)
    return Cell(
        victim=distance[victim][-1],
        attacker=distance[attacker][-1],
        distance={n: np.median(v, axis=1) for n, v in distance.items()},
        flagged_at=None if flagged is None else flagged.copy(),
        score=None if score is None else score.copy(),
        refused=None if refused is None else refused >= 0,
        victim_predicted=np.linalg.norm(prediction.residual[victim], axis=-1),
        attacker_predicted=np.linalg.norm(prediction.residual[attacker], axis=-1),
        rho=prediction.rho.copy(),
    )


def roc(honest: np.ndarray, attacked: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of a score that should be higher under attack.

    Returns:
        False-positive rates, true-positive rates (thresholds at every observed
        score, from high to low) and the area under the curve (the probability that
        an attacked play outscores an honest one, ties counting half).
    """
    thresholds = np.unique(np.concatenate([honest, attacked]))[::-1]
    fpr = np.array([0.0] + [(honest >= t).mean() for t in thresholds])
    tpr = np.array([0.0] + [(attacked >= t).mean() for t in thresholds])
    greater = (attacked[:, None] > honest[None, :]).mean()
    ties = (attacked[:, None] == honest[None, :]).mean()
    return fpr, tpr, float(greater + ties / 2)


def summary(cells: dict[tuple[str, str], Cell], skipped: dict[str, str]) -> dict[str, Any]:
    """The study as JSON-ready rows, one per (attack, defence), and the ROC AUCs. Residual
    means are over the plays that stayed finite; ``diverged`` counts the others."""
    rows = []
    for (attack, defence), cell in cells.items():
        finite = np.isfinite(cell.victim) & np.isfinite(cell.attacker)
        victim, attacker = cell.victim[finite], cell.attacker[finite]
        row: dict[str, Any] = {
            "attack": attack,
            "defence": defence,
            "diverged": int((~finite).sum()),
            "victim_distance_mean": float(victim.mean()) if finite.any() else None,
            "victim_distance_std": float(victim.std()) if finite.any() else None,
            "attacker_distance_mean": float(attacker.mean()) if finite.any() else None,
            "attacker_exact_rate": float((cell.attacker < 1e-8).mean()),
        }
        if cell.flagged_at is not None:
            hit = cell.flagged_at >= 0
            key = "false_alarm_rate" if attack == "honest" else "detection_rate"
            row[key] = float(hit.mean())
            row["rounds_to_detection_median"] = (
                float(np.median(cell.flagged_at[hit])) if hit.any() else None
            )
        if cell.refused is not None:
            row["refusal_rate"] = float(cell.refused.mean())
        rows.append(row)
    auc = {
        attack: roc(cells["honest", "monitor"].score, cells[attack, "monitor"].score)[2]
        for attack in ATTACKS
        if attack != "honest" and (attack, "monitor") in cells and ("honest", "monitor") in cells
    }
    return {"rows": rows, "roc_auc": auc, "skipped": skipped}


def plot_study(cells: dict[tuple[str, str], Cell], config: PlayConfig, path: str | Path) -> Path:
    """Left: median victim (solid) and attacker (dashed) distance per round for each attack,
    with no defence (the title says so). Right: the monitor's ROC for each attack against
    honest plays."""
    from misalign.outputs.figure import new_figure, save_figure

    attacker, victim = roles(config)
    fig, (ax, rocs) = new_figure(2, (11, 4.2))
    for k, attack in enumerate(a for a in ATTACKS if (a, "none") in cells):
        cell = cells[attack, "none"]
        rounds = np.arange(1, len(cell.distance[victim]) + 1)
        ax.plot(rounds, np.maximum(cell.distance[victim], 1e-16), color=f"C{k}", label=attack)
        ax.plot(rounds, np.maximum(cell.distance[attacker], 1e-16), color=f"C{k}", ls="--")
    ax.set(
        yscale="log",
        xscale="log",
        xlabel="round",
        ylabel="median distance to own target",
        title=f"no defence: victim {victim} (solid), attacker {attacker} (dashed)",
    )
    draw_roc(rocs, cells)
    return save_figure(fig, path)


def draw_roc(ax, cells: dict[tuple[str, str], Cell]) -> None:
    """The victim's monitor's ROC for each attack against honest plays, on ``ax`` (an attack
    keeps its colour of ``plot_study``'s left panel)."""
    for k, attack in enumerate(a for a in ATTACKS if (a, "none") in cells):
        if attack != "honest" and (attack, "monitor") in cells and ("honest", "monitor") in cells:
            fpr, tpr, auc = roc(cells["honest", "monitor"].score, cells[attack, "monitor"].score)
            ax.plot(fpr, tpr, color=f"C{k}", label=f"{attack} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(
        xlabel="false-alarm rate (honest partners)",
        ylabel="detection rate",
        title="victim's monitor: ROC",
    )
