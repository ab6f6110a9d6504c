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
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
    """A selected episode: its chunks in serving order and the event kinds / values credited
    to each (observations are read when it is written, one episode in memory at a time)."""

    robot_id: str
    episode_id: str
    rows: list[TransitionRow]
    events: list[list[tuple[str, float]]]

    @property
    def success(self) -> bool:
        return any(kind == "success" for evs in self.events for kind, _ in evs)

    def frames(self, reader: ReplayReader) -> list[Frame]:
        out = []
        for row, evs in zip(self.rows, self.events, strict=True):
            stored = reader.stored_observation(row)
            kinds = {k for k, _ in evs}
            out.append(
                Frame(
                    row=row,
                    observation=stored.arrays,
                    prompt=stored.prompt,
                    reward=row.reward + sum(v for _, v in evs),
                    done=row.done or bool(kinds & set(TERMINAL_KINDS)),
                    truncated=row.truncated or bool(kinds & set(TIME_LIMIT_KINDS)),
                    success="success" in kinds,
                )
            )
        return out


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
    """The replay's episodes that pass `flt`, in order of their first chunk. ValueError for an
    unknown robot, EmptySelection when nothing passes."""
    known = reader.stats().per_robot
    if flt.robot is not None and flt.robot not in known:
        raise ValueError(f"robot: {flt.robot!r} has no stored chunks (robots: {sorted(known)})")
    events: dict[int, list[tuple[str, float]]] = {}
    for ev in reader.reward_events(robot_id=flt.robot):
        if ev["transition_id"] is not None:
            events.setdefault(ev["transition_id"], []).append((ev["kind"], ev["value"]))
    grouped: dict[tuple[str, str], list[TransitionRow]] = {}
    for row in reader.transitions(robot_id=flt.robot):
        if flt.min_version is not None and row.policy_version < flt.min_version:
            continue
        if flt.max_version is not None and row.policy_version > flt.max_version:
            continue
        grouped.setdefault((row.robot_id, row.episode_id), []).append(row)
    episodes = []
    for (robot, episode), rows in grouped.items():
        ep = Episode(robot, episode, rows, [events.get(r.id, []) for r in rows])
        if flt.takeovers_only and not any(r.intervened for r in rows):
            continue
        if flt.success_only and not ep.success:
            continue
        episodes.append(ep)
    if not episodes:
        raise EmptySelection(f"no stored chunk matches the filters ({flt})")
    return episodes


def estimate_fps(episodes: list[Episode]) -> int:
    """Chunks per second, from the median time between an episode's consecutive chunks (1 if
    no episode has two), at most `MAX_FPS` (SVT-AV1's limit; a robot's chunk rate is far
    below)."""
    gaps = [
        b.t_wall - a.t_wall
        for ep in episodes
        for a, b in zip(ep.rows, ep.rows[1:], strict=False)
        if b.t_wall > a.t_wall
    ]
    return min(MAX_FPS, max(1, round(1.0 / statistics.median(gaps)))) if gaps else 1


def _executed(row: TransitionRow) -> np.ndarray:
    """The chunk the robot executed: the operator's on a take-over, else the served one."""
    return row.actions if row.executed_actions is None else row.executed_actions


def _layout(f: Frame) -> list[tuple[str, str, tuple[int, ...]]]:
    layout = [(k, v.dtype.str, v.shape) for k, v in sorted(f.observation.items())]
    return [
        *layout,
        ("action", "", _executed(f.row).shape),
        ("policy_action", "", f.row.actions.shape),
    ]


class DatasetWriter:
    """Writes a dataset episode by episode: the data parquet through one `ParquetWriter`, each
    camera through one `VideoEncoder`, stats accumulated; `finish` writes `meta/`. The first
    frame fixes the layout (observation keys, dtypes, shapes, action shapes); a frame that
    differs is a ValueError (a dataset has one layout)."""

    def __init__(self, out: Path, fps: int, vcodec: str, crf: int):
        self.out, self.fps, self.vcodec, self.crf = out, fps, vcodec, crf
        self.features: dict[str, dict] = {}
        self.names: dict[str, str] = {}  # observation key -> feature
        self.layout: list | None = None
        self.tasks: dict[str, int] = {}
        self.episodes: dict[str, list] = {}
        self.frames = 0
        self.stats: dict[str, fmt.RunningStats] = {}
        self.videos: dict[str, fmt.VideoEncoder] = {}
        self.parquet: pq.ParquetWriter | None = None

    def _start(self, first: Frame) -> None:
        self.layout = _layout(first)
        for k, a in sorted(first.observation.items()):
            image = fmt.is_image(a)
            name = self.names[k] = fmt.feature_name(k, image)
            self.features[name] = fmt.feature_spec(a.dtype.name, a.shape)
            if image:
                self.features[name] = {"dtype": "video", "shape": list(a.shape),
                                       "names": ["height", "width", "channels"]}  # fmt: skip
                path = self.out / fmt.VIDEO_PATH.format(video_key=name, chunk_index=0, file_index=0)
                self.videos[name] = fmt.VideoEncoder(
                    path, self.fps, fmt.video_codec(self.vcodec), self.crf
                )
        self.features["action"] = fmt.feature_spec("float32", _executed(first.row).shape)
        self.features["policy_action"] = fmt.feature_spec("float32", first.row.actions.shape)
        for k, dtype in {**fmt.STEP_FEATURES, **fmt.INDEX_FEATURES}.items():
            self.features[k] = fmt.feature_spec(dtype, ())
        self.stats = {
            k: fmt.RunningStats(image=spec["dtype"] == "video")
            for k, spec in self.features.items()
            if spec["dtype"] != "bool"
        }

    def add_episode(self, ep: Episode, frames: list[Frame]) -> None:
        if self.layout is None:
            self._start(frames[0])
        e, start = len(self.episodes.get("episode_index", [])), self.frames
        cols: dict[str, list] = {k: [] for k in self.features}
        ep_tasks: list[str] = []
        for i, f in enumerate(frames):
            if _layout(f) != self.layout:
                raise ValueError(
                    f"transition {f.row.id} ({ep.robot_id}/{ep.episode_id}): layout "
                    f"{_layout(f)}, expected {self.layout}: a dataset has one layout (filter by "
                    "robot or version)"
                )
            text = f.prompt or ""  # LeRobot needs a task per frame: "" stands for no prompt
            self.tasks.setdefault(text, len(self.tasks))
            if text not in ep_tasks:
                ep_tasks.append(text)
            r = f.row
            values = {
                "timestamp": i / self.fps, "frame_index": i, "episode_index": e,
                "index": start + i, "task_index": self.tasks[text],
                "action": np.asarray(_executed(r), np.float32),
                "policy_action": np.asarray(r.actions, np.float32),
                "next.reward": f.reward, "next.done": f.done, "next.truncated": f.truncated,
                "next.success": f.success, "intervened": r.intervened,
                "policy_version": r.policy_version, "step": r.step, "logp": r.logp,
                "value": r.value, "t_wall": r.t_wall,
            }  # fmt: skip
            for k, name in self.names.items():
                values[name] = f.observation[k]
            for k, v in values.items():
                cols[k].append(v)
        for name, video in self.videos.items():
            for img in cols[name]:
                video.add(img)
        for k, st in self.stats.items():
            st.add(np.stack(cols[k]) if np.ndim(cols[k][0]) else np.asarray(cols[k]))
        table = pa.table(
            {
                k: fmt.arrow_column(cols[k], spec["dtype"], tuple(spec["shape"]))
                for k, spec in self.features.items()
                if spec["dtype"] != "video"
            }
        )
        if self.parquet is None:
            path = self.out / fmt.DATA_PATH.format(chunk_index=0, file_index=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parquet = pq.ParquetWriter(path, table.schema)
        self.parquet.write_table(table)
        self.frames += len(frames)
        row = {
            "episode_index": e, "tasks": ep_tasks, "length": len(frames),
            "data/chunk_index": 0, "data/file_index": 0,
            "dataset_from_index": start, "dataset_to_index": self.frames,
        }  # fmt: skip
        for name in self.videos:
            row |= {f"videos/{name}/chunk_index": 0, f"videos/{name}/file_index": 0,
                    f"videos/{name}/from_timestamp": start / self.fps,
                    f"videos/{name}/to_timestamp": self.frames / self.fps}  # fmt: skip
        row |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        row |= {"robot_id": ep.robot_id, "source_episode_id": ep.episode_id, "success": ep.success}
        for k, v in row.items():
            self.episodes.setdefault(k, []).append(v)

    def finish(self, robot_type: str | None) -> None:
        if self.parquet is not None:
            self.parquet.close()
        for name, video in self.videos.items():
            self.features[name]["info"] = video.close()
        n_eps = len(self.episodes["episode_index"])
        fmt.write_parquet(pa.table(self.episodes), self.out / fmt.EPISODES_PATH)
        fmt.write_parquet(fmt.tasks_table(list(self.tasks)), self.out / fmt.TASKS_PATH)
        info = {
            "codebase_version": fmt.CODEBASE_VERSION, "robot_type": robot_type,
            "total_episodes": n_eps, "total_frames": self.frames, "total_tasks": len(self.tasks),
            "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
            "fps": self.fps, "splits": {"train": f"0:{n_eps}"}, "data_path": fmt.DATA_PATH,
            "video_path": fmt.VIDEO_PATH if self.videos else None, "features": self.features,
        }  # fmt: skip
        fmt.write_json(info, self.out / fmt.INFO_PATH)
        fmt.write_json({k: st.result() for k, st in self.stats.items()}, self.out / fmt.STATS_PATH)
        keys = {"observation_keys": {name: k for k, name in self.names.items()}}
        fmt.write_json(keys, self.out / fmt.KEYS_PATH)

    def abort(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
        for video in self.videos.values():
            video.abort()


def export_lerobot(
    reader: ReplayReader,
    out: Path,
    flt: ExportFilter = ExportFilter(),
    fps: int | None = None,
    vcodec: str = "libsvtav1",
    crf: int = 30,
    robot_type: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write the selected episodes to `out` (must not exist) as a LeRobot v3.0 dataset, one
    episode in memory at a time; on an error, `out` is removed. fps: frames (chunks) per second
    (None: estimated from the stored times). vcodec / crf: the camera videos' codec (libsvtav1,
    LeRobot's default; h264 when PyAV lacks it) and quality. progress(frames, total): called
    after each episode."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists (choose a new directory)")
    episodes = select_episodes(reader, flt)
    fps = fps if fps is not None else estimate_fps(episodes)
    if fps < 1:
        raise ValueError(f"fps: expected >= 1, got {fps}")
    total = sum(len(ep.rows) for ep in episodes)
    out.mkdir(parents=True)
    writer = DatasetWriter(out, fps, vcodec, crf)
    try:
        for ep in episodes:
            writer.add_episode(ep, ep.frames(reader))
            if progress is not None:
                progress(len(ep.rows), total)
        writer.finish(robot_type)
    except BaseException:
        writer.abort()
        shutil.rmtree(out, ignore_errors=True)
        raise
    return ExportResult(len(episodes), writer.frames, fps, writer.features, out)
