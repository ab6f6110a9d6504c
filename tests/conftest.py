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
