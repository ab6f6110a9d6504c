"""The learning daemon (`openpi-rl learn`): PPO on the replay's data, one version per update.

Reads complete, rewarded episodes (and segments of long ones) from the replay, trains the
policy with the library's fused PPO update (data-parallel over the devices, weights and
optimizer state sharded past a size: update.py, sharding.py, distributed.py), saves one
version per update (`openpi_rl.weights`) and announces it to the policy servers. Talks to: the
replay (read-only, plus the `consumed` flag) and the servers (version notices; their health).
"""

from openpi_rl.daemon.batch import ChunkBatch, build_batch, chunk_gae
from openpi_rl.daemon.config import LEARNER_PPO_DEFAULTS, LearnerConfig
from openpi_rl.daemon.distributed import DistributedConfig
from openpi_rl.daemon.learner import Learner, UpdateResult
from openpi_rl.daemon.replay_source import ReplaySource, Segment, Step, split_episode
from openpi_rl.daemon.update import DataParallel, learn_step

__all__ = [
    "LEARNER_PPO_DEFAULTS",
    "ChunkBatch",
    "DataParallel",
    "DistributedConfig",
    "Learner",
    "LearnerConfig",
    "ReplaySource",
    "Segment",
    "Step",
    "UpdateResult",
    "build_batch",
    "chunk_gae",
    "learn_step",
    "split_episode",
]
