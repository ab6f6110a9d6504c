"""openpi's `norm_stats.json` and its normalisations, numpy only.

The file (`src/openpi/shared/normalize.py`): `{"norm_stats": {key: {"mean", "std", "q01",
"q99"}}}`, written next to a checkpoint's params under `assets/<asset_id>/`. The transforms
(`src/openpi/transforms.py` Normalize / Unnormalize): z-score, or quantile onto [-1, 1]. Used
for robot state and actions; imports nothing from the rest of the project.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping

import numpy as np

from openpi_rl.models.pi0fast_tokens import require_file

NORM_STATS_FILE = "norm_stats.json"
# openpi adds this to the denominator of both normalisations.
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one key in openpi's norm_stats.json (float64 [D] each)."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None


def load_norm_stats(path: str | pathlib.Path) -> dict[str, NormStats]:
    """openpi's norm_stats.json (a file, or the directory holding it) -> {key: NormStats}.

    The layout is `{"norm_stats": {key: {"mean": [...], "std": [...], "q01": [...] | null,
    "q99": [...] | null}}}`, keys such as "state" and "actions" (openpi writes it next to a
    checkpoint's params under assets/<asset_id>/).
    """
    path = require_file(
        path,
        "openpi norm stats",
        f"expected {NORM_STATS_FILE} (openpi writes it under <checkpoint>/assets/<asset_id>/)",
        name=NORM_STATS_FILE,
    )
    data = json.loads(path.read_text())
    if not isinstance(data, Mapping) or not isinstance(data.get("norm_stats"), Mapping):
        raise ValueError(
            f'{path}: expected {{"norm_stats": {{key: stats}}}}, got {type(data).__name__}'
        )
    out = {}
    for key, entry in data["norm_stats"].items():
        for field in ("mean", "std"):
            if field not in entry:
                raise ValueError(
                    f"{path}: norm_stats[{key!r}]: expected a {field!r} list, got keys {sorted(entry)}"
                )

        def arr(name, entry=entry):
            value = entry.get(name)
            return None if value is None else np.asarray(value, dtype=np.float64)

        out[key] = NormStats(mean=arr("mean"), std=arr("std"), q01=arr("q01"), q99=arr("q99"))
    return out


def save_norm_stats(path: str | pathlib.Path, stats: Mapping[str, NormStats]) -> None:
    """Write openpi's norm_stats.json layout (a directory gets norm_stats.json inside)."""
    path = pathlib.Path(path)
    if path.suffix != ".json":
        path = path / NORM_STATS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)

    def lst(a):
        return None if a is None else np.asarray(a, dtype=np.float64).tolist()

    layout = {
        "norm_stats": {
            k: {"mean": lst(s.mean), "std": lst(s.std), "q01": lst(s.q01), "q99": lst(s.q99)}
            for k, s in stats.items()
        }
    }
    path.write_text(json.dumps(layout, indent=2))


def _need_quantiles(stats: NormStats) -> tuple[np.ndarray, np.ndarray]:
    if stats.q01 is None or stats.q99 is None:
        raise ValueError("norm stats: quantile normalisation needs q01 and q99, got None")
    return stats.q01, stats.q99


def normalize(x: np.ndarray, stats: NormStats, use_quantiles: bool = False) -> np.ndarray:
    """openpi's Normalize for one key: x [..., D'] with D' <= D (stats are cut to D').

    z-score: (x - mean) / (std + 1e-6). Quantile: (x - q01) / (q99 - q01 + 1e-6) * 2 - 1.
    """
    x = np.asarray(x)
    d = x.shape[-1]
    if use_quantiles:
        q01, q99 = _need_quantiles(stats)
        q01, q99 = q01[..., :d], q99[..., :d]
        return (x - q01) / (q99 - q01 + NORM_EPS) * 2.0 - 1.0
    return (x - stats.mean[..., :d]) / (stats.std[..., :d] + NORM_EPS)


def unnormalize(x: np.ndarray, stats: NormStats, use_quantiles: bool = False) -> np.ndarray:
    """openpi's Unnormalize for one key: x [..., D'] with D' >= D (extra dims pass through).

    z-score: x * (std + 1e-6) + mean, stats padded with mean 0, std 1. Quantile:
    (x + 1) / 2 * (q99 - q01 + 1e-6) + q01 on the first D dims, the rest unchanged.
    """
    x = np.asarray(x)
    d_x = x.shape[-1]
    if use_quantiles:
        q01, q99 = _need_quantiles(stats)
        d = q01.shape[-1]
        if d < d_x:
            head = (x[..., :d] + 1.0) / 2.0 * (q99 - q01 + NORM_EPS) + q01
            return np.concatenate([head, x[..., d:]], axis=-1)
        return (x + 1.0) / 2.0 * (q99 - q01 + NORM_EPS) + q01
    mean, std = stats.mean, stats.std
    if mean.shape[-1] < d_x:
        pad = d_x - mean.shape[-1]
        mean = np.concatenate([mean, np.zeros(pad)], axis=-1)
        std = np.concatenate([std, np.ones(pad)], axis=-1)
    return x * (std + NORM_EPS) + mean
