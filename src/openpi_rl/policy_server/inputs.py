"""The model's input pipeline on the server: a robot's observation, as openpi's example clients
send it, becomes the model's arrays; the model's action chunk becomes the robot's.

openpi does this with per-robot policy transforms (`LiberoInputs`, `DroidInputs`, ...,
`Normalize`, `InjectDefaultPrompt`, `ResizeImages`, `TokenizeFASTInputs`; on the way out
`ExtractFASTActions`, `Unnormalize`, `LiberoOutputs`). Here an `InputMap` (a preset, or a
table of the config file) names which robot keys are which camera and the state, and
`RobotInputs` applies it per request, on the serving thread, before validation:

    {"observation/image": uint8 [h, w, 3] or [3, h, w], "observation/wrist_image": ...,
     "observation/state": [8], "prompt": "pick up the red block"}
      -> {"base_0_rgb": uint8 [S, S, 3] (resized with padding, as openpi), "left_wrist_0_rgb",
          "right_wrist_0_rgb": zeros (openpi's FAST models see a blank third camera),
          "state": float32 [8], "tokenized_prompt": int32 [L], "tokenized_prompt_mask": bool [L]}

The prompt and the state are tokenized by the model config's `tokenize` (openpi's
tokenizer and norm stats: models/pi0_fast_openpi.py); the replay stores these arrays and the
prompt, and the learner trains on the same tokens. The model's actions come out unnormalized
(its norm stats); the robot gets the leading `action_dims` numbers of each action, the first
`delta_action_dims` of them plus its state (openpi's AbsoluteActions). The
"model" map passes the model's own keys through (robots that send the model's arrays).
Malformed input raises ValueError naming the key: the server answers `invalid_observation`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from openpi_rl.rl.rl_api import ObsSpec


@dataclasses.dataclass(frozen=True)
class InputMap:
    """Which of a robot's observation keys feed which model input."""

    images: dict[str, str] = dataclasses.field(default_factory=dict)
    """Model camera -> the robot's key for it (`base_0_rgb = "observation/image"`). Images may be
    uint8 or float in [0, 1], [h, w, 3] or [3, h, w], of any size: they are resized to the
    model's with padding. A camera whose key is absent from a request is masked out."""
    blank_images: tuple[str, ...] = ()
    """Model cameras this robot has none of, shown to the model as black images (openpi's
    LIBERO and DROID inputs do this for Pi0-FAST's third camera)."""
    state: tuple[str, ...] = ()
    """The robot's keys whose values, concatenated in this order, are the model's state (DROID:
    joint positions, then the gripper). Empty: the robot sends `state` itself."""
    default_prompt: str | None = None
    """The prompt of a request that sends none (openpi's `default_prompt`)."""
    action_dims: int | None = None
    """The robot gets the first this many numbers of each action (openpi's `LiberoOutputs`: 7);
    None: all of them."""
    delta_action_dims: int = 0
    """The first this many numbers of each action are relative to the state, and the robot
    gets them with its state added (openpi's DeltaActions / AbsoluteActions, which its
    pi0-FAST LIBERO configs apply to the 6 arm dims)."""


# The key layouts of openpi's example clients (openpi `examples/{libero,droid,aloha_real}`), as
# openpi's `LiberoInputs`, `DroidInputs` and `AlohaInputs` read them for Pi0-FAST. The model's
# `cameras` name the same images in the order openpi feeds them: LIBERO and ALOHA
# ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"), DROID ("base_0_rgb", "base_1_rgb",
# "wrist_0_rgb"). ALOHA's joint-space
# conversion (`adapt_to_pi`) is not applied: a checkpoint trained with it needs it robot-side.
PRESETS: dict[str, InputMap] = {
    "model": InputMap(),
    "libero": InputMap(
        images={"base_0_rgb": "observation/image", "left_wrist_0_rgb": "observation/wrist_image"},
        blank_images=("right_wrist_0_rgb",),
        state=("observation/state",),
        action_dims=7,
        delta_action_dims=6,  # pi0_fast_libero's extra_delta_transform
    ),
    # openpi's DroidInputs for Pi0-FAST: the blank image sits between the two cameras.
    "droid": InputMap(
        images={
            "base_0_rgb": "observation/exterior_image_1_left",
            "wrist_0_rgb": "observation/wrist_image_left",
        },
        blank_images=("base_1_rgb",),
        state=("observation/joint_position", "observation/gripper_position"),
        action_dims=8,
    ),
    "aloha": InputMap(
        images={
            "base_0_rgb": "images/cam_high",
            "left_wrist_0_rgb": "images/cam_left_wrist",
            "right_wrist_0_rgb": "images/cam_right_wrist",
        },
        state=("state",),
        action_dims=14,
    ),
}


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, C] -> uint8 [height, width, C]: scaled by one factor to fit (Pillow's
    bilinear filter), centred, the rest black; openpi's `ResizeImages` (openpi_client's
    `image_tools.resize_with_pad`), which replicates tf.image.resize_with_pad."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    ratio = max(w / width, h / height)
    rh, rw = int(h / ratio), int(w / ratio)
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), resample=Image.BILINEAR))
    out = np.zeros((height, width, image.shape[2]), np.uint8)
    top, left = (height - rh) // 2, (width - rw) // 2
    out[top : top + rh, left : left + rw] = resized.reshape(rh, rw, -1)
    return out


def as_hwc_uint8(key: str, value: Any) -> np.ndarray:
    """An image as openpi's `_parse_image` reads it: float in [0, 1] -> uint8, [3, h, w] -> [h, w, 3]."""
    image = np.asarray(value)
    if image.ndim != 3 or 3 not in (image.shape[0], image.shape[-1]):
        raise ValueError(f"observation[{key!r}]: expected an image [h, w, 3] or [3, h, w], got "
                         f"{image.dtype.name} {list(image.shape)}")  # fmt: skip
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError(f"observation[{key!r}]: non-finite pixel values")
        image = (255 * image).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(
            f"observation[{key!r}]: expected uint8 or float pixels, got {image.dtype.name}"
        )
    if image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.moveaxis(image, 0, -1)
    return np.ascontiguousarray(image)


def flatten(obs: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (ALOHA's `{"images": {"cam_high": ...}}`) as "/"-joined keys."""
    out: dict[str, Any] = {}
    for k, v in obs.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


class RobotInputs:
    """Each robot's `InputMap` applied: `observation()` on the way in, `actions()` on the way out.

    `maps`: map name -> InputMap (the presets and the config's own); `default`: the name every
    robot uses unless `robots` (robot id -> name) says otherwise. `tokenize(prompt, state)`:
    the model config's tokenizer, when the model reads a tokenized prompt."""

    def __init__(
        self,
        obs_spec: ObsSpec,
        tokenize: Callable[[str, np.ndarray], dict[str, np.ndarray]] | None = None,
        maps: Mapping[str, InputMap] | None = None,
        default: str = "model",
        robots: Mapping[str, str] | None = None,
    ):
        self.maps = {**PRESETS, **(maps or {})}
        self.robots = dict(robots or {})
        for where, name in [("inputs", default), *((f"robot_inputs.{r}", n) for r, n in self.robots.items())]:  # fmt: skip
            if name not in self.maps:
                raise ValueError(f"{where}: unknown input map {name!r}; known: {sorted(self.maps)}")
        self.default = default
        self.spec = obs_spec
        self.tokenize = tokenize if "tokenized_prompt" in obs_spec else None
        self.images = {
            k: s.shape[:2] for k, s in obs_spec.items() if s.dtype == "uint8" and len(s.shape) == 3
        }
        for name in {default, *self.robots.values(), *(maps or {})}:
            m = self.maps[name]
            unknown = sorted((set(m.images) | set(m.blank_images)) - set(self.images))
            if unknown:
                raise ValueError(
                    f"input map {name!r}: camera(s) {unknown} not in the model's cameras "
                    f"{sorted(self.images)} (set [model] cameras to the images it feeds)"
                )

    def map_of(self, robot_id: str) -> InputMap:
        return self.maps[self.robots.get(robot_id, self.default)]

    @property
    def identity(self) -> bool:
        """Nothing to do for any robot (the model's own keys, no tokenizer): the server's
        fast path validates the request's arrays as they are."""
        return self.tokenize is None and not self.robots and self.default == "model"

    def observation(
        self, robot_id: str, obs: Mapping[str, Any], prompt: str | None
    ) -> dict[str, Any]:
        """The robot's observation -> the model's arrays (not yet validated against the spec:
        the server does that next)."""
        m = self.map_of(robot_id)
        obs = flatten(obs)
        out: dict[str, Any] = {}
        used: set[str] = set()
        for camera, key in m.images.items():
            if key in obs:
                out[camera] = obs[key]
                used.add(key)
        if m.state:
            missing = [k for k in m.state if k not in obs]
            if missing:
                raise ValueError(f"observation: missing {missing} (the state, by the input map)")
            try:
                parts = [np.atleast_1d(np.asarray(obs[k], np.float32)) for k in m.state]
                out["state"] = np.concatenate([p.reshape(-1) for p in parts])
            except (TypeError, ValueError) as e:
                raise ValueError(f"observation{list(m.state)}: not a numeric state: {e}") from None
            used.update(m.state)
        for key, value in obs.items():  # keys the map does not name pass through as they are
            if key not in used and key != "prompt":
                out.setdefault(key, value)
        for camera, (h, w) in self.images.items():
            if camera in out:
                out[camera] = resize_with_pad(as_hwc_uint8(camera, out[camera]), h, w)
        for camera in m.blank_images:
            if camera in self.images and camera not in out:
                out[camera] = np.zeros((*self.images[camera], 3), np.uint8)
        if m.delta_action_dims and "state" not in out:
            raise ValueError("observation['state']: missing; the actions are relative to it")
        if self.tokenize is not None and "tokenized_prompt" not in out:
            text = prompt if prompt is not None else m.default_prompt
            if text is None:
                raise ValueError(
                    "prompt: this model reads a task prompt; send `prompt` with the observation "
                    "or set the robot's input map's default_prompt"
                )
            if "state" not in out:
                raise ValueError("observation['state']: missing; the prompt is tokenized with it")
            state = np.asarray(out["state"], np.float32)
            if state.ndim != 1 or not np.isfinite(state).all():
                raise ValueError(
                    f"observation['state']: expected a finite vector, got {list(state.shape)}"
                )
            out["state"] = state
            out.update(self.tokenize(text, state))
        return out

    def actions(
        self, robot_id: str, actions: np.ndarray, state: np.ndarray | None = None
    ) -> np.ndarray:
        """The model's chunk [H, D] -> the robot's [H, action_dims]: relative dims made
        absolute with the request's `state` [S] (the model's observation["state"])."""
        m = self.map_of(robot_id)
        if m.delta_action_dims:
            if state is None:
                raise ValueError("delta_action_dims: the request has no state to add")
            n = m.delta_action_dims
            actions = np.array(actions, copy=True)
            actions[..., :n] += np.asarray(state, actions.dtype)[:n]
        return actions if m.action_dims is None else actions[..., : m.action_dims]
