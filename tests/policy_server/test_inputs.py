"""The server's input pipeline against openpi's own: LIBERO-style observations as openpi's example
client sends them (images of other sizes, channels first, a prompt) become exactly the arrays
openpi's policy transforms make (tests/fixtures/openpi_pi0_fast/libero/, made by openpi's code:
make_pipeline_golden.py), and a server loaded from that openpi checkpoint answers with openpi's
actions. Bad inputs get a clear error and the server keeps serving."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from openpi_rl.models.pi0_fast_openpi import Pi0FASTOpenPIConfig
from openpi_rl.policy_server.inputs import InputMap, RobotInputs, resize_with_pad
from openpi_rl.policy_server.serve import ServeConfig, build_server
from openpi_rl.policy_server.server import ServeOptions
from openpi_rl.replay import ReplayReader
from openpi_rl_client import PolicyClient

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LIBERO = FIXTURES / "openpi_pi0_fast" / "libero"
TOK = FIXTURES / "tokenizers"
META = json.loads((LIBERO / "pipeline.json").read_text())
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def libero_model(**overrides) -> Pi0FASTOpenPIConfig:
    """The fixture's openpi checkpoint as the [model] table of a user's config names it."""
    return Pi0FASTOpenPIConfig(
        gemma_variant="dummy",
        siglip_variant="dummy",
        paligemma_tokenizer=str(TOK / "paligemma_tiny.model"),
        fast_tokenizer=str(TOK / "fast_tiny"),
        norm_stats=str(LIBERO / "assets" / "norm_stats.json"),
        checkpoint=str(LIBERO / "params"),
        cameras=tuple(META["cameras"]),
        state_dim=META["state_dim"],
        action_dim=META["action_dim"],
        action_horizon=META["action_horizon"],
        max_token_len=META["max_token_len"],
        max_decoding_steps=META["max_decoding_steps"],
        temperature=0.0,
        scan=False,
        **overrides,
    )


@pytest.fixture(scope="module")
def golden():
    return np.load(LIBERO / "pipeline.npz")


def libero_request(golden, i: int) -> dict[str, np.ndarray]:
    """Request i as openpi's LIBERO client sends it (without the prompt)."""
    return {k.split("/", 1)[1]: golden[k] for k in golden.files if k.startswith(f"{i}/")}


def test_libero_observations_become_the_arrays_openpis_transforms_make(golden):
    config = libero_model()
    inputs = RobotInputs(config.obs_spec, config.tokenize, default="libero")
    sizes = {tuple(v.shape) for i in range(4) for v in libero_request(golden, i).values()}
    assert (72, 96, 3) in sizes and (3, 64, 64) in sizes  # resized, and channels-first
    for i, prompt in enumerate(META["prompts"]):
        obs = inputs.observation("arm", libero_request(golden, i), prompt)
        assert set(obs) == {*CAMERAS, "state", "tokenized_prompt", "tokenized_prompt_mask"}
        for key in ("tokenized_prompt", "tokenized_prompt_mask", *CAMERAS):
            np.testing.assert_array_equal(obs[key], golden[key][i], err_msg=f"{i} {key}")
        assert obs["tokenized_prompt"].dtype == np.int32 and obs["base_0_rgb"].dtype == np.uint8


def test_resize_with_pad_keeps_the_aspect_and_centres():
    image = np.full((20, 40, 3), 200, np.uint8)
    out = resize_with_pad(image, 10, 10)
    assert out.shape == (10, 10, 3)
    assert (out[:2] == 0).all() and (out[-3:] == 0).all() and (out[3:7] == 200).all()
    assert resize_with_pad(image, 20, 40) is image


def test_input_maps_name_their_errors():
    config = libero_model()
    with pytest.raises(ValueError, match="unknown input map 'franka'"):
        RobotInputs(config.obs_spec, config.tokenize, default="franka")
    with pytest.raises(
        ValueError, match=r"input map 'droid': camera\(s\) \['base_1_rgb', 'wrist_0_rgb'\]"
    ):
        RobotInputs(config.obs_spec, config.tokenize, default="droid")  # LIBERO's cameras
    with pytest.raises(ValueError, match=r"input map 'arm': camera\(s\) \['top'\]"):
        RobotInputs(config.obs_spec, config.tokenize, {"arm": InputMap(images={"top": "x"})})
    inputs = RobotInputs(config.obs_spec, config.tokenize, default="libero")
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="prompt: this model reads a task prompt"):
        inputs.observation(
            "a", {"observation/image": image, "observation/state": np.zeros(8)}, None
        )
    with pytest.raises(ValueError, match=r"missing \['observation/state'\]"):
        inputs.observation("a", {"observation/image": image}, "go")
    with pytest.raises(ValueError, match=r"observation\['base_0_rgb'\]: expected an image"):
        inputs.observation("a", {"observation/image": np.zeros((8, 8)), "observation/state": np.zeros(8)}, "go")  # fmt: skip
    # a default prompt (openpi's default_prompt) stands in for a missing one
    droid = InputMap(images={"base_0_rgb": "cam"}, state=("q", "g"), default_prompt="tidy up")
    inputs = RobotInputs(config.obs_spec, config.tokenize, {"mine": droid}, robots={"b": "mine"})
    obs = inputs.observation("b", {"cam": image, "q": np.zeros(7), "g": np.ones(1)}, None)
    assert obs["state"].tolist() == [0.0] * 7 + [1.0] and "left_wrist_0_rgb" not in obs
    np.testing.assert_array_equal(obs["tokenized_prompt"], config.tokenize("tidy up", obs["state"])["tokenized_prompt"])  # fmt: skip


def test_version_0_served_is_the_checkpoints_greedy_policy(tmp_path, golden):
    """`openpi-rl serve` started from an openpi checkpoint answers LIBERO requests with the
    actions openpi's own policy gives on them, stores openpi's greedy tokens and the prompt, and
    two prompts on the same images give different tokens; a malformed request is refused with
    a clear error while the server keeps serving."""
    config = ServeConfig(
        model=libero_model(),
        serve=ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=2),
        replay_dir=str(tmp_path / "replay"),
        commit_interval_s=0.01,
        inputs="libero",
        metrics_port=None,
        openpi_ws_port=None,
    )
    server = build_server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    tids = []
    try:
        assert server.wait_ready(180)
        with PolicyClient(server.endpoint, robot_id="libero-1", timeout_s=30.0) as client:
            for i, prompt in enumerate(META["prompts"]):
                out = client.infer(libero_request(golden, i), episode_id="e", prompt=prompt)
                assert out.policy_version == 0 and out.actions.shape == (4, 7)
                np.testing.assert_allclose(out.actions, golden["actions"][i], atol=1e-6)
                tids.append(out.transition_id)
            bad = libero_request(golden, 0)
            with pytest.raises(Exception, match=r"invalid_observation.*prompt"):
                client.infer(bad, episode_id="e")
            assert client.infer(bad, episode_id="e", prompt="again").policy_version == 0
    finally:
        server.close(wait_s=30)
        thread.join(30)
    with ReplayReader(str(tmp_path / "replay")) as reader:
        rows = {r.id: r for r in reader.transitions()}
        for i, tid in enumerate(tids):
            stored = reader.stored_observation(rows[tid])
            assert stored.prompt == META["prompts"][i]
            np.testing.assert_array_equal(stored.arrays["tokenized_prompt"], golden["tokenized_prompt"][i])  # fmt: skip
            np.testing.assert_array_equal(rows[tid].policy_actions, golden["greedy_tokens"][i])
    tokens = golden["greedy_tokens"]
    assert not np.array_equal(tokens[0], tokens[1])  # same images and state, two prompts
