"""Hot-swap under load: robots at 50 Hz while the learner publishes versions (guarantee 3).

The policy server runs as its own process (`openpi-rl serve`, replay logging on), exactly as
deployed. A learner stand-in process writes `versions` real orbax versions (the learner's
`VersionCheckpoints`, weights perturbed per version) before the run, then announces them on
the learner's ZMQ PUB socket (`Publisher`, heartbeats included) at `publish_hz`, so what is
measured is the swap itself, not PPO's CPU use. This process plays `robots` robots, each
sending an observation every 1/`hz` s (infer, then report) with a 1 s timeout.

Quiet and swapping windows alternate in the same run (`block` versions published, then as
long without notices), so both see the same background load of a shared machine: the p99
round-trip latency of requests sent while a block is published (and one notice period after,
while its last swap lands) over the p99 of the quiet windows is the figure (goal <= 2), with
the requests that failed (error or timeout) or came back later than `late_ms`. The run ends
once every robot has been served the last version. The server's own counters (swaps,
compilations) are read from its /metrics; the seconds of each swap's phases (restore, place
on the device, check call) from its `swap` log lines.

    python benchmarks/hot_swap.py            # 4 robots x 50 Hz, 100 versions
    python benchmarks/hot_swap.py --quick    # 10 versions, short baseline
    python benchmarks/hot_swap.py --no-restore-in-worker   # orbax restores in the server

LoRA against full weights (issue 15): `--model-variant mid_lora` serves openpi's Pi0-FAST with
that Gemma variant (SigLIP tiny, the tokenizer fixtures, random weights) and runs the benchmark
twice on the same model, one fresh server each: versions of the full weights (what
`finetune = "full"` writes), then LoRA delta versions (what `finetune = "lora"` writes: LoRA
adapters + value head over version 0). Each version moves the LoRA and value-head arrays, as
LoRA training does. Reported side by side: bytes written per version, swap seconds (the whole
swap, and restore + place, the part that moves arrays), bytes read per swap, and the LoRA / full
ratios (goal <= 0.05). The first LoRA swap also loads the base (the server started on its seed's
weights, not known to be version 0's): it is reported apart, not in the means.

    python benchmarks/hot_swap.py --model-variant mid_lora                 # 10 versions each
    python benchmarks/hot_swap.py --model-variant mid_lora --gemma-width 1024 --gemma-mlp-dim 8192
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import tyro
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl_client import PolicyClient

OBS_DIM, ACTION_DIM, HORIZON, HIDDEN = 32, 7, 10, (256, 256)


@dataclasses.dataclass
class Args:
    robots: int = 4
    hz: float = 50.0  # requests per second per robot
    versions: int = 100  # versions the learner publishes
    publish_hz: float = 5.0  # notices per second
    block: int = 10  # versions per swapping window; a quiet window as long follows each
    late_ms: float = 20.0  # a reply later than this counts as late
    max_batch: int = 8
    quick: bool = False  # 10 versions in blocks of 5 (3 with --model-variant)
    restore_in_worker: bool = True  # the server's swap.restore_in_worker
    model_variant: str | None = None
    """A Pi0-FAST Gemma variant with LoRA (`mid_lora`, `tiny_lora`, ...): full versions against
    LoRA delta versions of that model, side by side (robots, hz, versions, publish_hz and block
    default to 1, 1.0, 10, 0.25 and 5 then)."""
    gemma_width: int | None = None  # overrides the variant's width (with --model-variant)
    gemma_mlp_dim: int | None = None  # overrides the variant's mlp_dim (with --model-variant)
    gemma_vocab: int | None = None
    """The embedding's rows (with --model-variant; 257152: PaliGemma's). The tokenizer fixture
    writes ids below 980 and decoding is constrained to the action grammar, so the extra rows
    are weights to store and move, as a real checkpoint's are, never tokens."""
    timeout_s: float = 1.0  # a robot's request timeout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOKENIZERS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizers"


def _pi0_fields(args: Args) -> dict:
    """Pi0FASTOpenPIConfig's fields for --model-variant (the tokenizer fixtures: real decoding,
    constrained so random weights still write chunks openpi's extract_actions reads)."""
    overrides = [
        (name, value)
        for name, value in (
            ("width", args.gemma_width),
            ("mlp_dim", args.gemma_mlp_dim),
            ("vocab_size", args.gemma_vocab),
        )
        if value is not None
    ]
    return {
        "gemma_variant": args.model_variant,
        "siglip_variant": "tiny",
        "gemma_overrides": overrides,
        "paligemma_tokenizer": str(TOKENIZERS / "paligemma_tiny.model"),
        "fast_tokenizer": str(TOKENIZERS / "fast_tiny"),
        "norm_stats": str(TOKENIZERS / "norm_stats.json"),
        "max_decoding_steps": 36,
        "constrain_actions": True,
    }


def _model_toml(args: Args) -> str:
    if args.model_variant is None:
        return (
            f'[model]\nkind = "gaussian_mlp"\nobs_dim = {OBS_DIM}\naction_dim = {ACTION_DIM}\n'
            f"action_horizon = {HORIZON}\nhidden = {list(HIDDEN)}\n"
        )
    lines = ["[model]", 'kind = "pi0_fast_openpi"']
    for name, value in _pi0_fields(args).items():
        value = [list(p) for p in value] if name == "gemma_overrides" else value
        lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _model_config(args: Args):
    if args.model_variant is None:
        from openpi_rl.models import GaussianMLPConfig

        return GaussianMLPConfig(
            obs_dim=OBS_DIM, action_dim=ACTION_DIM, action_horizon=HORIZON, hidden=HIDDEN
        )
    from openpi_rl.models.pi0_fast_openpi import Pi0FASTOpenPIConfig

    return Pi0FASTOpenPIConfig(**_pi0_fields(args))


def learner_stand_in(args: Args, mode: str, endpoint: str, ckpt: str, ready, go, windows) -> None:
    """Write every version to disk, then announce them at `publish_hz` in blocks of `block`,
    each followed by as long a pause; the (start, end) of each block goes to `windows`.
    mode "gaussian": every array perturbed per version; "full" / "lora": the LoRA adapters and
    the value head perturbed, versions of all weights / deltas over version 0 (which is put in
    `ckpt` before the server starts)."""
    import jax
    from flax import nnx

    from openpi_rl.models.choice import build_actor_critic
    from openpi_rl.models.finetune import LORA
    from openpi_rl.weights import Publisher, VersionCheckpoints

    ac = build_actor_critic(_model_config(args), (64, 64), 0)
    # Saved aside and moved into the server's checkpoint_dir when published: a server that
    # starts after the stand-in wrote its versions would otherwise start from the newest one.
    staging = Path(ckpt).parent / "staging"
    checkpoints = VersionCheckpoints(staging, max_to_keep=None)
    Path(ckpt).mkdir(parents=True, exist_ok=True)
    if mode != "gaussian":  # version 0, the base, where the server finds it
        shutil.copytree(checkpoints.save(0, nnx.state(ac), {"step": np.zeros(())}, {}),
                        Path(ckpt) / "0")  # fmt: skip
    moving = nnx.state(ac, LORA) if mode != "gaussian" else nnx.state(ac)
    paths = []
    for v in range(1, args.versions + 1):
        noise = np.random.default_rng(v)
        noisy = jax.tree.map(
            lambda x, n=noise: x + 0.01 * n.standard_normal(x.shape, np.float32), moving
        )
        if mode == "lora":
            path = checkpoints.save(v, noisy, {"step": np.zeros(())}, {}, base=0)
        else:
            nnx.update(ac, noisy)
            path = checkpoints.save(v, nnx.state(ac), {"step": np.zeros(())}, {})
        paths.append(str(path))
    checkpoints.close()
    versions, hz, block = args.versions, args.publish_hz, args.block
    publisher = Publisher(endpoint, heartbeat_s=0.5)
    ready.set()
    go.wait()
    time.sleep(block / hz)  # a quiet window first
    for start in range(0, versions, block):
        t0 = time.monotonic()
        for v in range(start + 1, min(start + block, versions) + 1):
            os.rename(paths[v - 1], Path(ckpt) / str(v))  # complete, with its manifest
            publisher.publish(v)
            time.sleep(1.0 / hz)
        windows.put((t0, time.monotonic()))
        time.sleep(block / hz)
    time.sleep(5.0)  # keep beating until the robots have seen the last version
    publisher.close()


def start_server(
    root: Path, args: Args, learner_endpoint: str
) -> tuple[subprocess.Popen, str, int]:
    """`openpi-rl serve` on the model; returns once its health says ready (every size compiled)."""
    port, metrics_port = _free_port(), _free_port()
    config = root / "serve.toml"
    config.write_text(
        f'replay_dir = "{root / "replay"}"\nmetrics_port = {metrics_port}\nopenpi_ws_port = 0\n\n'
        f'[serve]\nendpoint = "tcp://127.0.0.1:{port}"\nmax_batch = {args.max_batch}\n\n'
        f'[swap]\nlearner_endpoint = "{learner_endpoint}"\n'
        f'checkpoint_dir = "{root / "ckpt"}"\n'
        f"restore_in_worker = {str(args.restore_in_worker).lower()}\n\n" + _model_toml(args)
    )
    with open(root / "serve.log", "wb") as log:  # JSON lines: the swaps' phases
        proc = subprocess.Popen(
            [sys.executable, "-m", "openpi_rl.cli", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "OPENPI_RL_LOG_JSON": "1"},
        )
    endpoint = f"tcp://127.0.0.1:{port}"
    with PolicyClient(endpoint, robot_id="bench", timeout_s=2.0, retries=600) as client:
        while client.health()["status"] != "ready":
            time.sleep(0.1)
    return proc, endpoint, metrics_port


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels or s.name.endswith("_sum") or s.name.endswith("_count")
    }


class Robot(threading.Thread):
    """One robot at `hz`: infer then report, on a fixed schedule; records each infer's
    (start time, round-trip seconds or None when it failed, version, server's queue_ms + infer_ms)."""

    def __init__(
        self, endpoint: str, name: str, hz: float, stop: threading.Event,
        example: dict | None = None, timeout_s: float = 1.0,
    ):  # fmt: skip
        super().__init__(name=name, daemon=True)
        self.endpoint, self.hz, self._stop_event = endpoint, hz, stop
        self.example, self.timeout_s = example, timeout_s  # example: a fixed observation
        self.samples: list[tuple[float, float | None, int, float]] = []

    def run(self) -> None:
        rng = np.random.default_rng(zlib.crc32(self.name.encode()))
        period, t_next = 1.0 / self.hz, time.monotonic()
        with PolicyClient(
            self.endpoint, robot_id=self.name, timeout_s=self.timeout_s, retries=0
        ) as client:
            step = 0
            while not self._stop_event.is_set():
                obs = self.example or {"state": rng.standard_normal(OBS_DIM).astype(np.float32)}
                t0 = time.monotonic()
                try:
                    out = client.infer(obs)
                    timing = out.server_timing
                    server_ms = timing.get("queue_ms", 0.0) + timing.get("infer_ms", 0.0)
                    self.samples.append((t0, time.monotonic() - t0, out.policy_version, server_ms))
                    step += 1
                    client.report(out.transition_id, reward=0.0, done=step % 50 == 0)
                except Exception:
                    self.samples.append((t0, None, -1, 0.0))
                t_next += period
                time.sleep(max(0.0, t_next - time.monotonic()))


def swap_events(log: Path) -> list[dict]:
    """The server's `swap` log lines (seconds, phases' `*_s`, `restored_*`), oldest first."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "swap":
            events.append(event)
    return events


def swap_phases_ms(log: Path) -> dict[str, dict[str, float]]:
    """Mean and max milliseconds of each phase over the server's `swap` log lines."""
    phases: dict[str, list[float]] = {}
    for event in swap_events(log):
        for key, value in event.items():
            if key.endswith("_s") and key != "seconds":
                phases.setdefault(key.removesuffix("_s"), []).append(value * 1e3)
    return {
        k: {"mean": round(float(np.mean(v)), 3), "max": round(float(np.max(v)), 3)}
        for k, v in phases.items()
    }


def p99_ms(latencies: list[float]) -> float:
    return float(np.percentile(np.asarray(latencies) * 1e3, 99)) if latencies else float("nan")


def run(args: Args, mode: str = "gaussian") -> dict:
    """One server, one stand-in learner, `args.robots` robots: the figures of one run. mode:
    "gaussian" (the default benchmark), or "full" / "lora" versions of --model-variant."""
    root = Path(tempfile.mkdtemp(prefix=f"hot_swap_{mode}_"))
    learner_endpoint = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    ready, go, windows = ctx.Event(), ctx.Event(), ctx.Queue()
    learner = ctx.Process(
        target=learner_stand_in,
        args=(args, mode, learner_endpoint, str(root / "ckpt"), ready, go, windows),
    )
    learner.start()
    example = None
    if args.model_variant is not None:
        example = {k: np.asarray(v)[0] for k, v in _model_config(args).fake_obs(1).items()}
    if mode != "gaussian" and not ready.wait(1800):  # version 0 on disk before the server
        raise RuntimeError("the learner stand-in did not write its versions")
    server, endpoint, metrics_port = start_server(root, args, learner_endpoint)
    stop = threading.Event()
    try:
        if not ready.wait(1800):
            raise RuntimeError("the learner stand-in did not write its versions")
        before = scrape(metrics_port)
        robots = [
            Robot(endpoint, f"robot-{i}", args.hz, stop, example, args.timeout_s)
            for i in range(args.robots)
        ]
        for r in robots:
            r.start()
        time.sleep(1.0)  # every robot connected and served
        t_start = time.monotonic()
        go.set()
        deadline = t_start + 2 * args.versions / args.publish_hz + 60
        while time.monotonic() < deadline:
            if all(r.samples and r.samples[-1][2] == args.versions for r in robots):
                break
            time.sleep(0.1)
        time.sleep(args.block / args.publish_hz)  # the last quiet window
        stop.set()
        for r in robots:
            r.join(10)
        after = scrape(metrics_port)
    finally:
        stop.set()
        server.terminate()
        server.wait(60)
        learner.join(30)
        if learner.is_alive():
            learner.kill()

    # monotonic clocks are system-wide on Linux: the stand-in's windows compare with ours.
    spans = [windows.get(timeout=10) for _ in range(-(-args.versions // args.block))]
    tail = 1.0 / args.publish_hz  # the last notice's swap lands after its window closes

    def swapping_at(t: float) -> bool:
        return any(a <= t <= b + tail for a, b in spans)

    samples = [s for r in robots for s in r.samples if s[0] >= t_start]
    ok = [s for s in samples if s[1] is not None]
    baseline = [lat for t, lat, *_ in ok if not swapping_at(t)]
    swapping = [lat for t, lat, *_ in ok if swapping_at(t)]
    p99_base, p99_swap = p99_ms(baseline), p99_ms(swapping)
    swap_count = after["openpi_rl_server_swap_seconds_count"]
    return (
        {
            "swaps": int(after["openpi_rl_server_swaps_total"]),
            "requests": len(samples),
            "failed": len(samples) - len(ok),
            "late": sum(lat > args.late_ms / 1e3 for _, lat, *_ in ok),
            "p99_ratio": round(p99_swap / p99_base, 3),
            "p99_ms_baseline": round(p99_base, 3),
            "p99_ms_swapping": round(p99_swap, 3),
            "p50_ms": round(float(np.median(np.asarray([s[1] for s in ok]) * 1e3)), 3),
            "max_ms": round(max(s[1] for s in ok) * 1e3, 3),
            "final_version": max(s[2] for s in ok),
            "versions_published": args.versions,
            "swap_seconds_mean": round(after["openpi_rl_server_swap_seconds_sum"] / swap_count, 4)
            if swap_count
            else None,
            "compilations_during_run": int(
                after["openpi_rl_server_compilations"] - before["openpi_rl_server_compilations"]
            ),
            # Where a late reply's time went: [round trip, in the server (queue + infer)] ms.
            "late_ms": [
                [round(s[1] * 1e3, 1), round(s[3], 1)] for s in ok if s[1] > args.late_ms / 1e3
            ][:10],
            "late_quiet": sum(lat > args.late_ms / 1e3 for lat in baseline),
            "late_swapping": sum(lat > args.late_ms / 1e3 for lat in swapping),
            "requests_quiet": len(baseline),
            "requests_swapping": len(swapping),
            "swap_phase_ms": swap_phases_ms(root / "serve.log"),
            "restore_in_worker": args.restore_in_worker,
            "robots": args.robots,
            "hz": args.hz,
        },
        root,
    )


def main(args: Args) -> None:
    if args.model_variant is not None:
        return compare_lora(args)
    if args.quick:
        args = dataclasses.replace(args, versions=10, block=5)
    print_json(run(args)[0])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def compare_lora(args: Args) -> None:
    """Full versions, then LoRA delta versions, of the same model: bytes per version and swap
    times side by side."""
    defaults = dict(robots=1, hz=1.0, versions=10, publish_hz=0.25, block=5, timeout_s=10.0)
    if args.quick:
        defaults.update(versions=3, block=3)
    given = {k: v for k, v in dataclasses.asdict(args).items() if v != getattr(Args(), k)}
    args = dataclasses.replace(args, **{**defaults, **given})
    out: dict = {"model_variant": args.model_variant}
    for mode in ("full", "lora"):
        figures, root = run(args, mode)
        ckpt = root / "ckpt"
        events = swap_events(root / "serve.log")
        # The first LoRA swap reads the base too (the server started on its seed's weights).
        moved = [e for e in events if mode == "full" or e.get("restored_delta_only")]
        first = [e for e in events if mode == "lora" and not e.get("restored_delta_only")]
        out[mode] = {
            "bytes_per_version": int(
                np.mean([_dir_bytes(ckpt / str(v)) for v in range(1, args.versions + 1)])
            ),
            "base_bytes": _dir_bytes(ckpt / "0"),
            "swaps": len(moved),
            "swap_s_mean": _mean([e["seconds"] for e in moved]),
            "restore_place_s_mean": _mean([e["restore_s"] + e["place_s"] for e in moved]),
            "check_s_mean": _mean([e["check_s"] for e in moved]),
            "bytes_read_per_swap": int(np.mean([e["restored_bytes"] for e in moved]))
            if moved
            else None,
            "arrays_per_swap": int(np.mean([e["restored_arrays"] for e in moved]))
            if moved
            else None,
            "base_swap_s": [round(e["seconds"], 4) for e in first],
            "failed": figures["failed"],
            "final_version": figures["final_version"],
            "p99_ms_swapping": figures["p99_ms_swapping"],
            "p99_ms_baseline": figures["p99_ms_baseline"],
        }
        shutil.rmtree(root, ignore_errors=True)
    full, lora = out["full"], out["lora"]

    def ratio(key: str) -> float | None:
        if full[key] and lora[key] is not None:
            return round(lora[key] / full[key], 4)
        return None

    out["lora_over_full"] = {
        k: ratio(k)
        for k in ("bytes_per_version", "bytes_read_per_swap", "swap_s_mean", "restore_place_s_mean")
    }
    out["versions"], out["publish_hz"] = args.versions, args.publish_hz
    if not args.quick:
        out["lora_fraction_from_shapes"] = lora_fractions()
    print_json(out)


def lora_fractions() -> dict[str, float]:
    """LoRA + value head bytes over all weights' bytes, from shapes alone (nothing allocated),
    for models too large to serve here: `mid_lora` with PaliGemma's 257,152-token vocabulary
    (the served one has the tokenizer fixture's 980) and openpi's gemma_2b_lora + So400m/14."""
    import jax
    from flax import nnx

    from openpi_rl.models.finetune import LORA
    from openpi_rl.models.pi0_fast_openpi import Pi0FASTOpenPIConfig
    from openpi_rl.rl.actor_critic import ActorCritic

    out = {}
    for name, gemma, siglip in (
        ("mid_lora_paligemma_vocab", "mid_lora", "tiny"),
        ("gemma_2b_lora_so400m", "gemma_2b_lora", "So400m/14"),
    ):
        m = Pi0FASTOpenPIConfig(gemma_variant=gemma, siglip_variant=siglip)
        ac = nnx.eval_shape(
            lambda m=m: ActorCritic(
                m.create(jax.random.key(0)), m.value_in_dim, value_hidden=(64, 64)
            )
        )
        nbytes = lambda s: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s))  # noqa: E731
        out[name] = round(nbytes(nnx.state(ac, LORA)) / nbytes(nnx.state(ac)), 4)
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
