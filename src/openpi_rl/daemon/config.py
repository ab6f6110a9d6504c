"""`LearnerConfig`: everything `openpi-rl learn` reads (the `[learn]` table, its flags), and
the learner's PPO defaults. The learner (learner.py) is built from it; the service's file
(service/config.py) parses it.
"""

from __future__ import annotations

import dataclasses

from openpi_rl.curves import CurvesConfig
from openpi_rl.daemon.distributed import DistributedConfig
from openpi_rl.models.choice import ModelChoice
from openpi_rl.models.finetune import Finetune
from openpi_rl.models.gaussian_mlp import GaussianMLPConfig
from openpi_rl.rl.ppo import PPOConfig
from openpi_rl.weights.notices import AUTO

# The library's PPO defaults (made for fine-tuning a large pretrained policy) with operator
# take-overs cloned at full weight.
LEARNER_PPO_DEFAULTS = PPOConfig(bc_coef=1.0)


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Everything `openpi-rl learn` needs. `model`, `value_hidden` and `seed` must be the
    server's (its ServeConfig), so version 0 is the same weights on both sides and a published
    version restores into the server's ActorCritic."""

    model: ModelChoice = GaussianMLPConfig()
    value_hidden: tuple[int, ...] = (64, 64)  # the value head's hidden widths (the server's)
    seed: int = 0  # seed of version 0's weights (the server's)
    replay_dir: str = "replay"  # the policy server's replay, read only
    checkpoint_dir: str = "checkpoints"  # published versions; the servers load them from here
    keep_versions: int = 10
    """Newest versions kept on disk, plus the pinned version, the rollback target and the base
    every kept LoRA version refers to."""
    finetune: Finetune = "auto"
    """What trains: "full" (every weight), "lora" (LoRA adapters + value head; the base stays
    frozen, each version after 0 holds only those arrays and names version 0 as its base, so a
    swap moves megabytes) or "auto" ("lora" when the model has LoRA weights, a *_lora variant)."""
    critic_warmup_updates: int = 0
    """Value-only updates first (piRL's critic warm-up): the fresh value head learns the returns
    before the policy moves. Not published (the policy is unchanged); saved aside, so a restart
    goes on counting."""
    ppo: PPOConfig = LEARNER_PPO_DEFAULTS
    segment_length: int = 32  # T: chunks per GAE column; long episodes are cut to this
    batch_segments: int = 64  # S: columns per update (rounded up to a multiple of the devices)
    min_transitions: int = 256  # wait until this many chunks can be taken
    max_policy_lag: int = 2  # drop chunks served by a policy more than this many versions old
    max_kl: float | None = 0.1  # refuse to publish an update moving the policy further (None: off)
    settle_s: float = 1.0  # take an open episode's chunks only once this old (late reports)
    poll_interval_s: float = 0.5  # wait this long (at most 0.25 s) when no update was ready
    publish_endpoint: str = AUTO
    """ZMQ PUB for version notices + heartbeat. "auto": an ipc socket in a private directory
    beside the checkpoints (publish.py); across hosts, tcp:// with a CURVE key."""
    publish_curve_secret_key_file: str | None = None  # `openpi-rl keys generate`'s .key_secret
    heartbeat_s: float = 0.5  # the PUB beats this often, so the servers see the learner alive
    server_endpoints: tuple[str, ...] = ("tcp://127.0.0.1:5555",)
    """Policy servers whose `health` the learner watches (their heartbeat to it, and the
    operator's pause switch)."""
    server_timeout_s: float = 1.5  # a server silent this long shows down
    metrics_host: str = "127.0.0.1"  # where Prometheus /metrics listens
    metrics_port: int | None = 9102  # Prometheus /metrics; None: off
    max_updates: int | None = None  # stop after this many published updates (None: run on)
    curves: CurvesConfig = CurvesConfig()
    """Learning curves (daemon/curves.py): TensorBoard files in <checkpoint_dir>/tensorboard by
    default; W&B with `wandb = true`."""
    distributed: DistributedConfig = DistributedConfig()
    """Devices and processes (`[learn.distributed]`, distributed.py): the coordinator, process
    count and id of a learner run as several processes; CPU devices per process; the size from
    which weights and optimizer state are sharded across devices."""
