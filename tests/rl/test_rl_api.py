import numpy as np
import pytest

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.rl import ArraySpec, RLModel, validate_observation

SPEC = {"state": ArraySpec((3,), "float32"), "image": ArraySpec((8, 8, 3), "uint8", optional=True)}


def test_valid_batched_observation_returns_batch_size():
    obs = {"state": np.zeros((5, 3), np.float32), "image": np.zeros((5, 8, 8, 3), np.uint8)}
    assert validate_observation(obs, SPEC) == 5
    assert validate_observation({"state": np.zeros((2, 3), np.float32)}, SPEC) == 2  # optional


@pytest.mark.parametrize(
    ("obs", "match"),
    [
        (
            {"image": np.zeros((1, 8, 8, 3), np.uint8)},
            r"observation\['state'\]: missing; expected float32 \[3\]",
        ),
        (
            {"state": np.zeros((1, 7), np.float32)},
            r"observation\['state'\]: expected float32 \['B', 3\], got float32 \[1, 7\]",
        ),
        (
            {"state": np.zeros((1, 3), np.float64)},
            r"observation\['state'\]: expected float32 .* got float64 \[1, 3\]",
        ),
        (
            {"state": np.zeros((3,), np.float32)},
            r"observation\['state'\]: expected float32 \['B', 3\], got float32 \[3\]",
        ),
        (
            {"state": np.full((1, 3), np.nan, np.float32)},
            r"observation\['state'\]: contains NaN or inf",
        ),
        (
            {"state": np.zeros((1, 3), np.float32), "stat": np.zeros(1)},
            r"unexpected key\(s\) \['stat'\]",
        ),
        (
            {"state": np.zeros((2, 3), np.float32), "image": np.zeros((3, 8, 8, 3), np.uint8)},
            r"batch size 3 differs from 2",
        ),
        ([1, 2, 3], r"expected a dict of arrays, got list"),
    ],
)
def test_bad_observation_raises_value_error_naming_key_and_spec(obs, match):
    with pytest.raises(ValueError, match=match):
        validate_observation(obs, SPEC)


def test_unbatched_validation():
    assert validate_observation({"state": np.zeros(3, np.float32)}, SPEC, batched=False) is None
    with pytest.raises(ValueError, match=r"expected float32 \[3\], got float32 \[1, 3\]"):
        validate_observation({"state": np.zeros((1, 3), np.float32)}, SPEC, batched=False)


def test_gaussian_mlp_implements_the_protocol_and_its_fake_obs_validates():
    import jax

    config = GaussianMLPConfig(obs_dim=6, action_dim=2)
    model = config.create(jax.random.key(0))
    assert isinstance(model, RLModel)
    assert validate_observation(config.fake_obs(4), model.obs_spec) == 4
