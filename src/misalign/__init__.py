"""misalign: the play of in-context learners with misaligned objectives (see docs/theory.md)."""

from misalign.config import ConfigError, PlayConfig, load_config, parse_config
from misalign.experiment import Game, fit, predict, setup, simulate
from misalign.plot import plot_batch, plot_play
from misalign.report import batch, report, to_json

__all__ = [
    "ConfigError",
    "Game",
    "PlayConfig",
    "batch",
    "fit",
    "load_config",
    "parse_config",
    "plot_batch",
    "plot_play",
    "predict",
    "report",
    "setup",
    "simulate",
    "to_json",
]
