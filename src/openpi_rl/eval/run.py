"""`openpi-rl eval`: N episodes of one published version (and, with `--compare`, another on
the same seeds), a table of success rate and mean return with confidence intervals, a JSON
summary, and with `--video-dir` each recorded episode's mp4 and the two versions side by side."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import gymnasium as gym
import jax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from openpi_rl.eval.episodes import (
    EpisodeResult,
    load_version,
    make_env,
    make_policy,
    run_episode,
    success_rule,
    versions_in,
)
from openpi_rl.eval.stats import Summary, summarize
from openpi_rl.eval.video import VideoWriter, headless_gl, side_by_side
from openpi_rl.models.choice import ModelChoice
from openpi_rl.models.gaussian_mlp import GaussianMLPConfig
from openpi_rl.secret import SECRET

ADMIN_TOKEN_ENV = "OPENPI_RL_ADMIN_TOKEN"  # policy_server/admin.py's TOKEN_ENV


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`openpi-rl eval` flags. With `--config openpi-rl.toml` the model, value head, model seed
    and checkpoint_dir default to the service's."""

    checkpoint_dir: str = "checkpoints"
    """Where the versions are (`<dir>/<N>/`, as the learner publishes them)."""
    version: int | None = None
    """The version to evaluate; None: the newest."""
    compare: int | None = None
    """A second version, evaluated on the same seeds; its videos go side by side with the first's."""
    episodes: int = 20  # episodes per version
    env: str = "InvertedPendulum-v5"  # gymnasium id
    policy: Literal["greedy", "sampled"] = "greedy"
    """greedy: the policy's mean (a token policy's argmax); sampled: drawn with keys from --seed
    (`--greedy` and `--sampled` are short for these)."""
    seed: int = 0
    """Episode i starts from `env.reset(seed=seed + i)`; sampled actions use keys from it."""
    max_episode_steps: int | None = None  # a shorter time limit than the task's (None: its own)
    video_dir: str | None = None
    """Write `v<N>_ep<i>.mp4` per recorded episode (and `v<N>_vs_v<M>_ep<i>.mp4` with --compare)."""
    video_episodes: int | None = None  # record the first K episodes of each version (None: all)
    video_size: tuple[int, int] = (320, 240)  # width, height of the rendered frames
    summary: str | None = None
    """The JSON summary's path; None: `<video-dir>/summary.json` with --video-dir, else none."""
    confidence: float = 0.95  # of the intervals
    model: ModelChoice = GaussianMLPConfig()
    """The run's model (gaussian_mlp takes its sizes from the env)."""
    value_hidden: tuple[int, ...] = (64, 64)  # the run's value head
    model_seed: int = 0
    """The run's seed: version 0, once retention has deleted it, is rebuilt from it."""
    robots: bool = False
    """Evaluate on the robots instead of --env: pin the version on the policy server (admin),
    judge the episodes the robots finish with it (replay); the pin is put back afterwards."""
    admin_endpoint: str = "tcp://127.0.0.1:5559"  # the policy server's admin endpoint (--robots)
    admin_token: Annotated[str | None, SECRET] = None
    """The admin token (--robots); None: $OPENPI_RL_ADMIN_TOKEN."""
    replay_dir: str = "replay"  # the policy server's replay (--robots)
    robots_timeout_s: float = 600.0  # give up when fewer episodes ended on the robots by then


@dataclasses.dataclass
class VersionEval:
    version: int
    episodes: list[EpisodeResult]
    summary: Summary
    videos: list[Path]
    source: str = "disk"  # "seed": version 0 rebuilt from the run's seed (deleted by retention)


@dataclasses.dataclass
class EvalReport:
    config: EvalConfig
    results: list[VersionEval]  # the version, then the compared one
    comparisons: list[Path]  # side-by-side videos

    def as_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "env": c.env,
            "policy": c.policy,
            "seed": c.seed,
            "checkpoint_dir": str(c.checkpoint_dir),
            "max_episode_steps": c.max_episode_steps,
            "success_rule": success_rule(c.env),
            "versions": [
                {
                    "version": r.version,
                    "source": r.source,
                    **r.summary.as_dict(),
                    "videos": [str(p) for p in r.videos],
                    "episode_results": [dataclasses.asdict(e) for e in r.episodes],
                }
                for r in self.results
            ],
            "comparisons": [str(p) for p in self.comparisons],
        }


def resolve_versions(config: EvalConfig) -> list[int]:
    """[version, compared version]: None means the newest. ValueError when there is none."""
    available = versions_in(config.checkpoint_dir)
    if not available:
        raise ValueError(f"{config.checkpoint_dir}: no published versions")
    first = available[-1] if config.version is None else config.version
    return [first] if config.compare is None else [first, config.compare]


def evaluate(config: EvalConfig, console: Console | None = None) -> EvalReport:
    """Run the evaluation (a progress bar on `console` when given) and write its videos."""
    if config.episodes < 1:
        raise ValueError(f"episodes: expected >= 1, got {config.episodes}")
    versions = resolve_versions(config)
    if config.robots:
        return evaluate_robots(config, versions, console)
    record = config.video_dir is not None and config.video_episodes != 0
    if record:
        headless_gl()
    envs = [make_env(config.env, config.max_episode_steps,
                     tuple(config.video_size) if record else None) for _ in versions]  # fmt: skip
    env = envs[0]
    obs_dim = int(gym.spaces.flatdim(env.observation_space))
    action_dim = int(math.prod(env.action_space.shape))
    model = config.model.for_env(obs_dim, action_dim)
    rescale = bool(getattr(model, "normalized_actions", False))
    greedy = config.policy == "greedy"
    policies = [
        make_policy(
            load_version(config.checkpoint_dir, v, model, config.value_hidden, config.model_seed),
            greedy,
        )
        for v in versions
    ]
    on_disk = set(versions_in(config.checkpoint_dir))
    fps = float(env.metadata.get("render_fps") or 30)
    rule = success_rule(config.env)
    results = [
        VersionEval(v, [], summarize([], [], None), [], "disk" if v in on_disk else "seed")
        for v in versions
    ]
    comparisons: list[Path] = []
    video_dir = Path(config.video_dir) if config.video_dir is not None else None
    progress = _progress(console, len(versions) * config.episodes)
    with progress:
        task = progress.add_task("episodes", total=len(versions) * config.episodes)
        for i in range(config.episodes):
            key = jax.random.fold_in(jax.random.key(config.seed), i)
            recording = (
                video_dir is not None
                and record
                and (config.video_episodes is None or i < config.video_episodes)
            )
            for result, policy, env in zip(results, policies, envs, strict=True):
                path = video_dir / f"v{result.version}_ep{i:03d}.mp4" if recording else None
                writer = VideoWriter(path, fps) if path is not None else None
                try:
                    ep = run_episode(env, policy, config.seed + i, key, rule, rescale,
                                     writer.write if writer is not None else None)  # fmt: skip
                finally:
                    if writer is not None:
                        writer.close()
                result.episodes.append(ep)
                if path is not None:
                    result.videos.append(path)
                progress.advance(task)
            if recording and len(results) == 2:
                a, b = results
                out = video_dir / f"v{a.version}_vs_v{b.version}_ep{i:03d}.mp4"
                side_by_side(a.videos[-1], b.videos[-1], out,
                             (f"v{a.version}", f"v{b.version}"), fps)  # fmt: skip
                comparisons.append(out)
    for env in envs:
        env.close()
    for r in results:
        eps = r.episodes
        successes = [e.success for e in eps]
        r.summary = summarize(
            [e.ret for e in eps], [e.length for e in eps],
            None if any(s is None for s in successes) else successes, config.confidence,
        )  # fmt: skip
    return EvalReport(config, results, comparisons)


def evaluate_robots(
    config: EvalConfig, versions: list[int], console: Console | None = None
) -> EvalReport:
    """Each version in turn pinned on the policy server until `config.episodes` of the robots'
    episodes ended with it (robots.py); videos from the stored camera images."""
    import os

    from openpi_rl.eval.robots import episode_frames, pinned_episodes
    from openpi_rl.replay import ReplayReader

    token = config.admin_token or os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise ValueError(f"--robots: no admin token (--admin-token or ${ADMIN_TOKEN_ENV})")
    survival = success_rule(config.env) == "survived"
    video_dir = Path(config.video_dir) if config.video_dir is not None else None
    results, comparisons = [], []
    progress = _progress(console, len(versions) * config.episodes)
    with progress:
        task = progress.add_task("episodes", total=len(versions) * config.episodes)
        for v in versions:
            eps = pinned_episodes(
                config.admin_endpoint, token, config.replay_dir, v, config.episodes, survival,
                config.robots_timeout_s, lambda _: progress.advance(task),
            )  # fmt: skip
            videos: list[Path] = []
            k = len(eps) if config.video_episodes is None else config.video_episodes
            if video_dir is not None:
                with ReplayReader(config.replay_dir) as reader:
                    for i, ep in enumerate(eps[:k]):
                        frames, fps = episode_frames(reader, ep)
                        if not frames:
                            break  # the robots' observations hold no images
                        path = video_dir / f"v{v}_ep{i:03d}.mp4"
                        with VideoWriter(path, fps) as writer:
                            for frame in frames:
                                writer.write(frame)
                        videos.append(path)
            results.append(VersionEval(v, [e.result for e in eps], summarize([], [], None), videos))
    if video_dir is not None and len(results) == 2:
        a, b = results
        for i, (pa, pb) in enumerate(zip(a.videos, b.videos, strict=False)):
            out = video_dir / f"v{a.version}_vs_v{b.version}_ep{i:03d}.mp4"
            side_by_side(pa, pb, out, (f"v{a.version}", f"v{b.version}"), 10.0)
            comparisons.append(out)
    for r in results:
        _summarize(r, config.confidence)
    return EvalReport(config, results, comparisons)


def _summarize(r: VersionEval, confidence: float) -> None:
    successes = [e.success for e in r.episodes]
    r.summary = summarize(
        [e.ret for e in r.episodes], [e.length for e in r.episodes],
        None if any(s is None for s in successes) else successes, confidence,
    )  # fmt: skip


def _progress(console: Console | None, total: int) -> Any:
    if console is None:
        return _NoProgress()
    return Progress(
        TextColumn("[bold]eval[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )  # fmt: skip


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def advance(self, task: int) -> None:
        pass


def _interval(value: float | None, low: float | None, high: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{fmt.format(value)} [n/a]"
    return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"


def report_table(report: EvalReport) -> Table:
    """One row per version: episodes, success rate and mean return with their intervals."""
    c = report.config
    pct = f"{c.confidence:.0%}"
    where = (
        f"robots through {c.admin_endpoint} (lengths in chunks)"
        if c.robots
        else f"{c.env}, {c.policy}, seeds {c.seed}..{c.seed + c.episodes - 1}"
    )
    table = Table(title=f"openpi-rl eval: {where}")
    for name in ("version", "episodes", f"success rate [{pct} Wilson]",
                 f"mean return [{pct} t]", "mean length"):  # fmt: skip
        table.add_column(name, justify="right")
    for r in report.results:
        s = r.summary
        table.add_row(
            f"{r.version}{' (seed)' if r.source == 'seed' else ''}", str(s.episodes),
            _interval(s.success_rate, s.success_low, s.success_high, "{:.2f}"),
            _interval(s.mean_return, s.return_low, s.return_high, "{:.1f}"),
            f"{s.mean_length:.1f}",
        )  # fmt: skip
    return table


def eval_main(config: EvalConfig) -> int:
    """Evaluate, print the table (and the files written), write the JSON summary."""
    # Piped (a log, a CI job): rich would fit the table into 80 columns and wrap the intervals.
    console = Console(width=None if sys.stdout.isatty() else 120)
    err = Console(stderr=True)
    try:
        report = evaluate(config, console=err)
    except (ValueError, RuntimeError) as e:
        err.print(f"openpi-rl eval: {e}", markup=False, soft_wrap=True)
        return 1
    console.print(report_table(report))
    for r in report.results:
        for p in r.videos:
            console.print(f"video: {p}", markup=False, soft_wrap=True)
    for p in report.comparisons:
        console.print(f"side by side: {p}", markup=False, soft_wrap=True)
    summary = config.summary
    if summary is None and config.video_dir is not None:
        summary = str(Path(config.video_dir) / "summary.json")
    if summary is not None:
        Path(summary).parent.mkdir(parents=True, exist_ok=True)
        Path(summary).write_text(json.dumps(report.as_dict(), indent=1) + "\n")
        console.print(f"summary: {summary}", markup=False, soft_wrap=True)
    return 0
