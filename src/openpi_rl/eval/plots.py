"""The learning curve of a run as a PNG (matplotlib's Agg canvas: no display, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openpi_rl.eval.stats import mean_interval


def learning_curve_png(
    steps: Sequence[int],
    returns: Sequence[float],
    versions: Sequence[int],
    path: str | Path,
    title: str = "learning curve",
    window: int = 20,
) -> Path:
    """Two panels from N finished episodes: return against environment steps at the episode's
    end (each episode a dot, the mean of the last `window` a line), and the mean return per
    policy version that started the episode, with 95 % t intervals. steps, returns, versions:
    [N]. Returns `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps_a, ret_a, ver_a = (np.asarray(x) for x in (steps, returns, versions))
    if not (len(steps_a) == len(ret_a) == len(ver_a)):
        raise ValueError(f"steps, returns, versions: expected equal lengths, got "
                         f"{len(steps_a)}, {len(ret_a)}, {len(ver_a)}")  # fmt: skip
    if len(ret_a) == 0:
        raise ValueError("no episodes: nothing to plot")
    order = np.argsort(steps_a, kind="stable")
    steps_a, ret_a, ver_a = steps_a[order], ret_a[order], ver_a[order]
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.scatter(steps_a, ret_a, s=6, alpha=0.35, c=ver_a, cmap="viridis", label="episode")
    cumsum = np.cumsum(np.insert(ret_a.astype(np.float64), 0, 0.0))
    k = np.minimum(np.arange(1, len(ret_a) + 1), window)
    end = np.arange(1, len(ret_a) + 1)
    rolling = (cumsum[end] - cumsum[end - k]) / k
    left.plot(steps_a, rolling, color="C3", lw=2, label=f"mean of last {window}")
    left.set(xlabel="environment steps (all robots)", ylabel="episode return", title=title)
    left.legend(loc="upper left")
    numbers = np.unique(ver_a)
    stats = [mean_interval(ret_a[ver_a == v]) for v in numbers]
    means = np.array([s[0] for s in stats])
    low = np.array([s[1] for s in stats])
    high = np.array([s[2] for s in stats])
    # A version that started two episodes has a t interval wider than any return: clip the bars
    # to the returns seen, and use the same y range as the left panel.
    lo, hi = float(ret_a.min()), float(ret_a.max())
    low = np.clip(np.where(np.isnan(low), means, low), lo, hi)  # one episode: no bar
    high = np.clip(np.where(np.isnan(high), means, high), lo, hi)
    err = np.maximum(np.stack([means - low, high - means]), 0.0)
    right.errorbar(numbers, means, yerr=err, fmt="o-", ms=3, color="C0", ecolor="C0", elinewidth=0.8,
                   capsize=2)  # fmt: skip
    right.set(xlabel="policy version (started the episode)",
              ylabel="mean return (95 % t interval, clipped)", title="mean return per version",
              ylim=left.get_ylim())  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
