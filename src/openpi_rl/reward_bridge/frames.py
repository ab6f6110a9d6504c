"""Camera frames for the pendant: a robot's newest stored observation, each camera a small JPEG.

Pure functions of arrays; `status.py` reads the observation (on the bridge's reader thread),
rate-limits and caches the frame per robot, and sends it to the pendants showing that robot.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

JPEG_QUALITY = 80  # 224 x 224: 3-12 KB, about 0.5 ms to encode (4:2:0 chroma, Pillow's default)


def as_image(arr: np.ndarray) -> np.ndarray | None:
    """uint8 [H, W, 1|3|4] from an image-like array, or None if it is not one.

    arr: [H, W, 1|3|4], [1|3, H, W] (CHW) or [H, W]; H, W >= 8; uint8 values (any dtype holding
    whole numbers, clipped to [0, 255]), or floats in [0, 1] or [-1, 1]. NaN/inf: None."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) < 8:
        return None
    if arr.dtype == np.uint8:  # a camera's own layout: no float copy
        return np.ascontiguousarray(arr)
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        return None
    lo, hi = arr.min(), arr.max()
    if lo >= -1.0 and hi <= 1.0 and not (arr == arr.round()).all():
        arr = (arr + 1.0) / 2.0 * 255.0 if lo < 0 else arr * 255.0
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def camera_images(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The observation's camera images by key (sorted), each uint8 [H, W, 1|3|4].

    A camera is an entry of 3 axes that `as_image` accepts, or a uint8 [H, W] (a grey camera);
    other 2-axis arrays are left out (a float [T, D] history is no picture)."""
    out = {}
    for key in sorted(arrays):
        arr = np.asarray(arrays[key])
        if arr.ndim == 3 or (arr.ndim == 2 and arr.dtype == np.uint8):
            try:
                img = as_image(arr)
            except (TypeError, ValueError):  # strings, objects: not a picture
                continue
            if img is not None:
                out[str(key)] = img
    return out


def jpeg_thumbnail(img: np.ndarray, max_side: int, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of uint8 img [H, W, 1|3|4], shrunk (aspect kept) so its longer side is at most
    `max_side` pixels; never enlarged. Alpha is dropped (JPEG has none)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"img: expected uint8 [H, W, 1|3|4], got {img.dtype} {list(img.shape)}")
    if max_side < 1:
        raise ValueError(f"max_side: expected a positive pixel count, got {max_side}")
    pic = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img[..., :3])
    pic.thumbnail((max_side, max_side))  # in place, only ever smaller
    buf = io.BytesIO()
    pic.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def frame_message(
    robot_id: str,
    transition_id: int,
    arrays: Mapping[str, Any] | None,
    max_side: int,
    note: str | None = None,
    step: int | None = None,
    t_wall: float | None = None,
) -> dict[str, Any]:
    """The pendant's `frame` message: each camera of `arrays` (a stored observation) as a JPEG
    data URL, and a `note` for the page when there is no picture to show (`arrays` None: the
    caller's note says why). `step`, `t_wall`: the transition's, for the page's caption (how
    old the picture is)."""
    cameras = {}
    if arrays is not None:
        for key, img in camera_images(arrays).items():
            data = base64.b64encode(jpeg_thumbnail(img, max_side)).decode("ascii")
            cameras[key] = "data:image/jpeg;base64," + data
        if not cameras and note is None:
            note = f"no camera image in transition {transition_id}'s observation"
    return {
        "type": "frame",
        "robot_id": robot_id,
        "transition_id": transition_id,
        "step": step,
        "t_wall": t_wall,
        "cameras": cameras,
        "note": note,
    }
