"""Every step is as exact as float32's: only what is stored is rounded.

The invariant, for every option, storage and preset: from the same stored
state and gradient, the update equals float32 RMSProp's update from the
dequantized state (``dequantize_state``), to float32 rounding. The float32
optimizer is itself checked against a float64 model elsewhere
(``test_alias.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax

SHAPES = {"w": (64, 256), "b": (300,), "s": (7,)}  # quantized, quantized (flat), too small
STORAGES = {
  "8-bit": dict(state_bits=8, min_quantize_size=256),
  "8-bit nearest": dict(state_bits=8, min_quantize_size=256, rounding="nearest"),
  "bfloat16 nu": dict(nu_dtype=jnp.bfloat16),
  "float16 nu": dict(nu_dtype=jnp.float16),
}
OPTIONS = {
  "plain": dict(),
  "momentum": dict(momentum=0.9),
  "nesterov": dict(momentum=0.9, nesterov=True),
  "centered": dict(centered=True),
  "centered momentum": dict(centered=True, momentum=0.9),
  "coupled wd": dict(weight_decay=0.1),
  "decoupled wd momentum": dict(weight_decay=0.1, weight_decay_mode="decoupled", momentum=0.5),
  "eps outside": dict(eps=1e-3, eps_in_sqrt=False),
  "lr after momentum": dict(momentum=0.9, lr_inside_momentum=False),
  "bias correction": dict(bias_correction=True, decay=0.99),
  "maximize, initial scale 1": dict(maximize=True, initial_scale=1.0),
}
PRESETS = {
  "pytorch": lambda **kw: rmsprop_jax.presets.pytorch(
    lr=0.01, alpha=0.9, momentum=0.9, weight_decay=0.01, **kw
  ),
  "pytorch centered": lambda **kw: rmsprop_jax.presets.pytorch(lr=0.01, centered=True, momentum=0.5, **kw),
  "keras": lambda **kw: rmsprop_jax.presets.keras(learning_rate=0.01, momentum=0.9, weight_decay=0.01, **kw),
  "tf1": lambda **kw: rmsprop_jax.presets.tf1(0.01, momentum=0.9, centered=True, **kw),
  "optax": lambda **kw: rmsprop_jax.presets.optax(0.01, 0.9, 1e-8, momentum=0.9, nesterov=True, **kw),
}


def _tree(seed, scale=1.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.normal(size=s), dtype) for k, s in SHAPES.items()}


def _one_step_each(make, storage, params_dtype=jnp.float32):
  """(our update, float32 RMSProp's update) from the same stored state and gradient."""
  narrow = make(**storage)
  wide = make()
  params = _tree(0, dtype=params_dtype)
  state = narrow.init(params)
  update = jax.jit(narrow.update)
  for t in range(4):  # a state with some history (and rounding) in it
    _, state = update(_tree(10 + t, 0.1 * (t + 1), params_dtype), state, params)
  g = _tree(20, 0.3, params_dtype)
  ours, _ = update(g, state, params)
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  theirs, _ = jax.jit(wide.update)(f32(g), rmsprop_jax.dequantize_state(state), f32(params))
  return ours, theirs


def _assert_float32_close(ours, theirs, rtol=8 * 2.0**-24):
  # A few float32 roundings apart: the decoded state is the same, the arithmetic is
  # ordered differently (8-bit centered keeps nu - mu**2 in the state).
  for k in ours:
    a, b = np.asarray(ours[k], np.float64), np.asarray(theirs[k], np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=k)


@pytest.mark.parametrize("storage", STORAGES.values(), ids=STORAGES.keys())
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_each_step_equals_float32_rmsprop_from_the_decoded_state(options, storage):
  make = lambda **kw: rmsprop_jax.rmsprop(0.01, **{**options, **kw})
  _assert_float32_close(*_one_step_each(make, storage))


@pytest.mark.parametrize(
  "storage", [STORAGES["8-bit"], STORAGES["bfloat16 nu"]], ids=["8-bit", "bfloat16 nu"]
)
@pytest.mark.parametrize("make", PRESETS.values(), ids=PRESETS.keys())
def test_each_preset_step_equals_float32_from_the_decoded_state(make, storage):
  _assert_float32_close(*_one_step_each(make, storage))


@pytest.mark.parametrize(
  "options", [OPTIONS["plain"], OPTIONS["centered momentum"]], ids=["plain", "centered momentum"]
)
def test_bfloat16_params_step_is_float32_rmsprop_rounded_once(options):
  # Moments stored in bfloat16 (the params' dtype): the update is float32's from
  # the decoded state, rounded once to bfloat16 (half an ulp, 2**-9 relative).
  make = lambda **kw: rmsprop_jax.rmsprop(0.01, **{**options, **kw})
  ours, theirs = _one_step_each(make, {}, params_dtype=jnp.bfloat16)
  for k in ours:
    assert ours[k].dtype == jnp.bfloat16
    b = np.asarray(theirs[k], np.float64)
    np.testing.assert_allclose(np.asarray(ours[k], np.float64), b, rtol=2.0**-8, atol=0, err_msg=k)
