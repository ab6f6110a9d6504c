"""The learner's learning curves: what each update and each policy version did, written through
`openpi_rl.curves.CurveLogger` (TensorBoard, optionally W&B) into `<checkpoint_dir>/tensorboard`.

Per learn step (x: learn steps, published, refused and critic warm-up ones alike): PPO's
losses, KL, clip fraction and explained variance, the learning rate, the update's wall time,
the data's age in versions, and the episodes that ended in the batch (return, length in chunks,
success: an operator's `success` verdict on the last chunk).

Per version (x: the version that served an episode's last chunk): the mean return, length and
success rate of its episodes. A version's tally is written once no more of its data can come
(it is more than `max_policy_lag` versions old), and what is still open when the learner
closes.

An episode's return is the sum of the chunk rewards the learner took (a long episode arrives
as several segments over several updates; chunks dropped as stale are not in it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from openpi_rl.curves import PPO_NAMES, CurveLogger, config_dict, mean
from openpi_rl.daemon.batch import ChunkBatch
from openpi_rl.daemon.config import LearnerConfig
from openpi_rl.daemon.replay_source import Segment

MAX_OPEN_EPISODES = 10_000  # episodes whose end has not come yet (oldest forgotten past this)


@dataclasses.dataclass(frozen=True)
class Episode:
    ret: float  # sum of its chunk rewards
    length: int  # chunks
    success: bool
    version: int  # the policy version that served its last chunk


class EpisodeTally:
    """Sums segments into episodes as the learner takes them (in serving order)."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], tuple[float, int]] = {}

    def add(self, segments: Sequence[Segment]) -> list[Episode]:
        """The episodes that the segments end (a segment with no bootstrap ends its episode)."""
        ended = []
        for seg in segments:
            key = (seg.robot_id, seg.episode_id)
            ret, length = self._open.pop(key, (0.0, 0))
            ret += float(sum(s.reward for s in seg.steps))
            length += len(seg)
            if seg.bootstrap is None:
                last = seg.steps[-1]
                ended.append(Episode(ret, length, last.success, last.row.policy_version))
            else:
                self._open[key] = (ret, length)
                if len(self._open) > MAX_OPEN_EPISODES:
                    del self._open[next(iter(self._open))]
        return ended


def episode_scalars(episodes: Sequence[Episode], prefix: str) -> dict[str, float | None]:
    """Mean return, length and success rate of `episodes` (None each when there are none)."""
    return {
        f"{prefix}/episodic_return": mean([e.ret for e in episodes]),
        f"{prefix}/episodic_length": mean([float(e.length) for e in episodes]),
        f"{prefix}/success_rate": mean([float(e.success) for e in episodes]),
    }


def data_age(batch: ChunkBatch, version: int) -> float | None:
    """Mean of (version - serving version) over the batch's real chunks: 0 is on-policy."""
    valid = np.asarray(batch.valid, bool)
    if not valid.any():
        return None
    return float(np.mean(version - np.asarray(batch.versions)[valid]))


class LearnerCurves:
    """The learner's curve writer: `record` after every learn step, `close` at the end."""

    def __init__(self, config: LearnerConfig):
        self.config = config
        self.logger = CurveLogger(
            config.curves, config.checkpoint_dir, run_config=config_dict(config), name="learn"
        )
        self.episodes = EpisodeTally()
        self._by_version: dict[int, list[Episode]] = {}

    def record(
        self,
        step: int,
        metrics: dict[str, float],
        version: int,
        segments: Sequence[Segment],
        batch: ChunkBatch,
        trained_on: int,
        seconds: float,
    ) -> None:
        """One learn step's scalars at x = step. metrics: the update's (update.py's names);
        version: the learner's version after it; trained_on: before it (what the data's age is
        measured against)."""
        if not self.logger.enabled:
            return
        ended = self.episodes.add(segments)
        values: dict[str, float | None] = {
            PPO_NAMES.get(k, f"losses/{k}"): v for k, v in metrics.items() if k in PPO_NAMES
        }
        values.update(episode_scalars(ended, "charts"))
        values["losses/update_kl"] = metrics.get("update_kl")
        values["charts/learning_rate"] = self.config.ppo.lr
        values["charts/data_age_versions"] = data_age(batch, trained_on)
        values["charts/version"] = version
        values["time/update_seconds"] = seconds
        self.logger.scalars(step, values)
        for e in ended:
            self._by_version.setdefault(e.version, []).append(e)
        # A version this old serves no more training data (it is stale): its tally is final.
        min_version = version - self.config.max_policy_lag
        for version in sorted(v for v in self._by_version if v < min_version):
            self._write_version(version)

    def _write_version(self, version: int) -> None:
        episodes = self._by_version.pop(version)
        values = episode_scalars(episodes, "version")
        values["version/episodes"] = len(episodes)
        self.logger.scalars(version, values, axis="policy_version")

    def close(self) -> None:
        """Write the open versions' tallies and flush (idempotent)."""
        if self.logger.enabled:
            for version in sorted(self._by_version):
                self._write_version(version)
        self.logger.close()
