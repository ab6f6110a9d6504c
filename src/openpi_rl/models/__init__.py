"""Policies that implement the RL API (`openpi_rl.rl.rl_api.RLModel`)."""

from openpi_rl.models.action_tokenizer import (
    ActionTokenizer,
    BinningTokenizer,
    FASTTokenizer,
    make_tokenizer,
)
from openpi_rl.models.gaussian_mlp import GaussianMLP, GaussianMLPConfig
from openpi_rl.models.pi0_fast import Pi0FAST, Pi0FASTConfig
from openpi_rl.models.pi0_fast_openpi import Pi0FASTOpenPI, Pi0FASTOpenPIConfig

__all__ = [
    "ActionTokenizer",
    "BinningTokenizer",
    "FASTTokenizer",
    "GaussianMLP",
    "GaussianMLPConfig",
    "Pi0FAST",
    "Pi0FASTConfig",
    "Pi0FASTOpenPI",
    "Pi0FASTOpenPIConfig",
    "make_tokenizer",
]
