"""A run's learning curve as a PNG that an image reader opens."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from openpi_rl.eval import learning_curve_png


def test_learning_curve_png_is_written(tmp_path):
    rng = np.random.default_rng(0)
    versions = np.repeat(np.arange(6), 15)
    returns = 5.0 + 10.0 * versions + rng.normal(0, 3, size=len(versions))
    steps = np.cumsum(rng.integers(5, 60, size=len(versions)))
    path = learning_curve_png(steps, returns, versions, tmp_path / "curve" / "learning_curve.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 400)
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5  # axes, dots and lines drawn, not a blank canvas
    with pytest.raises(ValueError, match="no episodes"):
        learning_curve_png([], [], [], tmp_path / "empty.png")
