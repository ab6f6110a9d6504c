"""The learner daemon: PPO on the replay's data, versioned orbax checkpoints, weight publishing.

Reads complete, rewarded episodes (and segments of long ones) from the replay, trains the
policy with the library's fused PPO update (data-parallel over local devices), checkpoints
one version per update and announces it on a ZMQ PUB socket. Talks to: the replay (read-only,
plus the `consumed` flag) and the policy servers (they subscribe to the notices and load the
published path with `restore_version`).
"""

import importlib
from typing import Any

# Lazy (PEP 562): the supervisor (`openpi-rl daemon`) imports this package but only starts
# processes; importing the learner's modules would load JAX, flax and orbax into it for nothing.
_EXPORTS = {
    "ChunkBatch": "batch",
    "build_batch": "batch",
    "chunk_gae": "batch",
    "VersionCheckpoints": "checkpoints",
    "build_actor_critic": "checkpoints",
    "restore_version": "checkpoints",
    "LEARNER_PPO_DEFAULTS": "learner",
    "Learner": "learner",
    "LearnerConfig": "learner",
    "UpdateResult": "learner",
    "LatestVersion": "publish",
    "Publisher": "publish",
    "ReplaySource": "replay_source",
    "Segment": "replay_source",
    "Step": "replay_source",
    "split_episode": "replay_source",
    "DataParallel": "update",
    "learn_step": "update",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


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
