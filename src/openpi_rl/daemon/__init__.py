"""The learner daemon: PPO on the replay's data, versioned orbax checkpoints, weight publishing.

Reads complete, rewarded episodes (and segments of long ones) from the replay, trains the
policy with the library's fused PPO update (data-parallel over local devices), checkpoints
one version per update and announces it on a ZMQ PUB socket. Talks to: the replay (read-only,
plus the `consumed` flag) and the policy servers (they subscribe to the notices and load the
published path with `restore_version`).
"""

from openpi_rl.daemon.batch import ChunkBatch, build_batch, chunk_gae
from openpi_rl.daemon.checkpoints import VersionCheckpoints, build_actor_critic, restore_version
from openpi_rl.daemon.learner import LEARNER_PPO_DEFAULTS, Learner, LearnerConfig, UpdateResult
from openpi_rl.daemon.publish import LatestVersion, Publisher
from openpi_rl.daemon.replay_source import ReplaySource, Segment, Step, split_episode
from openpi_rl.daemon.update import DataParallel, learn_step

__all__ = [
    "LEARNER_PPO_DEFAULTS",
    "ChunkBatch",
    "DataParallel",
    "LatestVersion",
    "Learner",
    "LearnerConfig",
    "Publisher",
    "ReplaySource",
    "Segment",
    "Step",
    "UpdateResult",
    "VersionCheckpoints",
    "build_actor_critic",
    "build_batch",
    "chunk_gae",
    "learn_step",
    "restore_version",
    "split_episode",
]
