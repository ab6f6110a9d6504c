"""Reward bridge: operators' feedback from teleop pendants (the page it serves, keypads, HTTP
scripts) becomes reward events on the right transitions of the replay.

Owns the WebSocket + HTTP endpoints, the pendant page (`static/pendant.html`), credit
assignment (`credit.py`, a rule per kind) and the query mode for the seed's
`HumanRewardWebSocket` / `HumanRewardHTTP`. Talks to: the replay (writes reward events only,
next to the policy server that owns the transitions; reads the live status), pendants.
"""

from openpi_rl.reward_bridge.config import BridgeConfig
from openpi_rl.reward_bridge.credit import (
    KINDS,
    Credit,
    CreditRule,
    Feedback,
    StepRewardRule,
    VerdictRule,
    default_rules,
)
from openpi_rl.reward_bridge.metrics import BridgeMetrics
from openpi_rl.reward_bridge.serve import serve
from openpi_rl.reward_bridge.server import RewardBridge

__all__ = [
    "KINDS",
    "BridgeConfig",
    "BridgeMetrics",
    "Credit",
    "CreditRule",
    "Feedback",
    "RewardBridge",
    "StepRewardRule",
    "VerdictRule",
    "default_rules",
    "serve",
]
