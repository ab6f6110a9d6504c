"""Policies that implement the RL API (`openpi_rl.rl.rl_api.RLModel`)."""

from openpi_rl.models.gaussian_mlp import GaussianMLP, GaussianMLPConfig

__all__ = ["GaussianMLP", "GaussianMLPConfig"]
