"""Bad input gets a clear error at construction, init or trace time."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import PARAMS0, fixed_grads

import rmsprop_jax
from rmsprop_jax import presets, scale_by_rms

BAD_HYPERPARAMS = [
  (rmsprop_jax.rmsprop, dict(learning_rate=-0.1), "learning_rate must be >= 0, got -0.1"),
  (rmsprop_jax.rmsprop, dict(learning_rate=float("nan")), "learning_rate must be finite, got nan"),
  (rmsprop_jax.rmsprop, dict(learning_rate=float("inf")), "learning_rate must be finite, got inf"),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, decay=1.5), "decay must be in [0, 1], got 1.5"),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, decay=-0.1), "decay must be in [0, 1], got -0.1"),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, eps=-1e-8), "eps must be >= 0, got -1e-08"),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, momentum=1.0), "momentum must be in [0, 1), got 1.0"),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, weight_decay=-1), "weight_decay must be >= 0, got -1"),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, initial_scale=-1.0), "initial_scale must be >= 0, got -1.0"),
  (rmsprop_jax.rmsprop, dict(learning_rate=jnp.array(-1.0)), "learning_rate must be >= 0, got -1.0"),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, weight_decay_mode="l2"),
    "weight_decay_mode must be one of ('coupled', 'decoupled'), got 'l2'",
  ),
  (scale_by_rms, dict(decay=2.0), "decay must be in [0, 1], got 2.0"),
  (presets.pytorch, dict(lr=-0.01), "lr must be >= 0, got -0.01"),
  (presets.pytorch, dict(alpha=1.01), "alpha must be in [0, 1], got 1.01"),
  (presets.pytorch, dict(eps=-1.0), "eps must be >= 0, got -1.0"),
  (presets.pytorch, dict(momentum=-0.5), "momentum must be in [0, 1), got -0.5"),
  (presets.pytorch, dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
  (presets.keras, dict(rho=1.5), "rho must be in [0, 1], got 1.5"),
  (presets.keras, dict(epsilon=-1e-7), "epsilon must be >= 0, got -1e-07"),
  (presets.keras, dict(learning_rate=float("nan")), "learning_rate must be finite, got nan"),
  (presets.keras, dict(weight_decay=-0.004), "weight_decay must be >= 0, got -0.004"),
  (presets.tf1, dict(learning_rate=0.1, decay=-1.0), "decay must be in [0, 1], got -1.0"),
  (presets.tf1, dict(learning_rate=0.1, epsilon=-1.0), "epsilon must be >= 0, got -1.0"),
]


@pytest.mark.parametrize(
  "factory,kwargs,message",
  BAD_HYPERPARAMS,
  ids=[f"{f.__name__} {k}" for f, k, _ in BAD_HYPERPARAMS],
)
def test_bad_hyperparameter_names_itself_and_its_value(factory, kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    factory(**kwargs)


def test_bool_is_not_a_learning_rate():
  with pytest.raises(TypeError, match="learning_rate must be a number"):
    rmsprop_jax.rmsprop(True)


NOT_NUMBERS = [
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate="1e-3"),
    "learning_rate must be a number or an array of numbers, got the str '1e-3'",
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=[1e-3]),
    "learning_rate must be a number or an array of numbers, got the list [0.001]",
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate={"lr": 1e-3}),
    "learning_rate must be a number or an array of numbers, got the dict",
  ),
  (rmsprop_jax.rmsprop, dict(learning_rate=None), "learning_rate must be a number, got None"),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, decay=None), "decay must be a number, got None"),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, eps="1e-8"),
    "eps must be a number or an array of numbers, got the str '1e-8'",
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, momentum=(0.9,)),
    "momentum must be a number or an array of numbers, got the tuple (0.9,)",
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, weight_decay=None),
    "weight_decay must be a number, got None",
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, initial_scale="1"),
    "initial_scale must be a number or an array of numbers, got the str '1'",
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=np.array(["0.1"])),
    "learning_rate must be a number or an array of real numbers, got an array of dtype <U3",
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=jnp.array([True])),
    "learning_rate must be a number or an array of real numbers, got an array of dtype bool",
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=lambda count: "0.1"),
    "learning_rate(0) must be a number or an array of numbers, got the str '0.1'",
  ),
  (
    rmsprop_jax.rmsprop,
    dict(learning_rate=0.1, state_bits="8"),
    "state_bits must be an int, got the str '8'",
  ),
  (rmsprop_jax.rmsprop, dict(learning_rate=0.1, seed="0"), "seed must be an integer scalar, got '0'"),
  (scale_by_rms, dict(decay="0.9"), "decay must be a number or an array of numbers, got the str '0.9'"),
  (scale_by_rms, dict(eps=[1e-8]), "eps must be a number or an array of numbers, got the list [1e-08]"),
  (presets.pytorch, dict(lr="0.01"), "lr must be a number or an array of numbers, got the str '0.01'"),
  (presets.keras, dict(rho=None), "rho must be a number, got None"),
  (
    presets.tf1,
    dict(learning_rate=0.1, epsilon={"eps": 1e-10}),
    "epsilon must be a number or an array of numbers, got the dict",
  ),
]


@pytest.mark.parametrize(
  "factory,kwargs,message",
  NOT_NUMBERS,
  ids=[f"{f.__name__} {k}" for f, k, _ in NOT_NUMBERS],
)
def test_a_hyperparameter_that_is_not_a_number_is_refused_at_construction(factory, kwargs, message):
  with pytest.raises(TypeError, match=re.escape(message)):
    factory(**kwargs)


def test_numbers_arrays_schedules_and_injected_hyperparameters_are_accepted():
  params = jnp.zeros(3)
  opts = [
    rmsprop_jax.rmsprop(1),  # an int
    rmsprop_jax.rmsprop(np.float32(0.1), decay=np.array(0.9), eps=jnp.asarray(1e-8)),
    rmsprop_jax.rmsprop(jnp.array([0.1, 0.2, 0.3])),  # one per element
    rmsprop_jax.rmsprop(optax.linear_schedule(0.1, 0.0, 10), decay=lambda count: 0.9),
    rmsprop_jax.rmsprop(0.1, state_bits=np.int64(8), min_quantize_size=jnp.asarray(1)),
  ]
  for opt in opts:
    u, _ = jax.jit(opt.update)(jnp.ones(3), opt.init(params), params)
    chex.assert_tree_all_finite(u)
  # inject_hyperparams passes every number as an array (traced under jit).
  kwargs = dict(learning_rate=0.1, decay=0.9, momentum=0.5)
  injected = optax.inject_hyperparams(rmsprop_jax.rmsprop)(**kwargs)
  plain = rmsprop_jax.rmsprop(**kwargs)
  u_injected, _ = jax.jit(injected.update)(jnp.ones(3), injected.init(params), params)
  u_plain, _ = plain.update(jnp.ones(3), plain.init(params), params)
  chex.assert_trees_all_close(u_injected, u_plain, rtol=1e-6)


def test_only_the_learning_rate_and_the_decay_may_be_schedules():
  with pytest.raises(TypeError, match="eps must be a number or an array, got the callable"):
    rmsprop_jax.rmsprop(0.1, eps=lambda count: 1e-8)
  with pytest.raises(TypeError, match="momentum must be a number or an array, got the callable"):
    rmsprop_jax.rmsprop(0.1, momentum=lambda count: 0.9)
  rmsprop_jax.rmsprop(lambda count: 0.1, decay=lambda count: 0.9)  # both fine


@pytest.mark.parametrize(
  "factory, kwargs, message",
  [
    (
      rmsprop_jax.rmsprop,
      dict(learning_rate=0.1, decay=lambda c: 1.5),
      r"decay\(0\) must be in \[0, 1\], got 1.5",
    ),
    (rmsprop_jax.presets.pytorch, dict(alpha=lambda c: -0.1), r"alpha\(0\) must be in \[0, 1\], got -0.1"),
    (rmsprop_jax.presets.keras, dict(rho=lambda c: 2.0), r"rho\(0\) must be in \[0, 1\], got 2.0"),
    (rmsprop_jax.rmsprop, dict(learning_rate=lambda c: -0.1), r"learning_rate\(0\) must be >= 0, got -0.1"),
  ],
  ids=["decay", "torch alpha", "keras rho", "learning rate"],
)
def test_a_schedule_starting_out_of_range_is_refused_at_construction(factory, kwargs, message):
  with pytest.raises(ValueError, match=message):
    factory(**kwargs)


def test_bias_correction_with_a_decay_schedule_is_refused():
  with pytest.raises(ValueError, match="bias_correction=True needs a constant decay"):
    rmsprop_jax.rmsprop(0.1, decay=lambda count: 0.9, bias_correction=True)
  with pytest.raises(ValueError, match="bias_correction=True needs a constant decay"):
    rmsprop_jax.scale_by_rms(decay=lambda count: 0.9, bias_correction=True)


def test_nu_dtype_must_be_floating():
  with pytest.raises(TypeError, match="nu_dtype must be a real floating dtype, got int32"):
    rmsprop_jax.rmsprop(0.1, nu_dtype=jnp.int32)


def test_nesterov_without_momentum_is_refused():
  with pytest.raises(ValueError, match="nesterov=True needs a momentum value"):
    rmsprop_jax.rmsprop(0.1, nesterov=True)


def test_traced_hyperparameters_skip_value_checks():
  # Inside vmap the values are unknown: construction must not fail.
  def first_update(lr):
    opt = rmsprop_jax.rmsprop(lr, decay=lr)
    return opt.update(jnp.ones(2), opt.init(jnp.zeros(2)))[0]

  out = jax.vmap(first_update)(jnp.array([0.1, 0.5]))
  assert out.shape == (2, 2)


@pytest.mark.parametrize("eps_in_sqrt", [True, False], ids=["eps inside", "eps outside"])
def test_zero_eps_and_zero_gradient_give_zero_not_nan(eps_in_sqrt):
  opt = rmsprop_jax.rmsprop(0.1, eps=0.0, eps_in_sqrt=eps_in_sqrt, centered=True)
  state = opt.init(jnp.zeros(3))
  u, state = opt.update(jnp.array([0.0, 1.0, -2.0]), state)
  np.testing.assert_allclose(u[0], 0.0)
  chex.assert_tree_all_finite((u, state))


def test_init_refuses_integer_params_naming_the_leaf():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "step": jnp.array([1, 2], jnp.int32)}}
  with pytest.raises(TypeError, match=r"params\['dense'\]\['step'\] has dtype int32"):
    rmsprop_jax.rmsprop(0.1).init(params)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jitted"])
@pytest.mark.parametrize("dtype", ["int32", "uint8", "bool"])
def test_update_refuses_integer_and_boolean_gradients_naming_the_leaf_and_dtype(dtype, jit):
  params = {"dense": {"kernel": jnp.zeros((2, 2)), "scale": jnp.zeros(2)}}
  opt = rmsprop_jax.rmsprop(0.1)
  state = opt.init(params)
  grads = {"dense": {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2, dtype)}}
  update = jax.jit(opt.update) if jit else opt.update
  with pytest.raises(
    TypeError, match=rf"updates\['dense'\]\['scale'\] has dtype {dtype}; RMSProp needs floating"
  ):
    update(grads, state, params)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jitted"])
def test_update_refuses_a_broadcastable_shape(jit):
  opt = rmsprop_jax.rmsprop(0.1)
  state = opt.init({"w": jnp.zeros(3)})
  update = jax.jit(opt.update) if jit else opt.update
  msg = r"updates\['w'\] has shape \(3, 1\), but state.nu\['w'\] has shape \(3,\)"
  with pytest.raises(ValueError, match=msg):
    update({"w": jnp.ones((3, 1))}, state)


def test_update_refuses_another_tree_structure():
  opt = rmsprop_jax.rmsprop(0.1)
  state = opt.init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="updates has tree structure"):
    opt.update({"w": jnp.ones(3), "b": jnp.ones(1)}, state)


def test_weight_decay_needs_params_and_matching_params():
  opt = rmsprop_jax.rmsprop(0.1, weight_decay=0.1)
  state = opt.init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="params must be passed"):
    opt.update({"w": jnp.ones(3)}, state)
  with pytest.raises(ValueError, match=r"params\['w'\] has shape \(4,\)"):
    opt.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(4)})


def test_apply_if_finite_skips_a_nan_step_without_poisoning_the_state():
  grads = fixed_grads(8, seed=21)
  bad = jax.tree.map(lambda g: np.full_like(g, np.nan), grads[0])
  with_nan = grads[:4] + [bad] + grads[4:]
  opt = optax.apply_if_finite(rmsprop_jax.rmsprop(0.01, momentum=0.9), max_consecutive_errors=3)
  clean = rmsprop_jax.rmsprop(0.01, momentum=0.9)

  def run(opt, seq):
    params = jax.tree.map(jnp.asarray, PARAMS0)
    state = opt.init(params)
    step = jax.jit(opt.update)
    for g in seq:
      u, state = step(jax.tree.map(jnp.asarray, g), state, params)
      params = optax.apply_updates(params, u)
    return params, state

  p_nan, s_nan = run(opt, with_nan)
  p_clean, s_clean = run(clean, grads)
  chex.assert_tree_all_finite((p_nan, s_nan.inner_state))
  chex.assert_trees_all_equal(p_nan, p_clean)
  chex.assert_trees_all_equal(s_nan.inner_state, s_clean)
  assert int(s_nan.total_notfinite) == 1


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1e-5, 1e5, 1e12, 1e18])
def test_extreme_finite_gradients_give_finite_updates(magnitude):
  for opts in ({}, dict(centered=True, momentum=0.9), dict(eps_in_sqrt=False)):
    opt = rmsprop_jax.rmsprop(0.01, **opts)
    state = opt.init(jnp.zeros(4))
    for sign in (1.0, -1.0, 1.0):
      g = jnp.full(4, sign * magnitude, jnp.float32)
      u, state = opt.update(g, state)
      chex.assert_tree_all_finite((u, state))
