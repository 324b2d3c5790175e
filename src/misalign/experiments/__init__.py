"""The experiment registry: one entry per claim of docs/theory.md, each reproduced by one command.

``misalign reproduce --list`` prints the entries; ``misalign reproduce NAME`` runs one and
writes into its output directory (``runs/<name>-<config hash>/`` by default):

- ``figure.png`` and ``figure.svg``: theory as lines, simulation as markers with the
  standard deviation over seeds as error bars or bands;
- ``table.csv`` and ``table.parquet``: the same rows;
- ``config.json``: the experiment's resolved parameters;
- ``version.json``: the package version and, when there is one, the git commit;
- ``claims.json``: every numeric claim with its measured value, tolerance and verdict.

Every experiment module has one shape: ``config(quick, seeds)`` resolves its parameters,
``run(quick, seeds, out)`` plays batches through the Python API (``misalign.api``)
with the theory beside them and returns a ``Result`` through ``write_run``.
"""

from misalign.experiments.base import (
    Claim,
    Experiment,
    Result,
    config_hash,
    default_out,
    errors_by_matrix_powers,
    errors_from_fixed_point,
    measured_rate,
    theory_and_simulation,
    version,
    worst,
    write_run,
)

__all__ = [
    "Claim",
    "Experiment",
    "Result",
    "config_hash",
    "default_out",
    "errors_by_matrix_powers",
    "errors_from_fixed_point",
    "measured_rate",
    "theory_and_simulation",
    "version",
    "worst",
    "write_run",
    "REGISTRY",
]


def _registry() -> dict[str, Experiment]:
    from misalign.experiments import (
        attacks,
        direction,
        gap,
        helper,
        llm,
        lsa,
        noise,
        one_sided,
        schedules,
        single_agent,
        small_steps,
        stability,
        transformer,
    )

    entries = [
        single_agent.EXPERIMENT,
        gap.EXPERIMENT,
        direction.EXPERIMENT,
        stability.EXPERIMENT,
        small_steps.EXPERIMENT,
        noise.EXPERIMENT,
        schedules.EXPERIMENT,
        one_sided.EXPERIMENT,
        attacks.EXPERIMENT,
        helper.EXPERIMENT,
        lsa.EXPERIMENT,
        llm.EXPERIMENT,
        transformer.EXPERIMENT,
    ]
    return {e.name: e for e in entries}


REGISTRY: dict[str, Experiment] = _registry()
"""Every experiment, by name, in the order ``reproduce --list`` prints them."""
