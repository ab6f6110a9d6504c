"""openpi-rl: online reinforcement learning for OpenPI-style robot policies."""

from flax import config as _flax_config
from flax.nnx import pytreelib as _pytreelib

# The seed's documented value head (`MyValueHead`) keeps its layers in a plain Python list;
# flax >= 0.12 accepts that only from modules that are not pytrees. This package needs only
# graph-mode modules (it splits them with nnx.split), so make that the default for modules
# defined from here on. flax reads `flax_pytree_module` once, as the default argument of
# `Pytree.__init_subclass__`, so the default is updated there too (import order then does
# not matter). A module can still opt in with `class M(nnx.Module, pytree=True)`.
_flax_config.update("flax_pytree_module", False)
_pytreelib.Pytree.__dict__["__init_subclass__"].__func__.__kwdefaults__["pytree"] = False

__version__ = "0.1.0"
