"""`openpi-rl check --config openpi-rl.toml`: every problem of a configuration and of this
machine, named at once, before anything starts.

Checks: the file parses and every key is known and well typed (per role); no two listeners
share a port and every port can be bound now; every directory a role writes (replay,
checkpoints) exists and is writable, or can be created; each model builds and samples once
(traced abstractly with `jax.eval_shape`, so a 2B model is checked in seconds without its
memory); the server and the learner build the same policy; `[learn.distributed]` holds
together (distributed.py). Exit status 0 when clean, 1 with problems (each on its own line,
naming the key), 78 when the file cannot be read at all.

For a model built on openpi's PaliGemma (`Pi0FASTOpenPIConfig`, or a config naming a
`paligemma_variant`), an `info` line gives its parameter count and the
memory it needs for serving and for a PPO update (`models/paligemma/memory.py`). With a
`[gpu]` table, each role's need is set against its share of the device, and shares that add
up to more than the device or a need past its share are problems (`service/gpu.py`).
`openpi-rl check --model-memory VARIANT` prints that line for a variant without a config.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import itertools
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from openpi_rl.replay.postgres import connect
from openpi_rl.replay.store import is_postgres
from openpi_rl.secret import mask_url
from openpi_rl.service.config import EX_CONFIG, ROLES, GpuConfig, ServiceFile
from openpi_rl.service.gpu import gpu_memory


@dataclasses.dataclass(frozen=True)
class Finding:
    where: str  # the key it is about: "serve.metrics_port"
    message: str
    severity: str = "problem"  # or "warning" / "info" (reported, exit status unaffected)

    def __str__(self) -> str:
        return f"{self.severity:8} {self.where}: {self.message}"


def check(path: str | Path) -> list[Finding]:
    """Every finding for the file at `path` (empty: ready to start)."""
    try:
        service = ServiceFile.load(path)
    except (OSError, ValueError) as e:  # tomllib's errors are ValueErrors
        return [Finding("config", str(e))]
    findings: list[Finding] = []
    configs: dict[str, Any] = {}
    for role in service.daemon.roles:
        try:
            configs[role] = service.role_config(role)
        except (ValueError, TypeError) as e:
            findings.append(Finding(role, str(e)))
    findings += check_ports(_listeners(service, configs))
    findings += check_dirs(_directories(configs))
    findings += check_replay_db(configs)
    findings += check_models(configs)
    findings += model_memory(configs, service.gpu)
    findings += check_curves(configs)
    findings += check_distributed(configs)
    bridge = configs.get("bridge")
    if bridge is not None and not bridge.operators:
        findings.append(Finding("bridge.operators", "empty: no pendant can log in", "warning"))
    return findings


# -- ports


def _listeners(service: ServiceFile, configs: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(key, host, port) of every TCP listener the service will open (port 0: any, skipped)."""
    out = []
    d = service.daemon
    if d.metrics_port:
        out.append(("daemon.metrics_port", d.metrics_host, d.metrics_port))
    serve = configs.get("serve")
    if serve is not None:
        out += _endpoint("serve.serve.endpoint", serve.serve.endpoint)
        if serve.metrics_port:
            out.append(("serve.metrics_port", serve.metrics_host, serve.metrics_port))
        if serve.openpi_ws_port:
            out.append(("serve.openpi_ws_port", serve.openpi_ws_host, serve.openpi_ws_port))
        swap = getattr(serve, "swap", None)  # the admin endpoint binds only with a token
        if swap is not None and (swap.admin_token or os.environ.get("OPENPI_RL_ADMIN_TOKEN")):
            out += _endpoint("serve.swap.admin_endpoint", swap.admin_endpoint)
    bridge = configs.get("bridge")
    if bridge is not None:
        for key in ("ws_port", "http_port"):
            if getattr(bridge, key):
                out.append((f"bridge.{key}", bridge.host, getattr(bridge, key)))
        if bridge.metrics_port:
            out.append(("bridge.metrics_port", bridge.metrics_host, bridge.metrics_port))
    learn = configs.get("learn")
    if learn is not None:
        out += _endpoint("learn.publish_endpoint", learn.publish_endpoint)
        if learn.metrics_port:
            out.append(("learn.metrics_port", learn.metrics_host, learn.metrics_port))
    return out


def _endpoint(key: str, endpoint: str) -> list[tuple[str, str, int]]:
    """A ZMQ `tcp://host:port` bind address; other transports (ipc, inproc) have no port."""
    url = urlsplit(endpoint)
    if url.scheme != "tcp":
        return []
    host = url.hostname or "0.0.0.0"
    port = url.port if url.netloc.rsplit(":", 1)[-1] != "*" else None
    return [(key, "0.0.0.0" if host == "*" else host, port)] if port else []


def check_ports(listeners: list[tuple[str, str, int]]) -> list[Finding]:
    findings = []
    seen: dict[int, str] = {}
    for key, host, port in listeners:
        if port in seen:
            findings.append(Finding(key, f"port {port} is also {seen[port]}'s"))
            continue
        seen[port] = key
        problem = _bind_problem(host, port)
        if problem:
            findings.append(Finding(key, f"{host}:{port} {problem}"))
    return findings


def _bind_problem(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))  # no SO_REUSEADDR: a listening socket must make this fail
        except OSError as e:
            reasons = {
                errno.EADDRINUSE: "is in use (another process listens there)",
                errno.EACCES: "needs privileges (ports below 1024)",
                errno.EADDRNOTAVAIL: "is not an address of this machine",
            }
            return reasons.get(e.errno, f"cannot be bound: {e.strerror}")
    return None


# -- directories


def _directories(configs: dict[str, Any]) -> list[tuple[str, Path]]:
    out = []
    for role in ROLES:
        cfg = configs.get(role)
        for key in ("replay_dir", "checkpoint_dir"):
            value = getattr(cfg, key, None)
            if value and not is_postgres(value):  # a database is checked by check_replay_db
                out.append((f"{role}.{key}", Path(value)))
        curves_dir = getattr(getattr(cfg, "curves", None), "dir", None)
        if curves_dir:
            out.append((f"{role}.curves.dir", Path(curves_dir)))
    return out


def check_replay_db(configs: dict[str, Any], timeout_s: float = 3.0) -> list[Finding]:
    """A postgresql:// replay must be reachable (each role connects to it at start)."""
    findings, seen = [], set()
    for role in ROLES:
        url = getattr(configs.get(role), "replay_dir", None)
        if not url or not is_postgres(url) or url in seen:
            continue
        seen.add(url)
        try:
            connect(url, timeout_s).close()
        except Exception as e:  # psycopg's errors say what is wrong (host, auth, database)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            findings.append(Finding(f"{role}.replay_dir", f"{mask_url(url)}: {msg}"))
    return findings


def check_dirs(dirs: list[tuple[str, Path]]) -> list[Finding]:
    """Each directory must be writable, or creatable under its nearest existing ancestor. The
    test is a real file created and removed (root passes any permission bits `os.access`
    would look at, and a read-only mount fails only on a real write)."""
    findings, seen = [], set()
    for key, path in dirs:
        path = path.absolute()
        if path in seen:
            continue
        seen.add(path)
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            findings.append(Finding(key, f"{path}: {existing} is not a directory"))
            continue
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            what = "not writable" if existing == path else f"cannot be created in {existing}"
            findings.append(Finding(key, f"{path}: {what} ({e.strerror})"))
    return findings


def check_curves(configs: dict[str, Any]) -> list[Finding]:
    """W&B curves need the wandb package (the `wandb` extra), or the learner exits 78."""
    curves = getattr(configs.get("learn"), "curves", None)
    if curves is None or not curves.wandb:
        return []
    try:
        import wandb  # noqa: F401
    except ImportError:
        return [
            Finding(
                "learn.curves.wandb",
                "true, but the wandb package is not installed (pip install 'openpi-rl[wandb]')",
            )
        ]
    return []


def check_distributed(configs: dict[str, Any]) -> list[Finding]:
    """`[learn.distributed]`: process id in range, coordinator as host:port (or the JAX_*
    variables), a minibatch the devices divide (known with `local_device_count`)."""
    learn = configs.get("learn")
    if learn is None:
        return []
    from openpi_rl.daemon.distributed import problems_of

    found = problems_of(learn.distributed, os.environ, learn.ppo.minibatch_size)
    return [Finding(key, message) for key, message in found]


# -- models


def check_models(configs: dict[str, Any]) -> list[Finding]:
    """Build each role's policy and sample once, abstractly; the learner's must be the server's
    (a published version restores into the server's ActorCritic only then)."""
    findings = []
    for role in ("serve", "learn"):
        cfg = configs.get(role)
        if cfg is not None:
            error = _model_error(cfg.model, cfg.value_hidden, cfg.seed)
            if error:
                findings.append(Finding(f"{role}.model", error))
    serve, learn = configs.get("serve"), configs.get("learn")
    if serve is not None and learn is not None:
        for key in ("model", "value_hidden", "seed"):
            if getattr(serve, key) != getattr(learn, key):
                findings.append(
                    Finding(
                        f"learn.{key}",
                        f"differs from serve.{key} ({getattr(learn, key)!r} vs "
                        f"{getattr(serve, key)!r}): published versions would not load into the "
                        "server; set it once at the top level",
                    )
                )
    return findings


def _memory_estimate(model: Any, role_config: Any):
    """The memory estimate of a model built on openpi's PaliGemma, else None: a config with a
    `paligemma` PaliGemmaConfig (`Pi0FASTOpenPIConfig`: its cameras, prompt length, decoding
    steps and dtypes), or one naming a `paligemma_variant`. Serving batch: the role's
    `serve.max_batch`; PPO minibatch: its `ppo.minibatch_size` (else 1 and 8). What an update
    trains: the role's `finetune` ("auto": LoRA with a `_lora` variant, else "full"), and its
    value head (`value_hidden`)."""
    from openpi_rl.models.paligemma import PaliGemmaConfig
    from openpi_rl.models.paligemma.memory import SIGLIP_FOR, memory_estimate

    serve = getattr(role_config, "serve", None)
    batch: dict[str, Any] = {"serve_batch": getattr(serve, "max_batch", 1) or 1}
    minibatch = getattr(getattr(role_config, "ppo", None), "minibatch_size", None)
    if isinstance(minibatch, int) and minibatch > 0:
        batch["train_batch"] = minibatch
    batch["finetune"] = _finetune(model, role_config)
    width = getattr(model, "value_in_dim", None)
    if isinstance(width, int):
        widths = (width, *getattr(role_config, "value_hidden", ()), 1)
        batch["value_head_params"] = sum(a * b + b for a, b in itertools.pairwise(widths))
    paligemma = getattr(type(model), "paligemma", None)
    if isinstance(paligemma, property):
        pg = model.paligemma
        if isinstance(pg, PaliGemmaConfig):
            return memory_estimate(
                pg,
                num_images=len(getattr(model, "cameras", ("image",) * 3)),
                prompt_len=getattr(model, "max_token_len", 250),
                decode_steps=getattr(model, "max_decoding_steps", 256),
                serve_dtype=pg.param_dtype,
                **batch,
            )
    variant = getattr(model, "paligemma_variant", None)
    if isinstance(variant, str) and variant.removesuffix("_lora") in SIGLIP_FOR:
        return memory_estimate(variant, **batch)
    return None


def _finetune(model: Any, role_config: Any) -> str:
    """What the learner's update trains: its `finetune` ("auto": "lora" with a `_lora`
    variant, else "full")."""
    finetune = getattr(role_config, "finetune", "auto")
    if finetune != "auto":
        return finetune
    variant = getattr(model, "gemma_variant", None) or getattr(model, "paligemma_variant", "")
    return "lora" if str(variant).endswith("_lora") else "full"


def model_memory(configs: dict[str, Any], gpu: GpuConfig | None = None) -> list[Finding]:
    """An `info` line per role whose model is built on openpi's PaliGemma: its parameter count
    and the memory for serving and for a PPO update; see `memory_estimate`. With a `[gpu]`
    table, whether each role's need fits its share of the device (`gpu_memory`)."""
    findings = []
    needs: dict[str, tuple[int, str, str]] = {}  # bytes, what for, how to need less
    for role in ("serve", "learn"):
        cfg = configs.get(role)
        if cfg is None:
            continue
        try:
            estimate = _memory_estimate(getattr(cfg, "model", None), cfg)
        except Exception as e:  # an estimate that fails is worth a warning, not a stop
            findings.append(Finding(f"{role}.model", f"no memory estimate: {e}", "warning"))
            continue
        if estimate is not None:
            findings.append(Finding(f"{role}.model", estimate.summary(), "info"))
            if role == "serve":
                needs[role] = (
                    estimate.serve_bytes,
                    f"serving batch {estimate.serve_batch}",
                    "lower serve.serve.max_batch",
                )
            else:
                finetune = _finetune(cfg.model, cfg)
                needs[role] = (
                    estimate.train_bytes,
                    f"a PPO update of minibatch {estimate.train_batch} ({finetune}: trains "
                    f"{estimate.trainable:,} parameters)",
                    "lower learn.ppo.minibatch_size"
                    + (', or finetune = "lora" (a _lora variant)' if finetune == "full" else ""),
                )
    if gpu is None or gpu == GpuConfig():
        return findings
    float32 = [r for r in needs if getattr(configs[r].model, "dtype", None) == "float32"]
    if float32:
        findings.append(
            Finding(
                f"{float32[0]}.model.dtype",
                'float32 compute on a GPU: dtype = "bfloat16" (openpi\'s) halves the '
                "activations and runs on the tensor cores",
                "warning",
            )
        )
    roles = [r for r in ("serve", "learn") if r in configs]
    return findings + [Finding(*f) for f in gpu_memory(gpu, needs, roles)]


def model_memory_main(variant: str) -> int:
    """`openpi-rl check --model-memory VARIANT`: the estimate's line for a PaliGemma variant."""
    from openpi_rl.models.paligemma.memory import memory_estimate

    try:
        estimate = memory_estimate(variant)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    print(estimate.summary())
    return 0


def _model_error(model: Any, value_hidden: tuple[int, ...], seed: int) -> str | None:
    import jax

    from openpi_rl.models.choice import ModelConfigError, build_actor_critic

    if getattr(model, "checkpoint", None) is not None:
        from openpi_rl.weights.start import is_version_dir
        from openpi_rl.weights.versions import CorruptVersion, read_manifest

        try:  # its tree against the model's, from metadata; traced below without its weights
            if is_version_dir(model.checkpoint):  # one of ours: restored (and verified) at start
                read_manifest(model.checkpoint)
            else:
                model.check_checkpoint()
        except (OSError, ValueError, CorruptVersion) as e:
            return f"{type(model).__name__}.checkpoint: {e}"
        model = dataclasses.replace(model, checkpoint=None)

    def build_and_sample() -> Any:
        ac = build_actor_critic(model, value_hidden, seed)
        obs = model.fake_obs(1)
        return ac.model.sample_actions(jax.random.key(0), obs), ac.value(jax.random.key(0), obs)

    try:
        jax.eval_shape(build_and_sample)
    except Exception as e:  # any failure is the finding; its text names what broke
        # What the model config raised, not ModelConfigError's repetition of it.
        cause = e.__cause__ if isinstance(e, ModelConfigError) and e.__cause__ else e
        return f"{type(model).__name__} does not build: {type(cause).__name__}: {cause}"
    return None


def check_main(argv: list[str]) -> int:
    """`openpi-rl check --config FILE`, or `openpi-rl check --model-memory VARIANT`."""
    parser = argparse.ArgumentParser(
        prog="openpi-rl check",
        description="Every problem of a service file and of this machine, named at once, "
        "before anything starts. Exit 0 clean, 1 with problems, 78 when the file cannot be read.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--config",
        metavar="FILE",
        help="the service file (openpi-rl.toml): keys, ports, directories, models",
    )
    what.add_argument(
        "--model-memory",
        metavar="VARIANT",
        help="print the parameters and memory a PaliGemma variant (gemma_2b_lora) needs",
    )
    args = parser.parse_args(argv)  # --help: exit 0; a usage error: exit 2
    if "JAX_PLATFORMS" not in os.environ:  # shapes only: never claim the accelerator
        import jax

        jax.config.update("jax_platforms", "cpu")
    if args.model_memory is not None:
        return model_memory_main(args.model_memory)
    findings = check(args.config)
    for f in findings:
        print(f)
    problems = [f for f in findings if f.severity == "problem"]
    if problems and problems[0].where == "config":
        return EX_CONFIG
    print(f"{args.config}: {len(problems)} problem(s)" if problems else f"{args.config}: ok")
    return 1 if problems else 0
