"""A real Prometheus (Debian's `prometheus`; `make test` installs it) scrapes the processes of
`openpi-rl daemon` with deploy/prometheus.yml (targets moved to this test's ports) and its
rules, and answers PromQL over its HTTP API with our series for each process. Every metric
name the Grafana dashboard and the rules use exists in what the processes export, and every
dashboard query is valid PromQL that Prometheus evaluates."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from daemon_process import MODEL, DaemonProcess, free_port

from openpi_rl_client import PolicyClient

DEPLOY = Path(__file__).parents[2] / "deploy"
EXAMPLE = Path(__file__).parents[2] / "systemd" / "openpi-rl.toml.example"
# deploy/prometheus.yml's job -> the process (its port key in DaemonProcess) and one series
# that process must export.
JOBS = {
    "openpi-rl-policy-server": ("serve_metrics", "openpi_rl_server_ready"),
    "openpi-rl-reward-bridge": ("bridge_metrics", "openpi_rl_bridge_connections"),
    "openpi-rl-learner": ("learn_metrics", "openpi_rl_learner_version"),
    "openpi-rl-daemon": ("daemon_metrics", "openpi_rl_daemon_child_ready"),
}
NAME = re.compile(r"\bopenpi_rl_[a-z0-9_]+")
RECORDED = re.compile(r"\bopenpi_rl:[a-z0-9_:]+")


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(path).exists(), "prometheus missing: `make test` installs Debian's prometheus"
    return path


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def query(port: int, promql: str) -> list[dict]:
    q = urllib.parse.urlencode({"query": promql})
    body = get_json(f"http://127.0.0.1:{port}/api/v1/query?{q}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics text can carry: sample names, plus the names implied by the
    TYPE lines (a labelled counter exports no sample until its first increment)."""
    names = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln and ln[0] != "#"}
    for kind_line in re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text):
        base, kind = kind_line
        names.add(base)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        names |= {base.removesuffix("_total") + s for s in suffixes.get(kind, ())}
    return names


def dashboard_queries() -> list[str]:
    board = json.loads((DEPLOY / "grafana" / "openpi-rl.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The three roles under `openpi-rl daemon`, each ready, with a few requests served."""
    d = DaemonProcess(tmp_path_factory.mktemp("service"))
    try:
        for role in ("serve", "bridge", "learn"):
            d.wait_for("daemon.child_ready", role=role)
        endpoint = f"tcp://127.0.0.1:{d.ports['endpoint']}"
        with PolicyClient(endpoint, robot_id="arm-1", timeout_s=5.0) as c:
            for _ in range(3):
                c.infer({"state": np.zeros(MODEL["obs_dim"], np.float32)})
        yield d
    finally:
        d.kill()


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    """Prometheus on loopback with deploy/prometheus.yml and its rules, scraping every second."""
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
    assert {job["job_name"] for job in config["scrape_configs"]} == set(JOBS)
    for job in config["scrape_configs"]:
        port = service.ports[JOBS[job["job_name"]][0]]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "prometheus.log").open("w"),
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # every target scraped successfully at least once
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            try:
                up = query(port, 'up{job=~"openpi-rl-.*"}')
            except OSError:
                up = []
            if len(up) == len(JOBS) and all(r["value"][1] == "1" for r in up):
                break
            assert time.monotonic() < deadline, up
            time.sleep(0.25)
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def test_prometheus_scrapes_each_process_and_promql_returns_its_series(prometheus):
    for job, (_, series) in JOBS.items():
        result = query(prometheus, f'{series}{{job="{job}"}}')
        assert result, f"no {series} from {job}"
        ours = query(prometheus, f'count({{job="{job}", __name__=~"openpi_rl_.+"}})')
        assert int(ours[0]["value"][1]) >= 3, job
    assert query(prometheus, "openpi_rl_server_ready")[0]["value"][1] == "1"  # warmed up
    assert query(prometheus, "sum(openpi_rl_daemon_child_ready)")[0]["value"][1] == "3"
    served = query(prometheus, 'openpi_rl_server_requests_total{type="infer"}')
    assert float(served[0]["value"][1]) >= 3  # a client's resend on a loaded machine counts too


def test_rules_load_and_every_dashboard_query_is_valid_promql(prometheus):
    rules = get_json(f"http://127.0.0.1:{prometheus}/api/v1/rules")["data"]["groups"]
    loaded = {r["name"] for g in rules for r in g["rules"]}
    assert {"openpi_rl:server_infer_seconds:p99", "OpenpiRlProcessDown"} <= loaded
    for expr in dashboard_queries():
        query(prometheus, expr.replace("$__rate_interval", "1m"))  # asserts status success


def test_every_metric_name_in_the_dashboard_and_rules_is_exported(service):
    exported: set[str] = set()
    for port_key, _ in JOBS.values():
        url = f"http://127.0.0.1:{service.ports[port_key]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            exported |= exported_names(r.read().decode())
    board = (DEPLOY / "grafana" / "openpi-rl.json").read_text()
    rules = (DEPLOY / "openpi-rl.rules.yml").read_text()
    used = set(NAME.findall(board)) | set(NAME.findall(rules))
    assert len(used) >= 20
    assert not used - exported, f"not exported by any process: {sorted(used - exported)}"
    recorded = {
        r["record"] for g in yaml.safe_load(rules)["groups"] for r in g["rules"] if "record" in r
    }
    assert set(RECORDED.findall(board)) <= recorded
    # Prometheus naming: counters end in _total, durations in _seconds, sizes in _bytes.
    for name in exported:
        assert not re.search(r"_(ms|milliseconds|sec|kb|mb)(_|$)", name), name


def test_prometheus_yml_scrapes_the_example_configs_ports():
    example = tomllib.loads(EXAMPLE.read_text())
    ports = {
        "openpi-rl-policy-server": example["serve"]["metrics_port"],
        "openpi-rl-reward-bridge": example["bridge"]["metrics_port"],
        "openpi-rl-learner": example["learn"]["metrics_port"],
        "openpi-rl-daemon": example["daemon"]["metrics_port"],
    }
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{ports[job['job_name']]}"]
