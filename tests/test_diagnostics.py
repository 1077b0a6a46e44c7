"""effective_learning_rate and find_state."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax.diagnostics import find_state


def test_effective_learning_rate_is_lr_over_root_of_nu():
  opt = rmsprop_jax.rmsprop(0.1, decay=0.9, eps=1e-6)
  params = {"a": jnp.array([1.0, -3.0])}
  state = opt.init(params)
  gs = [np.array([2.0, 0.5]), np.array([-1.0, 4.0])]
  nu = np.zeros(2)
  for g in gs:
    u, state = opt.update({"a": jnp.asarray(g, jnp.float32)}, state)
    nu = 0.9 * nu + 0.1 * g**2
  eff = rmsprop_jax.effective_learning_rate(state, 0.1, 1e-6)["a"]
  np.testing.assert_allclose(eff, 0.1 / np.sqrt(nu + 1e-6), rtol=1e-6)
  # the last update is exactly -eff * g
  np.testing.assert_allclose(u["a"], -eff * gs[-1], rtol=1e-6)
  eff_out = rmsprop_jax.effective_learning_rate(state, 0.1, 1e-6, eps_in_sqrt=False)
  np.testing.assert_allclose(eff_out["a"], 0.1 / (np.sqrt(nu) + 1e-6), rtol=1e-6)


def test_effective_learning_rate_with_a_schedule_uses_the_last_steps_rate():
  sched = lambda c: 0.1 / (1.0 + c)
  opt = rmsprop_jax.rmsprop(sched)
  state = opt.init(jnp.zeros(1))
  for _ in range(3):
    _, state = opt.update(jnp.ones(1), state)
  eff = rmsprop_jax.effective_learning_rate(state, sched)
  nu = 1 - 0.9**3
  np.testing.assert_allclose(eff, 0.1 / 3 / np.sqrt(nu + 1e-8), rtol=1e-6)


def test_find_state_inside_chain_and_inject_hyperparams():
  opt = optax.chain(optax.clip(1.0), optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.1))
  state = opt.init(jnp.zeros(3))
  assert isinstance(find_state(state), rmsprop_jax.RMSPropState)
  eff = rmsprop_jax.effective_learning_rate(state, 0.1, eps=1.0)
  np.testing.assert_allclose(eff, np.full(3, 0.1))


def test_find_state_refuses_a_state_without_ours():
  with pytest.raises(ValueError, match="exactly one RMSPropState, found 0"):
    find_state(optax.adam(0.1).init(jnp.zeros(2)))
