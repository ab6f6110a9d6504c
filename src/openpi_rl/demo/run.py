"""`openpi-rl demo`: the service, robots and an operator on one machine, with a live table.

    openpi-rl daemon (server + bridge + learner, child processes)  <- started here, SIGTERM at end
      ^ ZMQ: infer / report            ^ WebSocket /pendant: success / failure
    simulated robots (threads,        simulated operator (thread)       you, at the pendant URL
    MuJoCo InvertedPendulum-v5)

Ends after `minutes` (or `max_env_steps`), stops the daemon (every role flushes and exits 0)
and prints the first version's mean return and the last 20 episodes' mean return.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from openpi_rl.demo.config import DemoService, write_demo_config
from openpi_rl.demo.display import DemoDisplay
from openpi_rl.demo.operator import OperatorPolicy, SimOperator
from openpi_rl.demo.robots import Episode, Fleet, first_version_return, mean_return, start_robots
from openpi_rl.demo.service import DaemonProcess

log = structlog.get_logger("openpi_rl.demo")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """`openpi-rl demo` flags."""

    minutes: float = 5.0
    """How long the robots run (after the service is ready)."""
    robots: int = 2
    """Simulated robots, each its own environment and `PolicyClient`."""
    hz: float | None = None
    """Chunks per second per robot; None: as fast as the server answers."""
    config: str | None = None
    """A service file (openpi-rl.toml) to run instead of the demo's own; its [model] must fit
    the environment, and its bridge needs an operator token for the simulated operator."""
    env: str = "InvertedPendulum-v5"
    """The gymnasium task the robots run (MuJoCo)."""
    seed: int = 0
    """Seeds the robots' environments and the policy's initial weights."""
    operator: bool = True
    """A simulated operator presses success / failure at the pendant."""
    operator_policy: OperatorPolicy = OperatorPolicy()
    max_env_steps: int | None = None
    """Stop once the robots took this many environment steps (all robots together)."""
    until_version: int | None = None
    """Stop once a reply carries this policy version (and, with the operator, once a press was
    attached): a smoke test's end."""
    workdir: str | None = None
    """Where the demo's config, replay, checkpoints and service log go; default: a fresh
    temporary directory, removed at the end unless --keep."""
    keep: bool = False
    """Keep the work directory (replay, checkpoints, service log) and print where it is."""
    ready_timeout_s: float = 300.0
    """Give up when the service is not ready within this long (first start compiles)."""
    prompt: str | None = None
    """The task prompt each robot sends with its observations (a model that reads prompts,
    such as openpi's Pi0-FAST, needs one)."""
    report: bool = True
    """End by writing learning_curve.png and a video of one episode of the newest version into
    the work directory (kept, even when the rest of a temporary one is removed)."""


@dataclasses.dataclass
class DemoResult:
    episodes: list[Episode]
    env_steps: int
    replies: int
    max_version: int
    p99_ms: float
    replay_rows: int | None
    operator: dict[str, int] | None
    operator_acks: list[dict]
    errors: list[str]
    daemon_rc: int
    wall_s: float
    workdir: Path
    daemon_problems: list[str] = dataclasses.field(default_factory=list)  # when daemon_rc != 0
    report: list[Path] = dataclasses.field(default_factory=list)  # the PNG and the video
    report_error: str | None = None  # why they are missing

    @property
    def first_version_return(self) -> float:
        return first_version_return(self.episodes)

    @property
    def last20_return(self) -> float:
        return mean_return(self.episodes[-20:])

    @property
    def ratio(self) -> float:
        first = self.first_version_return
        return self.last20_return / first if first and not math.isnan(first) else math.nan


def _stop_on_sigterm() -> Callable[[], None]:
    """SIGTERM stops the demo as Ctrl-C does (KeyboardInterrupt), so `run_demo`'s `finally`
    stops the daemon: it runs in its own session and would outlive a killed demo. Returns what
    puts the previous handler back (nothing to do off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_demo(config: DemoConfig, display: bool = True) -> DemoResult:
    """Start the daemon, run robots (and the operator) against it, stop it; the figures."""
    t_start = time.monotonic()
    if config.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="openpi-rl-demo-"))
    else:
        workdir = Path(config.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    if config.config is None:
        path = write_demo_config(workdir, config.robots, secrets.token_urlsafe(16), config.seed)
    else:
        path = Path(config.config)
    daemon = DaemonProcess(path, workdir / "service.log")
    service: DemoService = daemon.service
    fleet = Fleet(config.max_env_steps)
    operator = None
    robots = []
    rc = None
    restore = _stop_on_sigterm()
    try:
        print(f"openpi-rl demo: starting the service ({path})", file=sys.stderr, flush=True)
        daemon.start()
        daemon.wait_ready(config.ready_timeout_s)
        print(
            f"openpi-rl demo: service ready; pendant: {service.pendant_url}", file=sys.stderr,
            flush=True,
        )  # fmt: skip
        if config.operator:
            if service.operator_token is None:
                print("openpi-rl demo: no [bridge.operators] token: no simulated operator",
                      file=sys.stderr)  # fmt: skip
            else:
                operator = SimOperator(
                    service.pendant_ws, service.operator_token, config.operator_policy
                )
                fleet.on_episode(operator.saw)
                operator.start()
        rescale = bool(getattr(service.model, "normalized_actions", False))
        robots = start_robots(
            service.endpoint, config.robots, fleet, config.env, config.seed, rescale,
            config.hz, service.robots, config.prompt,
        )  # fmt: skip
        seconds = config.minutes * 60.0
        ui = DemoDisplay(
            fleet, service.replay_dir, service.pendant_url, seconds, operator,
            workdir / "service.log" if display else None,
        )  # fmt: skip
        deadline = time.monotonic() + seconds
        with ui if display else _Quiet():
            while time.monotonic() < deadline and not fleet.stop.is_set():
                if config.until_version is not None and _reached(config, fleet, operator):
                    break
                if daemon.proc.poll() is not None:
                    raise RuntimeError(
                        f"openpi-rl daemon exited with {daemon.proc.returncode}; "
                        f"see {daemon.log_path}"
                    )
                if display:
                    ui.refresh()
                time.sleep(0.25)
            fleet.stop.set()
            for r in robots:
                r.join(10)
            if operator is not None:
                operator.close()
            if display:
                ui.refresh()
    finally:
        fleet.stop.set()
        for r in robots:
            r.join(10)
        if operator is not None:
            operator.close()
        rc = daemon.close()
        restore()
    rows = None
    try:
        from openpi_rl.replay import ReplayReader

        reader = ReplayReader(service.replay_dir)
        rows = reader.count()
        reader.close()
    except Exception:
        pass
    result = DemoResult(
        episodes=fleet.snapshot(),
        env_steps=fleet.env_steps,
        replies=fleet.replies,
        max_version=fleet.max_version,
        p99_ms=fleet.p99_ms(),
        replay_rows=rows,
        operator=None if operator is None else operator.counts(),
        operator_acks=[] if operator is None else list(operator.acks),
        errors=list(fleet.errors),
        daemon_rc=rc,
        daemon_problems=daemon.problems() if rc != 0 else [],
        wall_s=time.monotonic() - t_start,
        workdir=workdir,
    )
    if config.report and result.episodes:
        from openpi_rl.demo.report import write_report

        try:
            result.report = write_report(result.episodes, path, workdir, config.env, config.seed)
        except (OSError, RuntimeError, ValueError) as e:
            result.report_error = str(e)
    if config.workdir is None and not config.keep:
        kept = {p.relative_to(workdir).parts[0] for p in result.report}
        for p in workdir.iterdir() if kept else [workdir]:
            if p.name not in kept:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    return result


def summary(result: DemoResult) -> str:
    eps = result.episodes
    first = min((e.version for e in eps), default=0)
    n_first = sum(1 for e in eps if e.version == first)
    lines = [
        f"episodes: {len(eps):,}, env steps: {result.env_steps:,}, newest version served: "
        f"{result.max_version}, p99 round trip: {result.p99_ms:.1f} ms, replay rows: "
        f"{result.replay_rows}",
        f"mean return, first version (v{first}, {n_first} episodes): "
        f"{result.first_version_return:.1f}",
        f"mean return, last 20 episodes: {result.last20_return:.1f}",
        f"ratio: {result.ratio:.1f}x",
    ]
    if result.operator is not None:
        op = result.operator
        lines.insert(1, f"operator presses acknowledged: {op['acked']} ({op['success']} success, "
                        f"{op['failure']} failure), attached: {op['attached']}")  # fmt: skip
    if result.errors:
        lines.append(f"robot errors: {len(result.errors)} (first: {result.errors[0]})")
    return "\n".join(lines)


def demo_main(config: DemoConfig) -> int:
    try:
        result = run_demo(config)
    except (RuntimeError, TimeoutError) as e:
        print(f"openpi-rl demo: {e}", file=sys.stderr)
        return 1
    print(summary(result), flush=True)
    if config.keep or config.workdir is not None:
        print(f"replay, checkpoints and service log: {result.workdir}", flush=True)
    for p in result.report:
        print(f"{'learning curve' if p.suffix == '.png' else 'video'}: {p}", flush=True)
    if result.report_error is not None:
        print(f"openpi-rl demo: no learning curve or video: {result.report_error}", file=sys.stderr)
    if result.daemon_rc != 0:
        print(f"openpi-rl demo: the daemon exited {result.daemon_rc}", file=sys.stderr)
        for line in result.daemon_problems:
            print(f"  {line}", file=sys.stderr)
    return 0 if result.daemon_rc == 0 else 1


def _reached(config: DemoConfig, fleet: Fleet, operator: SimOperator | None) -> bool:
    pressed = operator is None or operator.counts()["attached"] > 0
    return fleet.max_version >= config.until_version and pressed


class _Quiet:
    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
