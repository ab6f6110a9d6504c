"""The policy server's knobs: `ServeOptions` (`[serve]`: the socket, batching, limits, CURVE)
and `SwapOptions` (`[swap]`: hot-swap, heartbeats, admin, automatic rollback). Frozen
dataclasses that tyro and the TOML file read; `server.py` and `swapper.py` re-export them.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from openpi_rl.secret import SECRET
from openpi_rl.weights.notices import AUTO


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """Serving knobs (the model and replay are configured beside them)."""

    endpoint: str = "tcp://127.0.0.1:5555"
    """The ZMQ ROUTER address robots connect to; loopback unless configured (guarantee 7)."""
    max_batch: int = 8
    """Requests served by one model call at most (batches are padded to a few fixed sizes)."""
    max_wait_us: int = 0
    """Continuous batching: a request is served as soon as the model is free, together with
    every request that arrived while it ran. A wait > 0 holds a lone request this long for
    company (worth it only when robots are in lockstep and the model's cost barely grows with
    the batch); 0 keeps a lone robot at the transport's floor."""
    expected_wait_us: int = 3000
    """Predictive hold (batching.py): a batch waits for robots whose next request is due within
    this long and within one model call (a robot arriving later than that is better served on
    its own). A lone robot never waits. 0: off."""
    max_message_bytes: int = 16 * 1024 * 1024
    """A request larger than this is answered `too_large` unread (libzmq drops frames past 4x
    this, without a reply)."""
    seed: int = 0
    """Unused: the sampling key comes from the policy version and a call counter."""
    warm_key_sets: tuple[tuple[str, ...], ...] = ()
    """Observation key sets to compile before ready, besides all keys and the required ones
    (e.g. [["image", "state"]] when robots leave an optional key out)."""
    dedupe_window: int = 4096  # replies kept to answer a resent request without serving it twice
    rate_limit_per_s: float = 2000.0
    """Requests per second per connection (ROUTER identity): a robot at 50 Hz uses 2-3 % of it;
    a flood past it is answered `overloaded` before decoding. 0: no limit."""
    rate_limit_burst: int = 2000
    """Requests a connection may send back to back before `rate_limit_per_s` applies (the
    token bucket's size)."""
    handshake_timeout_s: float = 5.0  # drop peers that never finish the ZMQ handshake
    curve_secret_key_file: str | None = None
    """CURVE (guarantee 7): the server's `.key_secret` file from `openpi-rl keys generate`;
    None: plaintext."""
    curve_allowed_clients_dir: str | None = None
    """CURVE: the directory of the robots' public `.key` files; a robot whose key is not there
    is refused at the handshake."""
    max_robots: int = 4096
    """Robots remembered (robots.py); the least recently heard from is forgotten first."""
    report_window: int = 1024
    """How many of a robot's latest transitions a report may still name."""
    reward_range: tuple[float, float] = (-1000.0, 1000.0)
    """A report's reward is clamped into this range (counted): one absurd finite reward
    (1e308: two of them sum to inf) must not turn the learner's advantages into NaN."""
    rcvhwm: int = 16
    """ZMQ receive queue per connection: a robot has one request in flight (two while
    resending); past it libzmq drops."""
    sndhwm: int = 64
    """ZMQ send queue per connection; past it libzmq refuses to queue a reply."""


@dataclasses.dataclass(frozen=True)
class SwapOptions:
    """Hot-swap, heartbeats, admin and automatic rollback (`[swap]` in serve.toml)."""

    # The learner's PUB; "auto": the private ipc socket of checkpoint_dir; None: no swaps.
    learner_endpoint: str | None = AUTO
    checkpoint_dir: str | None = "checkpoints"  # versions load from here only; None: no swaps
    learner_curve_public_key_file: str | None = None  # the learner's CURVE public key (.key)
    max_version_ahead: int = 100  # refuse a notice this far past the newest version on disk
    peer_timeout_s: float = 1.5  # a learner silent this long shows dead (it beats every 0.5 s)
    admin_endpoint: str = "tcp://127.0.0.1:5559"  # ZMQ ROUTER for `openpi-rl admin`
    admin_token: Annotated[str | None, SECRET] = None  # None: $OPENPI_RL_ADMIN_TOKEN, else off
    auto_rollback_episodes: int = 0  # K: episodes per version to compare; 0: off
    auto_rollback_margin: float = 0.1  # roll back when mean return drops by more than this
    nice: int = 10  # the restore's niceness (Linux; the worker also runs SCHED_IDLE); 0: none
    restore_in_worker: bool = True  # orbax restores in a worker process; False: in-process
    restore_timeout_s: float = 120.0  # a worker silent this long is killed and restarted
    check_delta_call: bool = False
    """A delta version (LoRA over the live base) is checked on its own arrays (finite) by
    default; True: also by a model call, as a full version is (a decode's worth of device time
    per swap, which on a LoRA run is most of the swap)."""


__all__ = ["ServeOptions", "SwapOptions"]
