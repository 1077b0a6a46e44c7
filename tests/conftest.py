"""Suite-wide JAX settings, as in equinox's tests/conftest.py.

Eight host CPU devices let the sharding tests build a mesh; rank promotion
raises so that a silent broadcast in our code fails a test.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
