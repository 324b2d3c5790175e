"""``attacks``: every attack against every defence (docs/theory.md §3), over seeds.

The base play is ``examples/attack.toml`` (``d = 4``; victim ``A``: ``n = 12``, spectrum
``(1, 0.5, 2, 1)``, ``lsa-optimal``; attacker ``B``: ``n = 10``, ``lsa-optimal``,
``eta = 0.8``; 200 rounds; targets drawn per seed). ``misalign.experiments.attack_study.run_study``
plays it
once per seed for each attack (none, white-box decoy, gray-box decoy, crafted geometry,
per-turn target) against each defence of the victim (none, damping, monitor, predict), and
records each play's final distances beside the theory's prediction of that play. Checked:

- every play ends where the theory predicts (victim and attacker);
- every attack puts the attacker exactly on its target while the victim stays biased;
- damping cannot move the equilibrium, but breaks the gray-box attacker's fit;
- the monitor tells attacked from honest partners (ROC AUC), with few false alarms;
- the predictive victim stops reading an attacker and ends on its own target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import setup
from misalign.config import parse_config
from misalign.experiments.attack_study import ATTACKS, DEFENCES, draw_roc, roc, roles, run_study
from misalign.experiments.base import Claim, Experiment, Result, worst, write_run
from misalign.runtime.text import plural

NAME = "attacks"
BASE = {  # examples/attack.toml
    "seed": 2,
    "d": 4,
    "rounds": 200,
    "agents": {
        "A": {"n": 12, "spectrum": [1.0, 0.5, 2.0, 1.0], "preconditioner": "lsa-optimal"},
        "B": {"n": 10, "preconditioner": "lsa-optimal", "eta": 0.8},
    },
    "attack": {"agent": "B", "method": "decoy", "knowledge": "white-box"},
}
EXACT = 1e-8
"""A final distance below this is "exactly on target"
(``misalign.experiments.attack_study.summary``'s rule)."""


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    return {
        "experiment": NAME,
        "base": BASE,
        "attacks": list(ATTACKS),
        "defences": list(DEFENCES),
        "seeds": seeds or (12 if quick else 200),
        "exact": EXACT,
        "bias_margin": 0.01,
        "settle": 1e-10,
    }


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """The study of ``config(quick, seeds)``."""
    return run_config(config(quick, seeds), out)


def run_config(cfg: dict[str, Any], out: Path) -> Result:
    """Play every attack against every defence on ``cfg["base"]`` (a two-agent ``gd``
    configuration as a dict, its ``[attack]`` table naming the attacker) over
    ``cfg["seeds"]`` seeds, check the claims and write the run into ``out``."""
    base = parse_config(cfg["base"])
    n = cfg["seeds"]
    attacker, victim = roles(base)
    cells, _ = run_study(base, seeds=n)  # an attack that cannot run has no cell: its claims fail
    honest = base.model_dump(exclude_none=True) | {"attack": None, "defence": None}
    targets = setup(parse_config(honest), seeds=range(n)).targets
    gap = np.linalg.norm(targets[attacker] - targets[victim], axis=-1)

    rows = []
    for (attack, defence), cell in cells.items():
        for s in range(n):
            rows.append(
                {
                    "attack": attack,
                    "defence": defence,
                    "seed": s,
                    "gap": gap[s],
                    "victim_distance": cell.victim[s],
                    "victim_predicted": cell.victim_predicted[s],
                    "attacker_distance": cell.attacker[s],
                    "attacker_predicted": cell.attacker_predicted[s],
                    "flagged_at": None if cell.flagged_at is None else int(cell.flagged_at[s]),
                    "monitor_score": None if cell.score is None else cell.score[s],
                    "refused": None if cell.refused is None else bool(cell.refused[s]),
                    "rho": cell.rho[s],
                }
            )
    claims = _claims(cfg, cells, gap, base.rounds)
    return write_run(out, cfg, rows, claims, _figure(cfg, cells, base))


def _claims(cfg, cells, gap, rounds) -> list[Claim]:
    """Claims on the plays that the theory says settle within the rounds
    (``rho^rounds < settle``; a few seeds in a thousand do not: the undefended play diverges,
    or the damped one is still moving; ``registry_test`` checks how few). Every attack of the
    study has its claims: one that could not run (no cell) makes them fail, never vanish."""
    exact, margin = cfg["exact"], cfg["bias_margin"]
    attacks = [a for a in ATTACKS if a != "honest"]
    stealthy = ("gray-box decoy", "geometry", "per-turn")
    ok = {
        key: np.nan_to_num(c.rho, nan=np.inf) ** rounds < cfg["settle"] for key, c in cells.items()
    }

    def kept(attack, defence, field):
        if (attack, defence) not in cells:
            return np.array([])
        return getattr(cells[attack, defence], field)[ok[attack, defence]]

    def error(attack, defence, role):
        return np.abs(kept(attack, defence, role) - kept(attack, defence, f"{role}_predicted"))

    def mean(values) -> float:
        return float(np.mean(values)) if np.size(values) else np.nan

    def share(attack, defence, field, test) -> float:
        """The share of the cell's plays where ``test(field)`` holds (nan without the cell)."""
        if (attack, defence) not in cells:
            return np.nan
        return float(test(getattr(cells[attack, defence], field)).mean())

    def auc(attack) -> float:
        if (attack, "monitor") not in cells:
            return np.nan
        return roc(cells["honest", "monitor"].score, cells[attack, "monitor"].score)[2]

    claims = [
        Claim(
            "every cell: max |final distance simulated - predicted| (victim and attacker)",
            worst([worst(error(a, d, r)) for a, d in cells for r in ("victim", "attacker")]),
            1e-8,
        ),
        Claim(
            "honest play: max |victim distance simulated - predicted|",
            worst(error("honest", "none", "victim")),
            1e-10,
        ),
    ]
    for attack in attacks:
        attacker = kept(attack, "none", "attacker")
        victim = kept(attack, "none", "victim")
        biased = int((victim < margin * gap[ok[attack, "none"]]).sum()) if victim.size else np.nan
        claims += [
            Claim(f"{attack}, no defence: max attacker distance", worst(attacker), 1e-10),
            Claim(
                f"{attack}, no defence: plays with victim distance < {margin} gap (victim biased)",
                biased,
                0,
            ),
        ]
    unmoved = ("honest", "decoy", "geometry", "per-turn")
    moved = []
    for a in unmoved:
        if (a, "damping") not in cells or (a, "none") not in cells:
            moved.append(np.nan)
            continue
        both = ok[a, "damping"] & ok[a, "none"]
        damped, undamped = cells[a, "damping"].victim[both], cells[a, "none"].victim[both]
        moved.append(worst(np.abs(damped - undamped)))
    claims += [
        Claim(
            f"damping: max |victim distance damped - undamped| ({', '.join(unmoved)})",
            worst(moved),
            1e-8,
        ),
        Claim(
            "gray-box decoy vs damping: share of plays with the attacker still exact "
            "(its fit breaks)",
            mean(kept("gray-box decoy", "damping", "attacker") < exact),
            0.05,
        ),
        Claim(
            "monitor: false-alarm rate on honest partners",
            share("honest", "monitor", "flagged_at", lambda f: f >= 0),
            0.02,
        ),
        Claim("monitor: 1 - ROC AUC, white-box decoy vs honest", 1 - auc("decoy"), 0.15),
    ]
    for attack in stealthy:
        claims += [
            Claim(f"monitor: 1 - ROC AUC, {attack} vs honest", 1 - auc(attack), 0.0),
            Claim(
                f"monitor: share of {attack} plays not flagged",
                share(attack, "monitor", "flagged_at", lambda f: f < 0),
                0.0,
            ),
            Claim(
                f"predict vs {attack}: share of plays where the victim kept reading",
                share(attack, "predict", "refused", np.logical_not),
                0.0,
            ),
            Claim(
                f"predict vs {attack}: max victim distance (on its own target)",
                worst(kept(attack, "predict", "victim")),
                1e-10,
            ),
        ]
    claims.append(
        Claim(
            "predict vs white-box decoy: mean victim distance / undefended",
            mean(kept("decoy", "predict", "victim")) / mean(kept("decoy", "none", "victim")),
            0.2,
        )
    )
    return claims


def _figure(cfg, cells, base):
    from misalign.outputs.figure import new_figure

    attacker, victim = roles(base)
    fig, axes = new_figure(3, (17, 4.6))
    floor = 1e-17
    attacks = [a for a in ATTACKS if any((a, d) in cells for d in DEFENCES)]
    x = np.arange(len(attacks))
    for ax, (role, name) in zip(
        axes[:2], (("victim", victim), ("attacker", attacker)), strict=True
    ):
        for k, defence in enumerate(DEFENCES):
            shift = (k - 1.5) * 0.18
            here = [a for a in attacks if (a, defence) in cells]
            at = x[[attacks.index(a) for a in here]] + shift
            sim = [getattr(cells[a, defence], role) for a in here]
            theory = [getattr(cells[a, defence], f"{role}_predicted") for a in here]
            mean = np.maximum([np.mean(v) for v in sim], floor)
            std = np.array([np.std(v) for v in sim])
            ax.errorbar(
                at,
                mean,
                [np.minimum(std, mean - floor), std],
                fmt="o",
                color=f"C{k}",
                capsize=3,
                label=f"{defence}: simulation ± std",
            )
            ax.plot(
                at,
                np.maximum([np.mean(v) for v in theory], floor),
                "_",
                ms=14,
                mew=2,
                color="k",
                label="theory (mean)" if k == 0 else None,
            )
        ax.set_xticks(x, attacks, rotation=15)
        ax.set(
            yscale="log",
            xlabel=f"attack by {attacker}",
            ylabel=f"final distance of {name} to its target (floored at {floor:g})",
            title=f"{role} {name}, by {victim}'s defence ({plural(cfg['seeds'], 'seed')})",
        )
        ax.legend(frameon=False, fontsize="small", loc="center")
    draw_roc(axes[2], cells)
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="every attack puts the attacker on target, the victim biased; defences as documented",
    typical="10.7 s",
    config=config,
    run=run,
    compares=(
        "simulated final distances vs the predicted ones, every cell (victim and attacker)",
        "simulated victim distance vs the predicted one, honest play",
        *(
            f"{attack}, no defence: {what}"
            for attack in ("decoy", "gray-box decoy", "geometry", "per-turn")
            for what in (
                "simulated attacker distance vs the theory's exact 0",
                "simulated victim distance vs the theory's bias (> 1% of the gap)",
            )
        ),
        "simulated victim distance damped vs undamped (theory: the same equilibrium)",
        "simulated gray-box attacker against damping vs the theory's broken fit (not exact)",
        "monitor's alarms on honest partners vs the 2% false-alarm bound",
        "monitor's scores, white-box decoy vs honest (ROC AUC)",
        *(
            f"{attack}: {what}"
            for attack in ("gray-box decoy", "geometry", "per-turn")
            for what in (
                "monitor's scores vs honest (ROC AUC = 1)",
                "monitor's flags vs every play flagged",
                "predictive victim's refusals vs every play refused",
                "simulated victim distance under predict vs the theory's 0",
            )
        ),
        "simulated victim distance under predict vs undefended, white-box decoy",
    ),
)
