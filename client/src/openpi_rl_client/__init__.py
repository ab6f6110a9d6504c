"""openpi-rl robot client: talks to the policy server with numpy, pyzmq and msgpack only.

- :mod:`~openpi_rl_client.wire`: the msgpack + numpy codec both ends use (openpi-client's scheme).
- :mod:`~openpi_rl_client.protocol`: message shapes, framing, error codes, request validation.
- :mod:`~openpi_rl_client.client`: ``PolicyClient``, a lazy-pirate ZMQ DEALER client.
- :mod:`~openpi_rl_client.broker`: ``ActionChunkBroker``, one action per control tick with the
  next chunk fetched in the background.
"""

from openpi_rl_client.broker import ActionChunkBroker
from openpi_rl_client.client import InferResult, PolicyClient, PolicyTimeout, ServerError
from openpi_rl_client.protocol import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    ProtocolError,
    check_observation,
    error_reply,
    validate_request,
)
from openpi_rl_client.wire import DEFAULT_MAX_BYTES, WireError, packb, unpackb

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ERROR_CODES",
    "PROTOCOL_VERSION",
    "ActionChunkBroker",
    "InferResult",
    "PolicyClient",
    "PolicyTimeout",
    "ProtocolError",
    "ServerError",
    "WireError",
    "check_observation",
    "error_reply",
    "packb",
    "unpackb",
    "validate_request",
]
