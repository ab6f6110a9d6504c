"""ZMQ CURVE for robots (guarantee 7): keys from `openpi-rl keys generate`, an allow-list of
robot public keys; an unknown key or a plaintext client never gets a reply, while the allowed
robot keeps being served."""

import threading

import jax
import numpy as np
import pytest
import zmq.auth

from openpi_rl.cli import main
from openpi_rl.models import GaussianMLPConfig
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.rl import ActorCritic
from openpi_rl_client import PolicyClient, PolicyTimeout, ServerError

OBS = {"state": np.zeros(4, np.float32)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    assert main(["keys", "generate", str(d / "server"), "server"]) == 0
    assert main(["keys", "generate", str(d / "allowed"), "robot1"]) == 0
    assert main(["keys", "generate", str(d / "allowed"), "robot2"]) == 0
    assert main(["keys", "generate", str(d / "other"), "intruder"]) == 0
    return d


@pytest.fixture(scope="module")
def server(keys):
    ac = ActorCritic(
        GaussianMLPConfig(obs_dim=4, action_dim=1).create(jax.random.key(0)),
        value_in_dim=4,
        value_hidden=(8,),
    )
    options = ServeOptions(
        endpoint="tcp://127.0.0.1:*",
        max_batch=2,
        curve_secret_key_file=str(keys / "server" / "server.key_secret"),
        curve_allowed_clients_dir=str(keys / "allowed"),
    )
    srv = PolicyServer(ac, options)
    threading.Thread(target=srv.run, daemon=True).start()
    assert srv.wait_ready(60)
    yield srv
    srv.close(wait_s=10)


def _client(server, keys, client_key: str | None, robot_id=None, **kw) -> PolicyClient:
    server_public, _ = zmq.auth.load_certificate(keys / "server" / "server.key")
    if client_key is None:
        return PolicyClient(server.endpoint, robot_id="plain", **kw)
    return PolicyClient(
        server.endpoint,
        robot_id=robot_id or client_key.rsplit("/", 1)[-1],
        curve_server_key=server_public,
        curve_client_keys=zmq.auth.load_certificate(keys / client_key),
        **kw,
    )


def test_allowed_key_is_served_and_unknown_or_plaintext_clients_get_nothing(server, keys):
    good = _client(server, keys, "allowed/robot1.key_secret", timeout_s=5.0, retries=0)
    intruder = _client(server, keys, "other/intruder.key_secret", timeout_s=0.5, retries=1)
    plain = _client(server, keys, None, timeout_s=0.5, retries=1)
    try:
        assert good.infer(OBS).actions.ndim == 2
        with pytest.raises(PolicyTimeout, match="no reply"):
            intruder.infer(OBS)
        with pytest.raises(PolicyTimeout, match="no reply"):
            plain.health()
        for _ in range(5):  # the refused peers cost the allowed robot nothing
            assert good.infer(OBS).actions.ndim == 2
    finally:
        for c in (good, intruder, plain):
            c.close()


def test_a_robot_id_is_bound_to_its_client_key_and_cannot_be_borrowed(server, keys):
    owner = _client(server, keys, "allowed/robot1.key_secret", "arm-7", timeout_s=5.0, retries=0)
    other = _client(server, keys, "allowed/robot2.key_secret", "arm-7", timeout_s=5.0, retries=0)
    try:
        out = owner.infer(OBS)
        # Another allowed robot's key cannot speak as arm-7: not infer, not report its chunks.
        with pytest.raises(ServerError) as e:
            other.infer(OBS)
        assert e.value.code == "unauthorized" and "another client key" in e.value.message
        with pytest.raises(ServerError, match="unauthorized"):
            other.report(out.transition_id, reward=-100.0, done=True)
    finally:
        owner.close()
        other.close()
    # The owner reconnects (a new socket, its key): arm-7 and its transitions are still its own.
    with _client(server, keys, "allowed/robot1.key_secret", "arm-7", timeout_s=5.0) as again:
        assert again.report(out.transition_id, reward=1.0)["ok"] is True
    with _client(server, keys, "allowed/robot2.key_secret", "arm-8", timeout_s=5.0) as own:
        assert own.health()["status"] == "ready"  # robot2's key still serves its own ids


def test_in_process_endpoint_stays_plaintext_for_the_openpi_bridge_and_watchdog(server):
    with PolicyClient(server.inproc_endpoint, context=zmq.Context.instance(), timeout_s=5) as c:
        assert c.health()["status"] == "ready"


def test_curve_needs_both_files(keys):
    ac = ActorCritic(
        GaussianMLPConfig(obs_dim=4, action_dim=1).create(jax.random.key(0)),
        value_in_dim=4,
        value_hidden=(8,),
    )
    with pytest.raises(ValueError, match="curve_allowed_clients_dir"):
        PolicyServer(
            ac,
            ServeOptions(
                endpoint="tcp://127.0.0.1:*",
                curve_secret_key_file=str(keys / "server" / "server.key_secret"),
            ),
        )
