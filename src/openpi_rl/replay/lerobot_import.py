"""`import_lerobot`: a LeRobot dataset (format v3.0, `lerobot_format.py`) into a replay
directory as demonstration rows: each frame a transition that an operator took over
(`intervened`, `executed_actions` = the frame's `action`), so the learner trains them through
the behaviour-cloning term take-overs use and leaves them out of the PPO ratio, unchanged.

Frames map back by feature name: `meta/openpi_rl.json` (written by our export) names each
observation feature's key; otherwise LeRobot's naming is read (`observation.state` -> `state`,
`observation.images.<cam>` -> `<cam>`). The action must be a chunk [H, D] as the model serves;
a dataset of single-step actions [D] is imported as chunks [1, D].
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from openpi_rl.replay import lerobot_format as fmt
from openpi_rl.replay import postgres, records
from openpi_rl.replay.reader import ReplayReader
from openpi_rl.replay.writer import ReplayConfig


@dataclasses.dataclass(frozen=True)
class ImportResult:
    episodes: int
    rows: int
    policy_version: int | None  # None: each row keeps the dataset's policy_version
    path: Path | str  # the replay: a directory or a postgresql:// URL


def _read_tables(root: Path, sub: str) -> pa.Table:
    paths = sorted((root / sub).glob("*/*.parquet"))
    if not paths:
        raise FileNotFoundError(f"{root / sub}: no parquet files (not a LeRobot v3.0 dataset?)")
    return pa.concat_tables([pq.read_table(p) for p in paths])


def read_info(root: Path) -> dict:
    """`meta/info.json`, checked to be a format this import reads."""
    path = root / fmt.INFO_PATH
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (not a LeRobot dataset)")
    info = json.loads(path.read_text())
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise ValueError(
            f"{path}: codebase_version {version!r}; this import reads v3.x (convert older "
            "datasets with lerobot's convert_dataset_v21_to_v30)"
        )
    if "action" not in info.get("features", {}):
        raise ValueError(f"{path}: features: expected 'action', got {sorted(info['features'])}")
    return info


class _VideoReader:
    """One camera file's frames by number, decoded forward: episodes are read in file order,
    so each file is decoded once and only one frame per camera is held."""

    def __init__(self, path: Path, fps: int):
        self.path, self.fps = path, fps
        self._frames = fmt.decode_video(path, fps)
        self._last: tuple[int, np.ndarray | None] = (-1, None)

    def frame(self, i: int) -> np.ndarray:
        if i < self._last[0]:  # an episode out of file order: decode again from the start
            self._frames, self._last = fmt.decode_video(self.path, self.fps), (-1, None)
        while self._last[0] < i:
            got = next(self._frames, None)
            if got is None:
                break
            self._last = got
        if self._last[0] != i or self._last[1] is None:
            raise ValueError(f"{self.path}: no video frame {i} (at {i / self.fps:.4f} s)")
        return self._last[1]


def _target_layout(replay: Path | str) -> tuple[int, np.ndarray | None]:
    """(newest policy version stored, 0 if none; a stored row's policy_actions, or None)."""
    try:
        reader = ReplayReader(replay)
    except FileNotFoundError:  # a new replay
        return 0, None
    with reader:
        newest = reader.newest_policy_version()
        rows = reader.transitions(limit=1)
    return (newest or 0), (rows[0].policy_actions if rows else None)


def import_lerobot(
    dataset: Path,
    replay: Path | str,
    policy_version: int | None = None,
    keep_versions: bool = False,
    robot_id: str | None = None,
    episode_prefix: str = "demo-",
    progress: Callable[[int, int], None] | None = None,
) -> ImportResult:
    """Append every frame of `dataset` to the replay directory `replay` (created if missing; no
    server may be writing it) as a demonstration row.

    policy_version: stamped on every row (None: the newest version in `replay`, 0 for a new one:
    the learner drops chunks older than its `max_policy_lag`, demonstrations included).
    keep_versions: keep the dataset's `policy_version` column instead. robot_id: the rows'
    robot (None: the dataset's per-episode `robot_id`, else "lerobot"). Episode ids are
    `episode_prefix` + the dataset's `source_episode_id` (else its episode index).
    progress(frames, total): called after each episode's frames are queued.
    """
    dataset = Path(dataset)
    replay = replay if postgres.is_url(replay) else Path(replay)
    info = read_info(dataset)
    fps = int(info["fps"])
    features: dict[str, dict] = info["features"]
    keys_path = dataset / fmt.KEYS_PATH
    named = json.loads(keys_path.read_text())["observation_keys"] if keys_path.exists() else {}
    obs_features = {f: named.get(f) or fmt.observation_key(f) for f in features}
    obs_features = {f: k for f, k in obs_features.items() if k}
    videos = [f for f in obs_features if features[f]["dtype"] == "video"]
    bad = [f for f in obs_features if features[f]["dtype"] == "image"]
    if bad:
        raise ValueError(f"features {bad}: images stored in parquet; expected videos")

    data = _read_tables(dataset, fmt.DATA_PATH.split("/")[0])
    episodes = _read_tables(dataset, "meta/episodes").to_pylist()
    tasks = fmt.read_tasks(dataset)

    def col(name: str) -> np.ndarray | None:
        if name not in data.column_names:
            return None
        spec = features[name]
        return fmt.column_numpy(data.column(name), spec["dtype"], tuple(spec["shape"]))

    arrays = {f: col(f) for f in obs_features if f not in videos}
    action = col("action")
    if action is None:
        raise ValueError(f"{dataset}: data has no 'action' column")
    if action.ndim == 2:
        action = action[:, None, :]  # single-step actions: chunks of one
    served = col("policy_action")
    served = action if served is None or served.shape != action.shape else served
    n = len(action)
    zeros = np.zeros(n)
    reward = col("next.reward")
    done = col("next.done")
    truncated = col("next.truncated")
    value = col("value")
    versions = col("policy_version")
    step = col("step")
    frame_index = col("frame_index")
    task_index = col("task_index")
    index = col("index")
    if index is None or task_index is None:
        raise ValueError(f"{dataset}: data lacks 'index' / 'task_index' (LeRobot's columns)")
    if keep_versions and versions is None:
        raise ValueError(f"{dataset}: keep_versions, but the data has no 'policy_version'")
    row_of = {int(i): r for r, i in enumerate(index)}

    if isinstance(replay, Path):
        replay.mkdir(parents=True, exist_ok=True)
    newest, stored_pa = _target_layout(replay)
    version = None if keep_versions else (newest if policy_version is None else policy_version)
    pa_zeros = None
    if stored_pa is not None and stored_pa.shape != served.shape[1:]:
        pa_zeros = np.zeros_like(stored_pa)  # a token model's rows: out of the ratio anyway

    cameras: dict[str, _VideoReader] = {}

    def camera_frame(ep: dict, feature: str, i: int) -> np.ndarray:
        path = dataset / fmt.VIDEO_PATH.format(
            video_key=feature,
            chunk_index=ep[f"videos/{feature}/chunk_index"],
            file_index=ep[f"videos/{feature}/file_index"],
        )
        if feature not in cameras or cameras[feature].path != path:
            cameras[feature] = _VideoReader(path, fps)
        return cameras[feature].frame(i)

    # A bulk load: wait for the writer's queue rather than refuse (the server's 0.1 s).
    writer = ReplayConfig(path=replay, enqueue_timeout_s=60.0).create()
    rows_written = 0
    try:
        for ep in episodes:
            lo, hi = int(ep["dataset_from_index"]), int(ep["dataset_to_index"])
            robot = robot_id or ep.get("robot_id") or "lerobot"
            episode = f"{episode_prefix}{ep.get('source_episode_id', ep['episode_index'])}"
            for i in range(lo, hi):
                r = row_of[i]
                obs = {k: arrays[f][r] for f, k in obs_features.items() if f not in videos}
                for f in videos:
                    start = round(float(ep[f"videos/{f}/from_timestamp"]) * fps)
                    fi = int(frame_index[r]) if frame_index is not None else i - lo
                    obs[obs_features[f]] = camera_frame(ep, f, start + fi)
                text = tasks[int(task_index[r])]
                tid = writer.append_transition(
                    robot, episode, int(step[r]) if step is not None else i - lo,
                    int(versions[r]) if version is None else version,
                    records.encode_observation(obs, text or None), served[r], pa_zeros, 0.0,
                    float(value[r]) if value is not None else 0.0, t_mono=time.monotonic(),
                )  # fmt: skip
                ends = bool(done[r]) if done is not None else False
                # A recorded episode is over: its last frame ends it (a time limit, bootstrapped)
                # unless it is terminal, so the learner never waits on it as an open episode.
                cut = bool(truncated[r]) if truncated is not None else False
                writer.report(
                    tid,
                    float((reward if reward is not None else zeros)[r]),
                    done=ends,
                    truncated=cut or (i == hi - 1 and not ends),
                    executed_actions=action[r],
                    intervened=True,
                )
                rows_written += 1
            if progress is not None:
                progress(hi - lo, n)
    finally:
        writer.close()
    return ImportResult(len(episodes), rows_written, version, replay)
