"""What must never go live, through the real server and learner: an update on non-finite
rewards (guarantee 5), and operator take-overs inside the PPO ratio (they train the policy by
behaviour cloning instead). The learner is driven step by step; the server follows it."""

import numpy as np
import pytest
from service_helpers import ServerRig, free_port, learner_config, play, wait_for

from openpi_rl.daemon import Learner
from openpi_rl.rl import PPOConfig
from openpi_rl_client import PolicyClient


@pytest.fixture
def loop(tmp_path, request):
    publish_port, server_port = free_port(), free_port()
    overrides = getattr(request, "param", {})
    learner = Learner(learner_config(tmp_path, publish_port, server_port, **overrides))
    rig = ServerRig(tmp_path, publish_port, server_port)
    client = PolicyClient(rig.endpoint, robot_id="arm-1", timeout_s=5.0, retries=0)
    wait_for(rig.swapper.learner_alive, 10)  # the subscription has landed
    yield learner, rig, client
    client.close()
    rig.close()
    learner.close()


def _flush(rig: ServerRig) -> None:
    rig.server.replay.flush()


def test_huge_rewards_are_clamped_and_nan_refuses_the_update_and_the_live_version_stays(loop):
    learner, rig, client = loop
    rng = np.random.default_rng(0)
    for e in range(3):
        play(client, f"good-{e}", 8, rng, reward=lambda a: 0.1)
    _flush(rig)
    assert learner.step().published  # the path works: version 1 goes live
    rig.wait_live(1)

    # A robot's env reports overflow: two finite rewards of 1e308 would sum to inf in the
    # replay and GAE would turn it into NaN advantages, refusing every update from then on.
    # The server clamps each report into serve.reward_range, so learning goes on.
    for e in range(3):
        for t in range(8):
            out = client.infer({"state": rng.standard_normal(3).astype(np.float32)}, f"inf-{e}")
            client.report(out.transition_id, 1e308, done=False)
            client.report(out.transition_id, 1e308, done=t == 7)
    _flush(rig)
    assert rig.metric("openpi_rl_server_rewards_clamped_total") == 48
    result = learner.step()
    assert result.published and learner.version == 2
    rig.wait_live(2)

    # NaN straight into a batch's rewards (a corrupt reward source downstream of the replay).
    for e in range(3):
        play(client, f"nan-{e}", 8, rng, reward=lambda a: 0.1)
    _flush(rig)
    batch, _ = learner.take()
    batch.rewards[3, 0] = np.nan
    result = learner.update_on(batch)
    assert not result.published and result.reason == "nonfinite"

    # Two more learner heartbeats read by the swapper, and it came round after each: each
    # names version 2, nothing newer is announced.
    beats = rig.swapper.notices.heartbeats
    wait_for(lambda: rig.swapper.notices.heartbeats >= beats + 2, 5, rig.swapper.status)
    assert learner.version == 2 and rig.live == 2
    assert rig.metric("openpi_rl_server_swaps_total") == 2
    assert rig.server.metrics.registry.get_sample_value(
        "openpi_rl_server_swap_failures_total", {"reason": "nonfinite"}
    ) in (None, 0.0)
    assert client.infer({"state": np.zeros(3, np.float32)}, "after").policy_version == 2
    refused = learner.metrics.registry.get_sample_value(
        "openpi_rl_learner_refused_updates_total", {"reason": "nonfinite"}
    )
    assert refused == 1


GOOD = np.array([[0.8, -0.8], [0.8, -0.8]], np.float32)  # [H, D], the operator's action


def _distance_to_good(rig: ServerRig, states: np.ndarray, counter: int) -> float:
    """Mean |action - GOOD| of the server's live snapshot on fixed observations (sampled by
    its own jitted sampler, so the probe is not logged and trained on)."""
    out = rig.server.snapshot.sample(10_000 + counter, [{"state": s} for s in states])
    return float(np.abs(out.actions - GOOD).mean())


@pytest.mark.parametrize(
    "loop",
    [{"ppo": PPOConfig(lr=1e-2, train_iters=4, minibatch_size=16, bc_coef=1.0, entropy_coef=0.0)}],
    indirect=True,
)
def test_take_overs_move_the_policy_toward_the_operator_and_stay_out_of_the_ratio(loop):
    learner, rig, client = loop
    rng = np.random.default_rng(1)
    probe = rng.standard_normal((4, 3)).astype(np.float32)
    before = np.mean([_distance_to_good(rig, probe, i) for i in range(8)])
    for e in range(4):  # every chunk taken over: the robot executed GOOD, not the policy's
        play(client, f"teleop-{e}", 8, rng, reward=lambda a: 0.0, executed=GOOD)
    _flush(rig)
    result = learner.step()
    assert result.published and result.transitions >= 32
    # Out of the ratio: no sample in the clipped surrogate, KL or clip fraction, although the
    # policy moved (behaviour cloning) during the epochs.
    assert result.metrics["policy_loss"] == 0.0
    assert result.metrics["approx_kl"] == 0.0 and result.metrics["clip_fraction"] == 0.0
    assert result.metrics["bc_loss"] > 0
    rig.wait_live(1)
    assert client.infer({"state": probe[0]}, "after").policy_version == 1
    after = np.mean([_distance_to_good(rig, probe, i) for i in range(8)])
    assert after < before - 0.1, (before, after)
