"""The README's picture of the pendant page (docs/pendant.png), made from a real bridge.

Two simulated robots balance MuJoCo's `InvertedPendulum-v5` with a noisy PD controller whose
noise shrinks with each "policy version" (scripted, not learned: it only fills the replay the
way the policy server would, one transition per 10-step chunk with the camera's picture in its
observation). A real `RewardBridge` serves the page; Debian's chromium (playwright, a phone
screen) opens it, an operator press is acknowledged, and the full page is saved.

    MUJOCO_GL=egl .venv/bin/python scripts/pendant_screenshot.py  # --out docs/pendant.png

Needs an offscreen OpenGL for MuJoCo's camera (`MUJOCO_GL=egl`, the default here, or
`osmesa`) and /usr/bin/chromium (`make chromium`). About 10 s on 2 cores.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import tyro

os.environ.setdefault("MUJOCO_GL", "egl")  # before gymnasium imports mujoco

CHUNK = 10  # env steps per stored transition (one served action chunk)
GAINS = np.array([0.5, 10.0, 1.0, 2.0])  # PD on cart position, pole angle and their speeds
TOKEN = "screenshot-token-0123456789"


@dataclasses.dataclass(frozen=True)
class Args:
    out: Path = Path(__file__).resolve().parents[1] / "docs" / "pendant.png"
    """Where the PNG goes."""
    versions: int = 6
    """Policy versions, each with `episodes` ended episodes per robot."""
    episodes: int = 2
    """Ended episodes per version and robot."""
    max_steps: int = 200
    """An episode is truncated after this many env steps."""
    chromium: str = "/usr/bin/chromium"


def run_episode(env, writer, robot, episode, version, noise, rng, max_chunks, ends=True):
    """Play one episode in chunks of CHUNK steps; each chunk is a stored transition whose
    observation holds the camera picture and the state at its start, reported with the chunk's
    summed reward. `ends` False: stop after `max_chunks` chunks, the episode still running."""
    from openpi_rl.replay import records

    obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
    for chunk in range(max_chunks):
        record = records.encode_observation(
            {"top": env.render(), "state": obs.astype(np.float32)}, prompt="balance the pole"
        )
        actions = np.zeros((CHUNK, 1), np.float32)
        reward, terminated, truncated = 0.0, False, False
        for i in range(CHUNK):
            actions[i] = np.clip(GAINS @ obs + noise * rng.standard_normal(), -3.0, 3.0)
            obs, r, terminated, truncated, _ = env.step(actions[i])
            reward += float(r)
            if terminated or truncated:
                break
        tid = writer.append_transition(
            robot, episode, chunk, version, record, actions, None, -1.0, 0.0, 0.0
        )
        writer.report(tid, reward, done=terminated and ends, truncated=truncated and ends)
        if terminated or truncated:
            return


def main(args: Args) -> int:
    import gymnasium as gym
    from playwright.sync_api import sync_playwright

    from openpi_rl.replay import ReplayConfig, ReplayWriter
    from openpi_rl.reward_bridge import BridgeConfig, RewardBridge

    rng = np.random.default_rng(0)
    env = gym.make(
        "InvertedPendulum-v5",
        render_mode="rgb_array",
        width=240,
        height=180,
        max_episode_steps=args.max_steps,
    )
    chunks = -(-args.max_steps // CHUNK)
    with tempfile.TemporaryDirectory() as tmp:
        replay = Path(tmp) / "replay"
        with ReplayWriter(ReplayConfig(path=replay)) as writer:
            for version in range(1, args.versions + 1):
                noise = 4.0 / version  # the scripted "policy" improves with each version
                for ep in range(args.episodes):
                    for robot in ("arm-1", "arm-2"):
                        episode = f"{robot}-v{version}-{ep}"
                        run_episode(env, writer, robot, episode, version, noise, rng, chunks)
            # The episodes running now, on the live version: the page shows their last frame.
            for robot in ("arm-2", "arm-1"):
                live = f"{robot}-live"
                run_episode(env, writer, robot, live, args.versions, 0.5, rng, 3, ends=False)
            writer.flush()
            config = BridgeConfig(
                replay_dir=str(replay),
                ws_port=0,
                http_port=None,
                metrics_port=None,
                operators={"ana": TOKEN},
                status_interval_s=0.1,
                returns_interval_s=0.2,
                press_latency_s=0.0,
            )
            bridge = RewardBridge(config).start()
            try:
                with sync_playwright() as p:
                    browser = p.chromium.launch(
                        executable_path=args.chromium, headless=True, args=["--no-sandbox"]
                    )
                    page = browser.new_page(viewport={"width": 412, "height": 915})
                    page.goto(f"http://127.0.0.1:{bridge.ws_port}/#token={TOKEN}")
                    page.wait_for_selector("#conn[data-state=connected]", timeout=15_000)
                    page.select_option("#robot", "arm-1")
                    page.wait_for_selector('#frames img[data-camera="top"]', timeout=15_000)
                    page.wait_for_function(
                        f"document.querySelectorAll('#chart circle.pt').length === {args.versions}"
                    )
                    page.keyboard.press("+")
                    page.wait_for_function(
                        "document.getElementById('ack').textContent.includes('stored')"
                    )
                    page.wait_for_function("document.querySelectorAll('#recent li').length > 0")
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.out), full_page=True)
                    browser.close()
            finally:
                bridge.close()
    env.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
