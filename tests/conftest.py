"""Suite-wide JAX settings, as in equinox's tests/conftest.py.

Eight host CPU devices let the sharding tests build a mesh; rank promotion
raises so that a silent broadcast in our code fails a test.
"""

import os

_flag = "--xla_force_host_platform_device_count"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_flag}=8").strip()
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
