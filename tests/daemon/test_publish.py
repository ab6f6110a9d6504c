"""The notice channel is closed: by default an ipc socket in a private (0700) directory beside
the checkpoints; across hosts, CURVE, where a subscriber hears only the publisher whose public
key it holds. Real ZMQ sockets; keys made by `openpi-rl keys generate`."""

import os
import stat
import time

import pytest
import zmq

from openpi_rl.cli import keys_main
from openpi_rl.weights import LatestVersion, Publisher
from openpi_rl.weights.notices import AUTO, notice_endpoint


def _heard(sub: LatestVersion, publisher: Publisher, timeout_s: float = 3.0) -> int | None:
    """The version `sub` hears `publisher` announce within timeout_s (None: nothing)."""
    deadline = time.monotonic() + timeout_s
    publisher.publish(7)
    while time.monotonic() < deadline:
        notice = sub.poll(0.1)
        if notice is not None:
            return notice["version"]
    return None


def test_the_default_channel_is_an_ipc_socket_in_a_private_directory(tmp_path):
    ckpt = tmp_path / "ckpt"
    endpoint = notice_endpoint(AUTO, ckpt)
    assert endpoint == f"ipc://{ckpt}/.run/notices.ipc"
    publisher = Publisher(endpoint, heartbeat_s=0.1)
    sub = LatestVersion(notice_endpoint(AUTO, ckpt))
    try:
        mode = (ckpt / ".run").stat().st_mode
        assert stat.S_IMODE(mode) == 0o700
        assert _heard(sub, publisher) == 7
    finally:
        sub.close()
        publisher.close()
    # A directory others can enter could hold someone else's socket: refused at both ends.
    (ckpt / ".run").chmod(0o755)
    with pytest.raises(PermissionError, match="0700"):
        Publisher(endpoint)
    with pytest.raises(PermissionError, match="0700"):
        LatestVersion(endpoint)
    long = tmp_path / ("x" * 120)  # past a unix socket's path limit: a short hashed name
    assert len(notice_endpoint(AUTO, long)) < 110
    assert notice_endpoint(AUTO, long) == notice_endpoint(AUTO, long)


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_subscribers_hear_only_the_publisher_whose_key_they_hold(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert keys_main(["generate", str(keys), "learner"]) == 0
    assert keys_main(["generate", str(keys), "impostor"]) == 0
    assert os.stat(keys / "learner.key_secret").st_mode & 0o077 == 0
    ours = Publisher(
        "tcp://127.0.0.1:*", 0.1, curve_secret_key_file=str(keys / "learner.key_secret")
    )
    impostor = Publisher(
        "tcp://127.0.0.1:*", 0.1, curve_secret_key_file=str(keys / "impostor.key_secret")
    )
    plain = Publisher("tcp://127.0.0.1:*", 0.1)
    subs = {
        name: LatestVersion(p.endpoint, curve_server_key_file=str(keys / "learner.key"))
        for name, p in (("ours", ours), ("impostor", impostor), ("plain", plain))
    }
    eavesdropper = LatestVersion(ours.endpoint)  # no CURVE: no handshake with a CURVE server
    try:
        assert _heard(subs["ours"], ours) == 7
        assert _heard(subs["impostor"], impostor, 1.5) is None  # other key: handshake fails
        assert _heard(subs["plain"], plain, 1.5) is None  # no key at all
        assert _heard(eavesdropper, ours, 1.5) is None
    finally:
        for s in (*subs.values(), eavesdropper):
            s.close()
        for p in (ours, impostor, plain):
            p.close()
