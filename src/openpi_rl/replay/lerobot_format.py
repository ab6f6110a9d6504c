"""The LeRobot dataset format, v3.0 (lerobot 0.4 and newer), as the export writes it and the
import reads it: paths, feature names, `meta/*` tables, and the camera videos (PyAV).

A dataset directory holds
- `meta/info.json`: fps, features (dtype, shape), totals, path templates;
- `meta/stats.json`: per-feature min / max / mean / std / count (images per channel, in [0, 1]);
- `meta/tasks.parquet`: the prompts, indexed by task text (a pandas index), column task_index;
- `meta/episodes/chunk-000/file-000.parquet`: one row per episode: its frame range in the data
  file, its span in each camera's video, its tasks;
- `data/chunk-000/file-000.parquet`: one row per frame;
- `videos/<camera feature>/chunk-000/file-000.mp4`: the frames of all episodes, back to back.
The whole dataset is written as one file of each (LeRobot's loader globs `*/*.parquet`, so a
reader does not care; LeRobot itself rolls files over at 100 / 200 MB).

One frame is one served action chunk: `action` is the chunk the robot executed [H, D] (the
operator's on a take-over), `policy_action` the chunk the policy served.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CODEBASE_VERSION = "v3.0"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE.format(chunk_index=0, file_index=0) + ".parquet"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
KEYS_PATH = "meta/openpi_rl.json"
"""Ours, ignored by LeRobot: which replay observation key each feature holds."""

OBS_PREFIX = "observation."
IMAGES_PREFIX = "observation.images."
# Per-frame columns every LeRobot dataset has (LeRobot's DEFAULT_FEATURES).
INDEX_FEATURES = {
    "timestamp": "float32",
    "frame_index": "int64",
    "episode_index": "int64",
    "index": "int64",
    "task_index": "int64",
}
# Per-frame numbers of a stored transition, beside the observation and the two action chunks.
STEP_FEATURES = {
    "next.reward": "float64",  # env reports + operator events credited to the chunk
    "next.done": "bool",  # terminal (done flag, success or failure event)
    "next.truncated": "bool",  # time limit (truncated flag or end_episode event)
    "next.success": "bool",  # a success event was credited to this chunk
    "intervened": "bool",  # an operator took over: `action` is what it executed
    "policy_version": "int64",
    "step": "int64",  # the chunk's step in its replay episode
    "logp": "float64",  # behaviour log-prob of `policy_action` (float64: as stored)
    "value": "float64",
    "t_wall": "float64",  # when it was served (unix seconds)
}


def is_image(a: np.ndarray) -> bool:
    """A camera image as the models take it: uint8 [H, W, 3]."""
    return a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3


def feature_name(key: str, image: bool) -> str:
    """The LeRobot feature of observation key `key` (`state` -> `observation.state`)."""
    return (IMAGES_PREFIX if image else OBS_PREFIX) + key


def observation_key(feature: str) -> str | None:
    """The observation key a feature holds by LeRobot's naming (None: not an observation)."""
    for prefix in (IMAGES_PREFIX, OBS_PREFIX):
        if feature.startswith(prefix):
            return feature[len(prefix) :]
    return None


def feature_spec(dtype: str, shape: tuple[int, ...]) -> dict:
    """One `info.json` feature entry; a scalar is shape (1,) as in LeRobot."""
    return {"dtype": dtype, "shape": list(shape) or [1], "names": None}


def arrow_column(values: list, dtype: str, shape: tuple[int, ...]) -> pa.Array:
    """Frames' values of one feature as the column LeRobot's loader casts to its
    `datasets` feature: a scalar column for shape (1,), a fixed-size list for [n], nested lists
    (ArrayND's storage) for more dims. values: [N] scalars or arrays of `shape`."""
    typ = pa.from_numpy_dtype(np.dtype(dtype))
    if shape in ((), (1,)):
        return pa.array(np.asarray(values, dtype).reshape(-1), typ)
    stacked = np.ascontiguousarray(np.stack(values).astype(dtype, copy=False))
    if len(shape) == 1:
        return pa.FixedSizeListArray.from_arrays(pa.array(stacked.reshape(-1), typ), shape[0])
    arr: pa.Array = pa.array(stacked.reshape(-1), typ)
    for dim in reversed(shape):
        offsets = np.arange(0, len(arr) + 1, dim, dtype=np.int32)
        arr = pa.ListArray.from_arrays(pa.array(offsets), arr)
    return arr


def column_numpy(column: pa.ChunkedArray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `arrow_column`: [N, *shape] (shape (1,): [N])."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if shape in ((), (1,)):
        return np.asarray(arr.to_numpy(zero_copy_only=False), dtype).reshape(-1)
    for _ in shape:
        arr = arr.flatten()
    flat = np.asarray(arr.to_numpy(zero_copy_only=False), dtype)
    return flat.reshape(len(column), *shape)


def write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def tasks_table(tasks: list[str]) -> pa.Table:
    """`meta/tasks.parquet`: task_index by task text, the text as the pandas index (LeRobot
    reads it with `pd.read_parquet` and looks tasks up by index)."""
    table = pa.table(
        {"task_index": pa.array(range(len(tasks)), pa.int64()), "__index_level_0__": tasks}
    )
    # pandas' own metadata layout (pandas docs, "Storing pandas DataFrame objects in Apache
    # Parquet format"): says the last column is the frame's (unnamed) index.
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
             "numpy_type": "int64", "metadata": None},
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode",
             "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }  # fmt: skip
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def read_tasks(root: Path) -> list[str]:
    """Task texts in task_index order."""
    table = pq.read_table(root / TASKS_PATH)
    meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    index_cols = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
    text_col = index_cols[0] if index_cols else "task"
    if text_col not in table.column_names:
        raise ValueError(f"{root / TASKS_PATH}: expected the task text as index or column 'task'")
    texts = table.column(text_col).to_pylist()
    order = table.column("task_index").to_pylist()
    out = [""] * len(texts)
    for i, text in zip(order, texts, strict=True):
        out[i] = text
    return out


QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # LeRobot's q01 ... q99 (its QUANTILES normalisation)
IMAGE_SAMPLE_PIXELS = 4096  # per frame batch: images' quantiles come from a sample, as LeRobot's


class RunningStats:
    """One feature's `meta/stats.json` entry, accumulated over batches of frames: min, max,
    mean, std (population), count (frames) and the quantiles q01 ... q99. Images (uint8
    [H, W, 3]) give per-channel stats of pixels in [0, 1], shaped (3, 1, 1) as LeRobot's (their
    quantiles from an evenly spaced sample of pixels); other features are per element, shaped
    as the feature."""

    def __init__(self, image: bool):
        self.image = image
        self.count = 0  # frames
        self.rows = 0  # samples per element: frames, or pixels for images
        self.shape: tuple[int, ...] = (3, 1, 1) if image else (1,)
        self.lo = self.hi = self.total = self.squares = np.zeros(0)
        self.sample: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> None:
        """values: [N, *shape] for N frames."""
        x = values.astype(np.float64)
        if self.image:
            x = (x / 255.0).reshape(-1, 3)
        else:
            self.shape = values.shape[1:] or (1,)
            x = x.reshape(len(x), -1)
        if self.rows == 0:
            self.lo, self.hi = x.min(0), x.max(0)
            self.total, self.squares = x.sum(0), (x * x).sum(0)
        else:
            self.lo, self.hi = np.minimum(self.lo, x.min(0)), np.maximum(self.hi, x.max(0))
            self.total, self.squares = self.total + x.sum(0), self.squares + (x * x).sum(0)
        self.count += len(values)
        self.rows += len(x)
        step = max(1, len(x) // IMAGE_SAMPLE_PIXELS) if self.image else 1
        self.sample.append(x[::step].astype(np.float32))

    def result(self) -> dict[str, list]:
        mean = self.total / max(self.rows, 1)
        std = np.sqrt(np.maximum(self.squares / max(self.rows, 1) - mean * mean, 0.0))
        out = {
            k: np.asarray(v).reshape(self.shape).tolist()
            for k, v in (("min", self.lo), ("max", self.hi), ("mean", mean), ("std", std))
        }
        out["count"] = [self.count]
        qs = np.quantile(np.concatenate(self.sample), QUANTILES, axis=0)
        for q, v in zip(QUANTILES, qs, strict=True):
            out[f"q{round(q * 100):02d}"] = v.astype(np.float64).reshape(self.shape).tolist()
        return out


def video_codec(preferred: str) -> str:
    """`preferred` if PyAV's FFmpeg can encode it, else h264 (ValueError if neither)."""
    for name in (preferred, "h264"):
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.codec.codec.UnknownCodecError, ValueError):
            continue
    raise ValueError(f"vcodec: PyAV's FFmpeg encodes neither {preferred!r} nor 'h264'")


class VideoEncoder:
    """One camera's mp4, written frame by frame across episodes: RGB frames [H, W, 3] uint8
    (even H and W: yuv420p), frame i at time i / fps (pts i, time base 1 / fps), as LeRobot
    finds frames by timestamp. Keyframes every `gop` frames (LeRobot's g=2), so random access
    decodes little. `close()` returns the feature's `info` block."""

    def __init__(self, path: Path, fps: int, codec: str, crf: int, gop: int = 2):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole config on stderr else
        opts = {"g": str(gop), "crf": str(crf)}
        if codec == "libsvtav1":
            opts["preset"] = "8"
        self.path, self.fps, self.frames = path, fps, 0
        self._out = av.open(str(path), "w", format="mp4")
        self._stream = self._out.add_stream(codec, rate=fps, options=opts)
        self._stream.pix_fmt = "yuv420p"
        self._stream.time_base = Fraction(1, fps)

    def add(self, img: np.ndarray) -> None:
        if self.frames == 0:
            h, w = img.shape[:2]
            if h % 2 or w % 2:
                raise ValueError(
                    f"{self.path.parent.parent.name}: expected even height and width (yuv420p "
                    f"video), got {h}x{w}"
                )
            self._stream.height, self._stream.width = h, w
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        frame.pts = self.frames
        self._out.mux(self._stream.encode(frame))
        self.frames += 1

    def close(self) -> dict:
        self._out.mux(self._stream.encode())
        info = {
            "video.height": self._stream.height,
            "video.width": self._stream.width,
            "video.codec": self._stream.codec_context.codec.canonical_name,
            "video.pix_fmt": "yuv420p",
            "video.is_depth_map": False,
            "video.fps": self.fps,
            "video.channels": 3,
            "has_audio": False,
        }
        self._out.close()
        return info

    def abort(self) -> None:
        self._out.close()


def decode_video(path: Path, fps: int) -> Iterator[tuple[int, np.ndarray]]:
    """(frame number, RGB [H, W, 3] uint8) for every frame of an mp4, the number taken from
    its timestamp (round(t * fps)), as LeRobot's loader addresses frames."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield round(float(frame.time) * fps), frame.to_ndarray(format="rgb24")


def write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
