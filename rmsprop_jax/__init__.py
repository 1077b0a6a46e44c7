"""RMSProp as a fast, faithful JAX/Optax gradient transformation."""

from rmsprop_jax import presets
from rmsprop_jax.alias import rmsprop
from rmsprop_jax.diagnostics import effective_learning_rate
from rmsprop_jax.transform import RMSPropState, scale_by_rms

__version__ = "0.1.0"

__all__ = [
    "RMSPropState",
    "effective_learning_rate",
    "presets",
    "rmsprop",
    "scale_by_rms",
]
