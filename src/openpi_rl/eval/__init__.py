"""Evaluation of published versions (`openpi-rl eval`): episodes of a version on a gymnasium
task, greedy or sampled (`episodes`), success rate and mean return with confidence intervals
(`stats`), episode videos and two versions side by side (`video`), and a run's learning curve
as a PNG (`plots`). Reads versions from disk (weights); talks to no other role."""

from openpi_rl.eval.episodes import (
    EpisodeResult,
    load_version,
    run_episode,
    success_rule,
    versions_in,
)
from openpi_rl.eval.plots import learning_curve_png
from openpi_rl.eval.run import EvalConfig, EvalReport, eval_main, evaluate, report_table
from openpi_rl.eval.stats import Summary, mean_interval, summarize, wilson_interval
from openpi_rl.eval.video import VideoWriter, headless_gl, read_frames, side_by_side

__all__ = [
    "EpisodeResult",
    "EvalConfig",
    "EvalReport",
    "Summary",
    "VideoWriter",
    "eval_main",
    "evaluate",
    "headless_gl",
    "learning_curve_png",
    "load_version",
    "mean_interval",
    "read_frames",
    "report_table",
    "run_episode",
    "side_by_side",
    "success_rule",
    "summarize",
    "versions_in",
    "wilson_interval",
]
