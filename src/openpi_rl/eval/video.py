"""Episode videos: MuJoCo's offscreen rendering made to work without a display, mp4 files
written with PyAV (FFmpeg's H.264), and two videos put side by side.

MuJoCo (through gymnasium) picks its OpenGL platform from `MUJOCO_GL` when an env first
renders. On a machine without a display, glfw (the default) fails; EGL (Mesa's or NVIDIA's
libEGL) renders headless, OSMesa in software. `headless_gl` finds the one that works, once per
process, in a child process: a platform that fails leaves PyOpenGL bound to it in the process
that tried.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np

PLATFORMS = ("egl", "osmesa")
_PROBE = "from mujoco.{0} import GLContext; c = GLContext(16, 16); c.make_current(); c.free()"


def headless_gl() -> str:
    """Set `MUJOCO_GL` (and `PYOPENGL_PLATFORM`) to a platform that renders here and return it.
    A value already set is kept (yours wins). RuntimeError naming each platform's failure when
    none works."""
    chosen = os.environ.get("MUJOCO_GL")
    if chosen:
        return chosen
    failures = []
    for name in PLATFORMS:
        env = {**os.environ, "MUJOCO_GL": name, "PYOPENGL_PLATFORM": name}
        probe = subprocess.run(
            [sys.executable, "-c", _PROBE.format(name)], env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        if probe.returncode == 0:
            os.environ["MUJOCO_GL"] = name
            os.environ.setdefault("PYOPENGL_PLATFORM", name)
            return name
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        failures.append(f"MUJOCO_GL={name}: {last}")
    raise RuntimeError(
        "MuJoCo cannot render without a display here: "
        + "; ".join(failures)
        + ". Install Mesa's EGL (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri) or OSMesa "
        "(libosmesa6), or set MUJOCO_GL yourself; or evaluate without --video-dir."
    )


class VideoWriter:
    """An H.264 mp4 written frame by frame (`with VideoWriter(path, fps) as w: w.write(rgb)`).
    Frames: uint8 [H, W, 3], all the same size; odd sizes are padded to even (yuv420p)."""

    def __init__(self, path: str | Path, fps: float):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = fps
        self.frames = 0
        self._container = av.open(str(self.path), mode="w")
        self._stream = None

    def write(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame: expected uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
        h, w = frame.shape[0] + frame.shape[0] % 2, frame.shape[1] + frame.shape[1] % 2
        if self._stream is None:
            from fractions import Fraction

            self._stream = self._container.add_stream(
                "libx264", rate=Fraction(self.fps).limit_denominator(1000)
            )
            self._stream.width, self._stream.height = w, h
            self._stream.pix_fmt = "yuv420p"
        if (h, w) != (self._stream.height, self._stream.width):
            raise ValueError(
                f"frame {self.frames}: expected {self._stream.height}x{self._stream.width}, "
                f"got {h}x{w}"
            )
        if frame.shape[:2] != (h, w):
            frame = np.pad(frame, ((0, h - frame.shape[0]), (0, w - frame.shape[1]), (0, 0)))
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        self._container.mux(self._stream.encode(video_frame))
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        if self._stream is not None:
            self._container.mux(self._stream.encode())  # flush the encoder's delayed frames
        self._container.close()
        self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_frames(path: str | Path) -> list[np.ndarray]:
    """Every frame of a video as uint8 [H, W, 3]."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _labelled(frame: np.ndarray, label: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.fromarray(frame)
    ImageDraw.Draw(image).text((8, 6), label, fill=(255, 255, 255))
    return np.asarray(image)


def side_by_side(
    left: str | Path, right: str | Path, out: str | Path, labels: tuple[str, str], fps: float
) -> int:
    """One mp4 with `left`'s frames beside `right`'s, each under its label; the shorter one
    holds its last frame until the longer ends. Returns the number of frames written."""
    with av.open(str(left)) as a, av.open(str(right)) as b, VideoWriter(out, fps) as writer:
        frames_a, frames_b = a.decode(video=0), b.decode(video=0)
        last_a = last_b = None
        while True:
            fa, fb = next(frames_a, None), next(frames_b, None)
            if fa is None and fb is None:
                break
            last_a = fa.to_ndarray(format="rgb24") if fa is not None else last_a
            last_b = fb.to_ndarray(format="rgb24") if fb is not None else last_b
            blank = np.zeros_like(last_a if last_a is not None else last_b)
            pair = [
                _labelled(x if x is not None else blank, label)
                for x, label in ((last_a, labels[0]), (last_b, labels[1]))
            ]
            height = max(p.shape[0] for p in pair)
            pair = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in pair]
            writer.write(np.concatenate(pair, axis=1))
        return writer.frames
