"""misalign: the play of in-context learners with misaligned objectives (see docs/theory.md)."""

from misalign.api import Game, fit, predict, setup, simulate
from misalign.config import ConfigError, PlayConfig, load_config, parse_config
from misalign.outputs.batch import batch
from misalign.outputs.plot import plot_batch, plot_play
from misalign.outputs.report import report, to_json

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
