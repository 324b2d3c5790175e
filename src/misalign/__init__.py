"""misalign: the play of in-context learners with misaligned objectives (see docs/theory.md)."""

from misalign.config import ConfigError, PlayConfig, load_config, parse_config
from misalign.experiment import Game, predict, setup, simulate
from misalign.plot import plot_play
from misalign.report import report

__all__ = [
    "ConfigError",
    "Game",
    "PlayConfig",
    "load_config",
    "parse_config",
    "plot_play",
    "predict",
    "report",
    "setup",
    "simulate",
]
