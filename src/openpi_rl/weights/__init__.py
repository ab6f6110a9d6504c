"""Policy weights between the roles: versions on disk (`versions`: write, verify, restore), the
notices that announce them from the learner to the servers (`notices`), and the operator's
pins and pauses (`operator_state`)."""

from openpi_rl.weights.notices import AUTO, LatestVersion, Publisher, ServerWatch, notice_endpoint
from openpi_rl.weights.versions import (
    CorruptVersion,
    VersionCheckpoints,
    restore_version,
    restore_weights,
    verify_version,
)

__all__ = [
    "AUTO",
    "CorruptVersion",
    "LatestVersion",
    "Publisher",
    "ServerWatch",
    "VersionCheckpoints",
    "notice_endpoint",
    "restore_version",
    "restore_weights",
    "verify_version",
]
