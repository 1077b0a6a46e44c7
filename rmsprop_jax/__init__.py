"""RMSProp as a fast, framework-faithful JAX/Optax gradient transformation.

Public API:

- :func:`rmsprop`: the optimizer (``optax.rmsprop``'s numbers by default).
- :func:`scale_by_rms`: its learning-rate-free half.
- :class:`RMSPropState`: the state (``count``, ``nu``, ``mu``, ``trace``).
- :class:`StorageOptions`: how the state is stored (8-bit, bfloat16), keywords of every optimizer.
- :mod:`~rmsprop_jax.presets`: ``pytorch``, ``keras``, ``tf1`` and ``optax`` flavours.
- :func:`dequantize_state`: any stored state (8-bit, bfloat16) as float32 trees.
- :func:`effective_learning_rate` and :mod:`~rmsprop_jax.diagnostics`: inspect a state.
- :mod:`~rmsprop_jax.interop`: optimizer state from and to PyTorch and Keras.
- :func:`state_shardings`: the optimizer state split over the data-parallel devices (ZeRO-1).
"""

from rmsprop_jax import diagnostics, interop, presets
from rmsprop_jax.alias import rmsprop
from rmsprop_jax.diagnostics import dequantize_state, effective_learning_rate
from rmsprop_jax.sharding import state_shardings
from rmsprop_jax.storage import StorageOptions
from rmsprop_jax.transform import RMSPropState, scale_by_rms

__version__ = "0.1.0"

__all__ = [
  "RMSPropState",
  "dequantize_state",
  "diagnostics",
  "effective_learning_rate",
  "interop",
  "presets",
  "rmsprop",
  "scale_by_rms",
  "state_shardings",
  "StorageOptions",
]
