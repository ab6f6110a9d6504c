import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).parents[1]
OPENPI_VENV = ROOT / ".venv-openpi-client"


@pytest.fixture(scope="session")
def openpi_client_python() -> str:
    """Python of a separate virtualenv holding the real openpi-client from PyPI, as a robot runs
    it (it pins numpy<2, so it cannot share ours; 0.1.2 forgets typing_extensions)."""
    python = OPENPI_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OPENPI_VENV)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "openpi-client==0.1.2",
                "typing_extensions",
            ],
            check=True,
        )
    return str(python)


LEROBOT_VENV = ROOT / ".venv-lerobot"
# lerobot 0.4.4 (dataset format v3.0; its newest release for Python 3.11) pins torch<2.11, whose
# x86-64 wheels are CUDA builds pip would download (GBs). So its own dependencies are installed
# here without that pin: the torch 2.14.1 + torchvision 0.29.1 pair (machine's disk: ~1 min),
# torchcodec for its video decoding (Debian's FFmpeg libraries, `make debs`), and the libraries
# its dataset code imports. It takes ~6 GB; ~70 s to build on an idle 2-core machine (3 min loaded).
LEROBOT_REQUIREMENTS = (
    ("torch==2.14.1", "torchvision==0.29.1"),
    ("--no-deps", "lerobot==0.4.4"),
    ("torchcodec==0.14.0", "datasets>=4,<5", "huggingface-hub>=0.34.2,<0.36", "accelerate>=1.10,<2",
     "av>=15,<16", "draccus==0.10.0", "jsonlines", "packaging<26", "termcolor", "deepdiff<9",
     "einops", "pandas", "numpy<2.4"),  # numpy 2.4: LeRobot's own writer fails on (1,) features
)  # fmt: skip


@pytest.fixture(scope="session")
def lerobot_python() -> str:
    """Python of a separate virtualenv with the registry's LeRobot package (it needs torch)."""
    python, stamp = LEROBOT_VENV / "bin" / "python", LEROBOT_VENV / ".installed"
    if not stamp.exists():  # a build cut short is redone
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(LEROBOT_VENV)], check=True)
        for group in LEROBOT_REQUIREMENTS:
            pip = [str(python), "-m", "pip", "install", "--quiet", *group]
            subprocess.run(pip, check=True)
        subprocess.run([str(python), "-c", "import lerobot.datasets.lerobot_dataset"], check=True)
        stamp.touch()
    return str(python)


def _pg_cluster():
    """A throw-away PostgreSQL server (Debian's `postgresql`, which `make test` installs; as
    root it runs as `nobody`), on a Unix socket in a temporary directory; stopped after."""
    from openpi_rl.replay.pg_cluster import ClusterUnavailable, LocalCluster

    try:
        cluster = LocalCluster().start()
    except ClusterUnavailable as e:
        pytest.skip(str(e))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_cluster():
    """The session's PostgreSQL server (`pg_url` makes a database on it per test)."""
    yield from _pg_cluster()


@pytest.fixture
def own_cluster():
    """A PostgreSQL server of the test's own: one it may kill and restart."""
    yield from _pg_cluster()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """A fresh, empty database on the session's cluster."""
    return pg_cluster.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def replay_location(request, tmp_path) -> str:
    """A new replay's location on each backend: a directory, or a PostgreSQL database URL."""
    if request.param == "sqlite":
        return str(tmp_path / "replay")
    return request.getfixturevalue("pg_url")
