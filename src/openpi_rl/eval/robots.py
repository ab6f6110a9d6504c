"""A version evaluated on the robots themselves: pinned on the policy server through its admin
endpoint, then judged by the episodes the robots finish with it, read from the replay.

    pin N (admin) -> every robot's next chunk comes from N
    -> episodes that start after the pin and end, every chunk served by N (the replay)
    -> returns, lengths (chunks), success -> the pin as it was before (admin)

An episode's return is what the learner learns from: the rewards the robot reported plus the
operators' feedback values on its chunks. Success is the operator's verdict on the episode
(`success` / `failure` at the pendant); without one, on a task where falling ends an episode
(`survival`), an episode that ended by its time limit (`truncated`) succeeded and one that
ended `done` failed. Frames: the images of each chunk's stored observation (any array shaped
like a picture), one per chunk.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from openpi_rl.eval.episodes import EpisodeResult
from openpi_rl.replay import ReplayReader
from openpi_rl_client.admin import admin_request


def admin_call(
    endpoint: str, token: str, command: str, version: int | None = None, timeout_s: float = 60.0
) -> dict[str, Any]:
    """One request to the policy server's admin endpoint. Returns the reply's status;
    RuntimeError with the server's error, TimeoutError when none comes."""
    reply = admin_request(endpoint, token, command, version, timeout_s)
    if "error" in reply:
        err = reply["error"]
        raise RuntimeError(f"admin {endpoint}: {command} refused: {err.get('code')}: "
                           f"{err.get('message')}")  # fmt: skip
    return reply["status"]


def image_arrays(observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of a stored observation shaped like pictures, as uint8 [H, W, 3]: [H, W, C]
    or [C, H, W] with C in (1, 3), uint8, or floats in [0, 1] (or [-1, 1]: openpi's images)."""
    out = {}
    for name, x in observation.items():
        x = np.asarray(x)
        if x.ndim != 3:
            continue
        if x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
            x = np.moveaxis(x, 0, -1)
        if x.shape[-1] not in (1, 3) or min(x.shape[:2]) < 8:
            continue
        if x.dtype != np.uint8:
            x = x.astype(np.float32)
            x = (x + 1.0) / 2.0 if x.min() < 0 else x
            x = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        out[name] = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
    return out


@dataclasses.dataclass(frozen=True)
class RobotEpisode:
    robot_id: str
    episode_id: str
    result: EpisodeResult  # length: chunks; seed: -1 (a robot's episode has none)
    first_transition: int
    last_transition: int


def finished_episodes(
    reader: ReplayReader, version: int, since_id: int, survival: bool
) -> list[RobotEpisode]:
    """Ended episodes whose first chunk is newer than `since_id` and whose every chunk `version`
    served, oldest first."""
    out = []
    events: dict[int, list[dict]] = {}  # transition id -> the feedback on it
    for ev in reader.reward_events():
        if ev["transition_id"] is not None and ev["transition_id"] > since_id:
            events.setdefault(ev["transition_id"], []).append(ev)
    for ep in sorted(reader.episodes(), key=lambda e: e["last_transition"]):
        if not ep["ended"] or ep["first_transition"] <= since_id:
            continue
        rows = reader.transitions(robot_id=ep["robot_id"], episode_id=ep["episode_id"])
        if not rows or any(r.policy_version != version for r in rows):
            continue
        mine = [ev for r in rows for ev in events.get(r.id, [])]
        verdicts = [ev["kind"] for ev in mine if ev["kind"] in ("success", "failure")]
        last = rows[-1]
        if verdicts:
            success: bool | None = verdicts[-1] == "success"
        elif survival:
            success = bool(last.truncated and not last.done)
        else:
            success = None
        ret = float(ep["ep_return"]) + sum(float(ev["value"] or 0.0) for ev in mine)
        result = EpisodeResult(-1, ret, len(rows), bool(last.done), bool(last.truncated), success)
        out.append(RobotEpisode(ep["robot_id"], ep["episode_id"], result,
                                ep["first_transition"], ep["last_transition"]))  # fmt: skip
    return out


def newest_transition(reader: ReplayReader) -> int:
    """The id of the newest stored chunk (0: none)."""
    return max((e["last_transition"] for e in reader.episodes()), default=0)


def pinned_episodes(
    admin_endpoint: str,
    token: str,
    replay_dir: str | Path,
    version: int,
    episodes: int,
    survival: bool,
    timeout_s: float = 600.0,
    on_episode: Callable[[RobotEpisode], None] | None = None,
) -> list[RobotEpisode]:
    """Pin `version`, collect `episodes` of the robots' episodes served wholly by it, and put
    the pin back as it was (pinned to the same version, or following the learner). TimeoutError
    naming how many came when fewer than `episodes` ended within `timeout_s`."""
    before = admin_call(admin_endpoint, token, "status")
    status = admin_call(admin_endpoint, token, "pin", version)
    if status["policy_version"] != version:
        raise RuntimeError(f"pinned {version}, but the server serves {status['policy_version']}")
    found: list[RobotEpisode] = []
    seen: set[tuple[str, str]] = set()
    try:
        with ReplayReader(replay_dir) as reader:
            since = newest_transition(reader)
            deadline = time.monotonic() + timeout_s
            while len(found) < episodes:
                for ep in finished_episodes(reader, version, since, survival):
                    if (ep.robot_id, ep.episode_id) in seen or len(found) >= episodes:
                        continue
                    seen.add((ep.robot_id, ep.episode_id))
                    found.append(ep)
                    if on_episode is not None:
                        on_episode(ep)
                if len(found) >= episodes:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"version {version}: {len(found)} of {episodes} episodes ended on the "
                        f"robots within {timeout_s} s"
                    )
                time.sleep(0.2)
    finally:
        previous = before.get("pinned")
        if previous is None:
            admin_call(admin_endpoint, token, "unpin")
        elif previous != version:
            admin_call(admin_endpoint, token, "pin", previous)
    return found


def episode_frames(reader: ReplayReader, ep: RobotEpisode) -> tuple[list[np.ndarray], float]:
    """(one frame per chunk of `ep`: its stored observation's images side by side, cameras in
    name order; the chunks per second it was served at). No frames when the observations hold
    no image."""
    frames = []
    rows = reader.transitions(robot_id=ep.robot_id, episode_id=ep.episode_id)
    gaps = np.diff([r.t_mono for r in rows])
    fps = (
        float(np.clip(1.0 / np.median(gaps), 1.0, 60.0))
        if len(gaps) and np.median(gaps) > 0
        else 10.0
    )
    for row in rows:
        images = image_arrays(reader.observation(row))
        if not images:
            return [], fps
        pics = [images[k] for k in sorted(images)]
        height = max(p.shape[0] for p in pics)
        pics = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in pics]
        frames.append(np.concatenate(pics, axis=1))
    return frames, fps
