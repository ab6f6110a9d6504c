"""`openpi-rl.toml`: one file for the whole service (the daemon and every systemd unit).

    replay_dir = "/var/lib/openpi-rl/replay"          # shared settings: each fills the field
    checkpoint_dir = "/var/lib/openpi-rl/checkpoints" # of the same name in every role that
    publish_endpoint = "tcp://127.0.0.1:5557"         # has one, unless the role's table sets it
    [model]                                           # shared too: server and learner must
    kind = "gaussian_mlp"                             # build the same ActorCritic
    [serve]   ... ServeConfig's keys (`[serve.serve]` holds the ZMQ endpoint)
    [bridge]  ... BridgeConfig's keys
    [learn]   ... LearnerConfig's keys
    [daemon]  ... DaemonConfig's keys (restart back-off, watchdogs, the daemon's metrics)
    [gpu]     ... GpuConfig's keys (the device's memory, each role's share of it)

A role reads its part with `openpi-rl serve --config openpi-rl.toml --section serve`; the
daemon starts its children exactly so, and the systemd units do the same. Whatever fields a
role's config gains are set in its table: the daemon passes the tables through untouched.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from openpi_rl import config_file

ROLES = ("serve", "bridge", "learn")

# Settings the three processes must agree on. Each fills the same-named field of every role
# whose config has it; a role's own table wins. `publish_endpoint` is the learner's PUB address
# and therefore also where the server's weight subscriber connects.
SHARED = ("replay_dir", "checkpoint_dir", "publish_endpoint", "model", "value_hidden", "seed")
# A shared key may sit elsewhere in a role's config: (role, shared key) -> dotted field path.
ALIASES: dict[tuple[str, str], str] = {
    ("serve", "publish_endpoint"): "swap.learner_endpoint",
    ("serve", "checkpoint_dir"): "swap.checkpoint_dir",
}

# Defaults that differ inside one service from each role's stand-alone default: the learner's
# stand-alone metrics port is the bridge's (9102), so next to it the learner takes 9103.
ROLE_DEFAULTS: dict[str, dict[str, Any]] = {"learn": {"metrics_port": 9103}}

# exit status of a role whose configuration is wrong (sysexits' EX_CONFIG); the daemon and
# systemd (`RestartPreventExitStatus=78`) do not restart it.
EX_CONFIG = 78


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    """`[daemon]`: how the supervisor runs the roles."""

    roles: tuple[str, ...] = ROLES
    """Which roles to run (each as its own process)."""
    restart_backoff_s: float = 1.0
    """Delay before restarting a crashed child; doubles with each crash in a row."""
    restart_backoff_max_s: float = 60.0
    healthy_after_s: float = 60.0
    """A child up this long is healthy again: its next crash restarts after restart_backoff_s."""
    stop_timeout_s: float = 90.0
    """SIGTERM, then SIGKILL after this long (a learner finishes its update first)."""
    start_timeout_s: float = 900.0
    """Bridge and learner start once the server is READY (it creates the replay), or after this."""
    watchdog_s: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"serve": 30.0, "bridge": 30.0, "learn": 900.0}
    )
    """A ready child silent this long (no WATCHDOG=1) is killed and restarted. The learner pings
    between updates, so its limit must cover the longest update (first compilation included)."""
    nice: dict[str, int] = dataclasses.field(default_factory=lambda: {"learn": 10})
    """Niceness added to a child's: the server keeps the daemon's priority, the learner yields
    (as the units' Nice=). A negative value needs CAP_SYS_NICE."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9104
    """The daemon's own /metrics (child up/ready, restarts by reason); None: off."""


# JAX's CUDA backend reads these when it starts (JAX's "GPU memory allocation" page).
ENV_MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
ENV_PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
ENV_ALLOCATOR = "XLA_PYTHON_CLIENT_ALLOCATOR"
ENV_DEVICES = "CUDA_VISIBLE_DEVICES"
JAX_MEM_FRACTION = 0.75  # the share of the device a JAX process takes when none is set
ALLOCATORS = ("bfc", "platform", "cuda_async")


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """`[gpu]`: the accelerator's memory and each role's share of it, for a policy server and a
    learner on one GPU. Each setting is an environment variable of JAX's CUDA backend, set in
    the role's process before JAX starts: by the daemon for its children, and by `openpi-rl
    ROLE --config FILE --section ROLE` for itself (what the systemd units run); the file's
    value replaces one in the environment. No `[gpu]` table: nothing is set (JAX's defaults)."""

    memory_gib: float | None = None
    """The device's memory in GiB (nvidia-smi's total MiB / 1024: 79.6 on an H100 80GB).
    `openpi-rl check` compares each role's share of it with what its model needs. None: no
    comparison."""
    memory_fraction: dict[str, float] = dataclasses.field(default_factory=dict)
    """Each role's share of the device (`{ serve = 0.25, learn = 0.6 }`), the most its JAX
    allocator takes: XLA_PYTHON_CLIENT_MEM_FRACTION. A role left out gets JAX's 0.75. The
    roles on one device must add up to at most 1."""
    preallocate: bool | None = None
    """false: a role takes its share as it needs it rather than all at start (two processes
    on one GPU): XLA_PYTHON_CLIENT_PREALLOCATE. None: JAX's default (true)."""
    allocator: str | None = None
    """XLA_PYTHON_CLIENT_ALLOCATOR: "bfc" (JAX's default), "cuda_async", or "platform" (takes
    exactly what is in use and frees it: no share applies; slow, for finding what runs out).
    None: JAX's default."""
    visible_devices: dict[str, str] = dataclasses.field(default_factory=dict)
    """The GPUs each role sees (`{ serve = "0", learn = "1" }`): CUDA_VISIBLE_DEVICES; "" hides
    them all (the role computes on the CPU). A role left out sees what the daemon sees."""

    def env(self, role: str) -> dict[str, str]:
        """The environment variables `role`'s process gets (empty with the defaults)."""
        env = {}
        if role in self.memory_fraction:
            env[ENV_MEM_FRACTION] = f"{self.memory_fraction[role]:g}"
        if self.preallocate is not None:
            env[ENV_PREALLOCATE] = "true" if self.preallocate else "false"
        if self.allocator is not None:
            env[ENV_ALLOCATOR] = self.allocator
        if role in self.visible_devices:
            env[ENV_DEVICES] = self.visible_devices[role]
        return env

    def validate(self) -> None:
        """ValueError naming the key (`gpu.memory_fraction.serve: ...`)."""
        if self.memory_gib is not None and self.memory_gib <= 0:
            raise ValueError(f"gpu.memory_gib: expected > 0, got {self.memory_gib}")
        for key in ("memory_fraction", "visible_devices"):
            bad = sorted(set(getattr(self, key)) - set(ROLES))
            if bad:
                raise ValueError(f"gpu.{key}: {bad} not in {list(ROLES)}")
        for role, fraction in self.memory_fraction.items():
            if not 0 < fraction <= 1:
                raise ValueError(f"gpu.memory_fraction.{role}: expected 0 < x <= 1, got {fraction}")
        if self.allocator is not None and self.allocator not in ALLOCATORS:
            raise ValueError(
                f"gpu.allocator: expected one of {list(ALLOCATORS)}, got {self.allocator!r}"
            )


@dataclasses.dataclass(frozen=True)
class ServiceFile:
    """A parsed openpi-rl.toml: shared settings, the daemon's table and each role's raw table."""

    path: Path
    raw: dict[str, Any]
    daemon: DaemonConfig
    log_json: bool | None  # None: JSON lines unless stderr is a terminal
    gpu: GpuConfig = GpuConfig()

    @classmethod
    def load(cls, path: str | Path) -> ServiceFile:
        """Parse and check the daemon's own keys; raises ValueError naming the key."""
        path = Path(path)
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        known = {*SHARED, *ROLES, "daemon", "gpu", "log_json"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
        for role in ROLES:
            if not isinstance(raw.get(role, {}), dict):
                raise ValueError(f"{role}: expected a table [{role}]")
        daemon = config_file.from_dict(DaemonConfig, raw.get("daemon", {}), "daemon.")
        bad = sorted(set(daemon.roles) - set(ROLES))
        if bad:
            raise ValueError(f"daemon.roles: {bad} not in {list(ROLES)}")
        log_json = raw.get("log_json")
        if log_json is not None and not isinstance(log_json, bool):
            raise ValueError(f"log_json: expected bool, got {log_json!r}")
        gpu = config_file.from_dict(GpuConfig, raw.get("gpu", {}), "gpu.")
        gpu.validate()
        return cls(path.absolute(), raw, daemon, log_json, gpu)

    def role_env(self, role: str) -> dict[str, str]:
        """The environment `role`'s process needs before JAX starts (`[gpu]`)."""
        return self.gpu.env(role)

    def role_table(self, role: str) -> dict[str, Any]:
        """The role's table with the daemon's defaults and the shared settings filled in."""
        cls = role_class(role)
        base: dict[str, Any] = {}
        for key, value in ROLE_DEFAULTS.get(role, {}).items():
            _put(base, cls, key, value)
        for key in SHARED:
            if key in self.raw:
                value = self.raw[key]
                if key == "publish_endpoint" and role != "learn":
                    value = connect_address(value)  # the learner binds it, the others connect
                _put(base, cls, ALIASES.get((role, key), key), value)
        serve_endpoint = self.raw.get("serve", {}).get("serve", {}).get("endpoint")
        if role == "learn" and serve_endpoint:  # the learner watches the server's health
            _put(base, cls, "server_endpoints", [connect_address(serve_endpoint)])
        return _merge(base, self.raw.get(role, {}))

    def role_config(self, role: str) -> Any:
        """The role's frozen config (ServeConfig, BridgeConfig or LearnerConfig); raises
        ValueError naming the key (`serve.model.obs_dim: ...`)."""
        return config_file.from_dict(role_class(role), self.role_table(role), f"{role}.")


def connect_address(endpoint: str) -> str:
    """Where a peer connects to reach a ZMQ bind address: a wildcard host means this machine."""
    for wildcard in ("*", "0.0.0.0"):
        endpoint = endpoint.replace(f"tcp://{wildcard}:", "tcp://127.0.0.1:")
    return endpoint


def _put(table: dict[str, Any], cls: type, path: str, value: Any) -> None:
    """Set the dotted `path` in `table` if `cls` (a config dataclass) has that field."""
    *parents, leaf = path.split(".")
    for name in parents:
        hints = typing.get_type_hints(cls)
        if name not in hints or not dataclasses.is_dataclass(hints[name]):
            return
        cls, table = hints[name], table.setdefault(name, {})
    if leaf in {f.name for f in dataclasses.fields(cls)}:
        table[leaf] = value


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`, table by table."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge(out[key], value)
        out[key] = value
    return out


def role_class(role: str) -> type:
    """The config class of a role, imported on demand: the daemon itself never imports JAX."""
    if role == "serve":
        from openpi_rl.policy_server.serve import ServeConfig

        return ServeConfig
    if role == "bridge":
        from openpi_rl.reward_bridge.config import BridgeConfig

        return BridgeConfig
    if role == "learn":
        from openpi_rl.daemon.learner import LearnerConfig

        return LearnerConfig
    raise ValueError(f"role: expected one of {list(ROLES)}, got {role!r}")
