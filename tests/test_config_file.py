import pytest

from openpi_rl import config_file
from openpi_rl.models import GaussianMLPConfig, Pi0FASTConfig
from openpi_rl.train.train_ppo import PPOTrainConfig


def test_a_toml_file_fills_nested_configs_and_picks_the_model_by_kind(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'env = "InvertedPendulum-v5"\nnum_envs = 2\n\n'
        '[model]\nkind = "pi0_fast"\nvariant = "dummy"\naction_horizon = 2\n\n'
        "[ppo]\nlr = 1e-4\ntarget_kl = 0.02\n"
    )
    config = config_file.load(PPOTrainConfig, path)
    assert config.num_envs == 2
    assert config.model == Pi0FASTConfig(variant="dummy", action_horizon=2)
    assert config.ppo.lr == 1e-4 and config.ppo.target_kl == 0.02
    assert config_file.from_dict(
        PPOTrainConfig, {"model": {"kind": "gaussian_mlp", "hidden": [32]}}
    ).model == GaussianMLPConfig(hidden=(32,))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"num_envz": 2}, r"unknown key\(s\) \['num_envz'\]"),
        ({"num_envs": "two"}, r"num_envs: expected int, got str"),
        ({"model": {"kind": "resnet"}}, r"model: kind 'resnet' is not one of"),
        ({"ppo": {"lr": 1e-3, "clip": 0.1}}, r"ppo: unknown key\(s\) \['clip'\]"),
        ({"reward_type": "telepathy"}, r"reward_type: 'telepathy' is not one of"),
    ],
)
def test_config_file_errors_name_the_key(data, match):
    with pytest.raises(ValueError, match=match):
        config_file.from_dict(PPOTrainConfig, data)
