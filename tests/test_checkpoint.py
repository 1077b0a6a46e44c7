"""State you can keep: orbax and pickle round trips resume bit-identically."""

import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import PARAMS0, fixed_grads

import rmsprop_jax

GRADS = fixed_grads(10, seed=31)


def _opt():
  return rmsprop_jax.rmsprop(
    optax.linear_schedule(0.02, 0.001, 10),
    momentum=0.9,
    centered=True,
    nu_dtype=jnp.bfloat16,
  )


def _steps(opt, params, state, grads):
  step = jax.jit(opt.update)
  traj = []
  for g in grads:
    u, state = step(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, u)
    traj.append(params)
  return params, state, traj


def _resume_check(save, load):
  opt = _opt()
  params = jax.tree.map(jnp.asarray, PARAMS0)
  full_params, full_state, full_traj = _steps(opt, params, opt.init(params), GRADS)
  mid_params, mid_state, _ = _steps(opt, params, opt.init(params), GRADS[:4])
  restored_params, restored_state = load(save((mid_params, mid_state)))
  assert isinstance(restored_state, rmsprop_jax.RMSPropState)
  assert restored_state.nu["w"].dtype == jnp.bfloat16
  _, end_state, traj = _steps(_opt(), restored_params, restored_state, GRADS[4:])
  for a, b in zip(traj, full_traj[4:]):
    chex.assert_trees_all_equal(a, b)  # bit-identical
  chex.assert_trees_all_equal(end_state, full_state)


def test_pickle_round_trip_resumes_bit_identically():
  _resume_check(pickle.dumps, pickle.loads)


def test_orbax_round_trip_resumes_bit_identically(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")

  def save(tree):
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp_path / "ckpt", tree)
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

  def load(abstract):
    with ocp.StandardCheckpointer() as ckpt:
      return ckpt.restore(tmp_path / "ckpt", abstract)

  _resume_check(save, load)


@pytest.mark.slow
def test_soak_100k_steps_stays_finite():
  opt = rmsprop_jax.rmsprop(1e-2, momentum=0.9, centered=True)
  target = jnp.array([1.0, -2.0, 3.0])

  @jax.jit
  def soak(params, state, key):
    def step(carry, k):
      params, state = carry
      noise = jax.random.normal(k, params.shape) * 0.1
      g = params - target + noise
      u, state = opt.update(g, state, params)
      return (optax.apply_updates(params, u), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), jax.random.split(key, 100_000))
    return params, state

  params = jnp.zeros(3)
  params, state = soak(params, opt.init(params), jax.random.key(0))
  chex.assert_tree_all_finite((params, state))
  np.testing.assert_allclose(params, target, atol=0.1)
  assert int(state.count) == 100_000
