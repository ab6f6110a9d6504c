"""Tokens (guarantee 7): a failed and a successful authentication on the bridge (pendant,
HTTP, /query), the admin endpoint and the openpi WebSocket never put the token in the logs, and
`--help` never prints a token read from the config file."""

import json
import logging
import urllib.request

import pytest
import websockets.sync.client

from openpi_rl.cli import main
from openpi_rl.policy_server.admin import AdminEndpoint, admin_request
from openpi_rl.policy_server.openpi_ws import OpenPIWebSocketEndpoint
from openpi_rl.replay import ReplayConfig, ReplayWriter
from openpi_rl.reward_bridge import BridgeConfig, RewardBridge

SECRET = "tok-SECRET-d41d8cd98f00b204"
WRONG = "tok-WRONG-e99a18c428cb38d5"


def _server_logs(caplog) -> str:
    """Every log record but this test's own WebSocket client (which logs its request line)."""
    return "\n".join(
        r.getMessage() for r in caplog.records if not r.name.startswith("websockets.client")
    )


def test_bridge_tokens_never_reach_the_logs(tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    ReplayWriter(ReplayConfig(path=tmp_path / "replay")).close()
    config = BridgeConfig(
        replay_dir=str(tmp_path / "replay"),
        ws_port=0,
        http_port=0,
        metrics_port=None,
        operators={"ana": SECRET},
        query_token=SECRET,
        query_timeout_s=0.1,
    )
    bridge = RewardBridge(config).start()
    try:
        for token, ok in ((WRONG, False), (SECRET, True)):
            with websockets.sync.client.connect(f"ws://127.0.0.1:{bridge.ws_port}/pendant") as ws:
                ws.send(json.dumps({"type": "hello", "token": token}))
                if ok:
                    assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
                else:
                    with pytest.raises(websockets.exceptions.ConnectionClosed):
                        ws.recv(timeout=10)
            req = urllib.request.Request(
                f"http://127.0.0.1:{bridge.http_port}/feedback",
                data=json.dumps({"robot_id": "r", "kind": "step_reward", "value": 1}).encode(),
                headers={"Authorization": f"Bearer {token}"},
                method="POST",
            )
            try:
                status = urllib.request.urlopen(req, timeout=10).status
            except urllib.error.HTTPError as e:
                status = e.code
            assert (status == 200) == ok
            url = f"ws://127.0.0.1:{bridge.ws_port}/query"
            auth = {"Authorization": f"Bearer {token}"}
            if ok:
                with websockets.sync.client.connect(url, additional_headers=auth):
                    pass
            else:
                with pytest.raises(websockets.exceptions.InvalidStatus):
                    websockets.sync.client.connect(url, additional_headers=auth)
            with websockets.sync.client.connect(url) as ws:  # or in the hello frame
                ws.send(json.dumps({"type": "hello", "token": token}))
                if ok:
                    ws.send(json.dumps({"observation": {"x": [1.0]}, "actions": [0.0]}))
                    assert json.loads(ws.recv(timeout=10)) == {"reward": 0.0}
                else:
                    with pytest.raises(websockets.exceptions.ConnectionClosed):
                        ws.recv(timeout=10)
    finally:
        bridge.close()
    logs = capfd.readouterr()
    text = logs.out + logs.err + _server_logs(caplog)
    assert "unauthorized" in text  # the refusals were logged...
    assert SECRET not in text and WRONG not in text  # ...without the tokens


def test_admin_and_openpi_ws_tokens_never_reach_the_logs(capfd, caplog):
    caplog.set_level(logging.DEBUG)

    class _Swapper:  # the admin endpoint's only collaborator here: status and metrics
        from openpi_rl.policy_server.metrics import ServerMetrics

        metrics = ServerMetrics()

        def status(self):
            return {"version": 0}

    admin = AdminEndpoint(_Swapper(), "tcp://127.0.0.1:*", SECRET).start()
    ws = OpenPIWebSocketEndpoint("inproc://none", {"m": 1}, port=0, api_key=SECRET).start()
    try:
        assert admin_request(admin.endpoint, WRONG, "status", timeout_s=10)["error"]
        assert admin_request(admin.endpoint, SECRET, "status", timeout_s=10)["ok"]
        assert admin_request(admin.endpoint, WRONG, "pin", 3, timeout_s=10)["error"]
        url = f"ws://127.0.0.1:{ws.port}"
        with pytest.raises(websockets.exceptions.InvalidStatus):
            websockets.sync.client.connect(url, additional_headers={"Authorization": WRONG})
        with websockets.sync.client.connect(
            url, additional_headers={"Authorization": f"Api-Key {SECRET}"}
        ) as c:
            assert c.recv(timeout=10)  # the metadata frame: authorized
    finally:
        admin.close()
        ws.close()
    logs = capfd.readouterr()
    text = logs.out + logs.err + _server_logs(caplog)
    assert "unauthorized" in text
    assert SECRET not in text and WRONG not in text


def test_bridge_help_hides_tokens_from_the_config_file(tmp_path, capsys):
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(f'query_token = "{SECRET}"\n[operators]\nana = "{WRONG}"\n')
    with pytest.raises(SystemExit):
        main(["bridge", "--config", str(cfg), "--help"])
    out = capsys.readouterr().out
    assert "operators" in out
    assert SECRET not in out and WRONG not in out


def test_a_query_token_in_the_url_is_refused_and_masked_in_the_log(tmp_path, capfd, caplog):
    """URLs end up in proxy logs, shell histories and Referer headers: /query takes its token
    from the Authorization header or the hello frame only, and a URL that carries one is
    logged with it masked."""
    caplog.set_level(logging.DEBUG)
    ReplayWriter(ReplayConfig(path=tmp_path / "replay")).close()
    config = BridgeConfig(
        replay_dir=str(tmp_path / "replay"),
        ws_port=0,
        http_port=0,
        metrics_port=None,
        operators={"ana": WRONG},
        query_token=SECRET,
        query_timeout_s=0.1,
    )
    bridge = RewardBridge(config).start()
    try:
        body = json.dumps({"observation": {"x": [1.0]}, "actions": [0.0]}).encode()
        url = f"http://127.0.0.1:{bridge.http_port}/query?robot_id=arm-1&token={SECRET}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=10)
        assert refused.value.code == 401
        ws_url = f"ws://127.0.0.1:{bridge.ws_port}/query?token={SECRET}"
        with websockets.sync.client.connect(ws_url) as ws:  # the URL's token counts for nothing
            ws.send(body.decode())  # not a hello
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 4401
    finally:
        bridge.close()
    logs = capfd.readouterr()
    text = logs.out + logs.err + _server_logs(caplog)
    assert "token=%2A%2A%2A" in text or "token=***" in text  # the refusal, URL masked
    assert SECRET not in text


def test_query_needs_a_token_when_the_bridge_binds_beyond_loopback(tmp_path):
    ReplayWriter(ReplayConfig(path=tmp_path / "replay")).close()
    config = BridgeConfig(
        replay_dir=str(tmp_path / "replay"),
        host="0.0.0.0",
        ws_port=0,
        http_port=0,
        metrics_port=None,
        query_timeout_s=0.1,
    )
    bridge = RewardBridge(config).start()
    try:
        body = json.dumps({"observation": {"x": [1.0]}, "actions": [0.0]}).encode()
        url = f"http://127.0.0.1:{bridge.http_port}/query"
        with pytest.raises(urllib.error.HTTPError) as refused:  # no token can be right
            urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=10)
        assert refused.value.code == 401
        with pytest.raises(websockets.exceptions.InvalidStatus):
            websockets.sync.client.connect(f"ws://127.0.0.1:{bridge.ws_port}/query")
    finally:
        bridge.close()
