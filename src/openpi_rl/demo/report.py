"""What a demo leaves behind: its learning curve as a PNG (every episode's return over the
fleet's environment steps, and the mean return per policy version) and a video of one greedy
episode of the newest version, evaluated from the checkpoints its learner published."""

from __future__ import annotations

from pathlib import Path

from openpi_rl.demo.robots import Episode
from openpi_rl.eval import EvalConfig, evaluate, learning_curve_png
from openpi_rl.service.config import ServiceFile

CURVE = "learning_curve.png"
VIDEO_DIR = "video"
VIDEO_STEPS = 300  # a short video: 12 s of InvertedPendulum at 25 frames per second


def write_report(
    episodes: list[Episode], service_file: Path, workdir: Path, env: str, seed: int = 0
) -> list[Path]:
    """Write `workdir/learning_curve.png` and `workdir/video/v<N>_ep000.mp4` (the newest
    version, greedy, at most VIDEO_STEPS steps); returns their paths."""
    curve = learning_curve_png(
        [e.fleet_steps for e in episodes], [e.ret for e in episodes],
        [e.version for e in episodes], workdir / CURVE,
        title=f"openpi-rl demo: {env}, {len({e.robot_id for e in episodes})} robots",
    )  # fmt: skip
    learn = ServiceFile.load(service_file).role_config("learn")
    report = evaluate(
        EvalConfig(
            checkpoint_dir=learn.checkpoint_dir, episodes=1, env=env, seed=seed,
            max_episode_steps=VIDEO_STEPS, video_dir=str(workdir / VIDEO_DIR),
            model=learn.model, value_hidden=learn.value_hidden, model_seed=learn.seed,
        )
    )  # fmt: skip
    return [curve, *report.results[0].videos]
