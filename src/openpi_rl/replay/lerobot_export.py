"""`export_lerobot`: a replay's episodes as a LeRobot dataset (format v3.0, `lerobot_format.py`),
for openpi's and LeRobot's data loaders.

An episode is a (robot, episode id) of the replay; each of its stored transitions (one served
action chunk) becomes one frame. Its reward and end flags are the learner's view of it
(`daemon/replay_source.py`'s rule, restated here: replay owns its rows): env reports plus the
operator's events credited to it; a success / failure event ends it terminally, end_episode by a
time limit. Filters: robot, policy-version range (frames), success and take-overs (episodes).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from openpi_rl.replay import lerobot_format as fmt
from openpi_rl.replay.reader import ReplayReader, TransitionRow

TERMINAL_KINDS = ("success", "failure")
TIME_LIMIT_KINDS = ("end_episode",)
MAX_FPS = 240


@dataclasses.dataclass(frozen=True)
class ExportFilter:
    robot: str | None = None
    """Only this robot's episodes."""
    min_version: int | None = None
    """Only chunks served by this policy version or newer."""
    max_version: int | None = None
    """Only chunks served by this policy version or older."""
    success_only: bool = False
    """Only episodes with a success event credited to one of their chunks."""
    takeovers_only: bool = False
    """Only episodes in which an operator took over at least one chunk."""


@dataclasses.dataclass(frozen=True)
class Frame:
    """One stored transition as a dataset frame."""

    row: TransitionRow
    observation: dict[str, np.ndarray]
    prompt: str | None
    reward: float
    done: bool
    truncated: bool
    success: bool


@dataclasses.dataclass(frozen=True)
class Episode:
    robot_id: str
    episode_id: str
    frames: list[Frame]

    @property
    def success(self) -> bool:
        return any(f.success for f in self.frames)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    episodes: int
    frames: int
    fps: int
    features: dict[str, dict]
    path: Path


class EmptySelection(ValueError):
    """No stored chunk matches the filters."""


def select_episodes(reader: ReplayReader, flt: ExportFilter) -> list[Episode]:
    """The replay's episodes that pass `flt`, in order of their first chunk; frames in serving
    order. ValueError for an unknown robot, EmptySelection when nothing passes."""
    known = reader.stats().per_robot
    if flt.robot is not None and flt.robot not in known:
        raise ValueError(f"robot: {flt.robot!r} has no stored chunks (robots: {sorted(known)})")
    events: dict[int, list[dict]] = {}
    for ev in reader.reward_events(robot_id=flt.robot):
        if ev["transition_id"] is not None:
            events.setdefault(ev["transition_id"], []).append(ev)
    grouped: dict[tuple[str, str], list[TransitionRow]] = {}
    for row in reader.transitions(robot_id=flt.robot):
        if flt.min_version is not None and row.policy_version < flt.min_version:
            continue
        if flt.max_version is not None and row.policy_version > flt.max_version:
            continue
        grouped.setdefault((row.robot_id, row.episode_id), []).append(row)
    episodes = []
    for (robot, episode), rows in grouped.items():
        if flt.takeovers_only and not any(r.intervened for r in rows):
            continue
        kinds = [{e["kind"] for e in events.get(r.id, [])} for r in rows]
        if flt.success_only and not any("success" in k for k in kinds):
            continue
        frames = []
        for row, k in zip(rows, kinds, strict=True):
            stored = reader.stored_observation(row)
            frames.append(
                Frame(
                    row=row,
                    observation=stored.arrays,
                    prompt=stored.prompt,
                    reward=row.reward + sum(e["value"] for e in events.get(row.id, [])),
                    done=row.done or bool(k & set(TERMINAL_KINDS)),
                    truncated=row.truncated or bool(k & set(TIME_LIMIT_KINDS)),
                    success="success" in k,
                )
            )
        episodes.append(Episode(robot, episode, frames))
    if not episodes:
        raise EmptySelection(f"no stored chunk matches the filters ({flt})")
    return episodes


def estimate_fps(episodes: list[Episode]) -> int:
    """Chunks per second, from the median time between an episode's consecutive chunks (1 if
    no episode has two), at most `MAX_FPS` (SVT-AV1's limit; a robot's chunk rate is far
    below)."""
    gaps = [
        b.row.t_wall - a.row.t_wall
        for ep in episodes
        for a, b in zip(ep.frames, ep.frames[1:], strict=False)
        if b.row.t_wall > a.row.t_wall
    ]
    return min(MAX_FPS, max(1, round(1.0 / statistics.median(gaps)))) if gaps else 1


def _executed(row: TransitionRow) -> np.ndarray:
    """The chunk the robot executed: the operator's on a take-over, else the served one."""
    return row.actions if row.executed_actions is None else row.executed_actions


def _uniform(episodes: list[Episode], what: str, get: Callable[[Frame], object]) -> object:
    """`get(frame)` where every frame agrees; ValueError naming the first that does not."""
    first = get(episodes[0].frames[0])
    for ep in episodes:
        for f in ep.frames:
            if get(f) != first:
                raise ValueError(
                    f"{what}: transition {f.row.id} ({ep.robot_id}/{ep.episode_id}) has {get(f)},"
                    f" others {first}: a dataset has one layout (filter by robot or version)"
                )
    return first


def export_lerobot(
    reader: ReplayReader,
    out: Path,
    flt: ExportFilter = ExportFilter(),
    fps: int | None = None,
    vcodec: str = "libsvtav1",
    crf: int = 30,
    robot_type: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write the selected episodes to `out` (must not exist) as a LeRobot v3.0 dataset.
    fps: frames (chunks) per second (None: estimated from the stored times). vcodec / crf:
    the camera videos' codec (libsvtav1, LeRobot's default; h264 when PyAV lacks it) and
    quality. progress(n): called after each n frames are gathered."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists (choose a new directory)")
    episodes = select_episodes(reader, flt)
    fps = fps if fps is not None else estimate_fps(episodes)
    if fps < 1:
        raise ValueError(f"fps: expected >= 1, got {fps}")
    layout = _uniform(
        episodes,
        "observation",
        lambda f: sorted((k, v.dtype.str, v.shape) for k, v in f.observation.items()),
    )
    action_shape = _uniform(episodes, "action shape", lambda f: _executed(f.row).shape)
    _uniform(episodes, "policy_action shape", lambda f: f.row.actions.shape)
    obs_keys = [k for k, _, _ in layout]  # type: ignore[attr-defined]
    first = episodes[0].frames[0].observation
    images = [k for k in obs_keys if fmt.is_image(first[k])]
    names = {k: fmt.feature_name(k, k in images) for k in obs_keys}

    tasks: list[str] = []
    task_index: dict[str, int] = {}
    frames = [f for ep in episodes for f in ep.frames]
    cols: dict[str, list] = {}
    ep_rows: dict[str, list] = {k: [] for k in ("episode_index", "tasks", "length")}
    start = 0
    for e, ep in enumerate(episodes):
        ep_tasks = []
        for i, f in enumerate(ep.frames):
            text = f.prompt or ""  # LeRobot needs a task per frame: "" stands for no prompt
            if text not in task_index:
                task_index[text] = len(tasks)
                tasks.append(text)
            if text not in ep_tasks:
                ep_tasks.append(text)
            r = f.row
            values = {
                "timestamp": i / fps, "frame_index": i, "episode_index": e,
                "index": start + i, "task_index": task_index[text],
                "action": np.asarray(_executed(r), np.float32),
                "policy_action": np.asarray(r.actions, np.float32),
                "next.reward": f.reward, "next.done": f.done, "next.truncated": f.truncated,
                "next.success": f.success, "intervened": r.intervened,
                "policy_version": r.policy_version, "step": r.step, "logp": r.logp,
                "value": r.value, "t_wall": r.t_wall,
            }  # fmt: skip
            for k in obs_keys:
                values[names[k]] = f.observation[k]
            for k, v in values.items():
                cols.setdefault(k, []).append(v)
        ep_rows["episode_index"].append(e)
        ep_rows["tasks"].append(ep_tasks)
        ep_rows["length"].append(len(ep.frames))
        ep_rows.setdefault("robot_id", []).append(ep.robot_id)
        ep_rows.setdefault("source_episode_id", []).append(ep.episode_id)
        ep_rows.setdefault("success", []).append(ep.success)
        start += len(ep.frames)
        if progress is not None:
            progress(len(ep.frames))

    features: dict[str, dict] = {}
    for k in obs_keys:
        a = first[k]
        features[names[k]] = fmt.feature_spec(a.dtype.name, a.shape)
        if k in images:
            features[names[k]] = {
                "dtype": "video",
                "shape": list(a.shape),
                "names": ["height", "width", "channels"],
            }
    features["action"] = fmt.feature_spec("float32", action_shape)  # type: ignore[arg-type]
    features["policy_action"] = fmt.feature_spec("float32", frames[0].row.actions.shape)
    for k, dtype in {**fmt.STEP_FEATURES, **fmt.INDEX_FEATURES}.items():
        features[k] = fmt.feature_spec(dtype, ())

    table = pa.table(
        {
            k: fmt.arrow_column(cols[k], spec["dtype"], tuple(spec["shape"]))
            for k, spec in features.items()
            if spec["dtype"] != "video"
        }
    )
    fmt.write_parquet(table, out / fmt.DATA_PATH.format(chunk_index=0, file_index=0))
    stats = {
        k: fmt.feature_stats(np.stack(cols[k]), image=spec["dtype"] == "video")
        for k, spec in features.items()
        if spec["dtype"] != "bool"
    }
    n = len(frames)
    ep_rows["data/chunk_index"] = [0] * len(episodes)
    ep_rows["data/file_index"] = [0] * len(episodes)
    ends = np.cumsum(ep_rows["length"]).tolist()
    ep_rows["dataset_from_index"] = [b - n_ for b, n_ in zip(ends, ep_rows["length"], strict=True)]
    ep_rows["dataset_to_index"] = ends
    codec = fmt.video_codec(vcodec) if images else vcodec
    for k in images:
        key = names[k]
        path = out / fmt.VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0)
        features[key]["info"] = fmt.encode_video(path, cols[key], fps, codec, crf)
        ep_rows[f"videos/{key}/chunk_index"] = [0] * len(episodes)
        ep_rows[f"videos/{key}/file_index"] = [0] * len(episodes)
        ep_rows[f"videos/{key}/from_timestamp"] = [s / fps for s in ep_rows["dataset_from_index"]]
        ep_rows[f"videos/{key}/to_timestamp"] = [s / fps for s in ends]
    ep_rows["meta/episodes/chunk_index"] = [0] * len(episodes)
    ep_rows["meta/episodes/file_index"] = [0] * len(episodes)
    fmt.write_parquet(pa.table(ep_rows), out / fmt.EPISODES_PATH)
    fmt.write_parquet(fmt.tasks_table(tasks), out / fmt.TASKS_PATH)
    info = {
        "codebase_version": fmt.CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": len(episodes),
        "total_frames": n,
        "total_tasks": len(tasks),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": fmt.DATA_PATH,
        "video_path": fmt.VIDEO_PATH if images else None,
        "features": features,
    }
    fmt.write_json(info, out / fmt.INFO_PATH)
    fmt.write_json(stats, out / fmt.STATS_PATH)
    fmt.write_json({"observation_keys": {names[k]: k for k in obs_keys}}, out / fmt.KEYS_PATH)
    return ExportResult(len(episodes), n, fps, features, out)
