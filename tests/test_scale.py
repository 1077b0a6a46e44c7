"""Sharded state, data-parallel steps on 8 host devices, and two processes."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_two_processes
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax

needs_8 = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 host CPUs)"
)


def _sharded_params(mesh):
  return {
    "w": jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("a", "b"))),
    "b": jax.device_put(jnp.ones(8), NamedSharding(mesh, P("a"))),
    "s": jax.device_put(jnp.ones(()), NamedSharding(mesh, P())),
  }


def _assert_state_sharded_like(state, params):
  for field in ("nu", "mu", "trace"):
    tree = getattr(state, field)
    for (path, leaf), p in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(params)):
      assert leaf.sharding.is_equivalent_to(p.sharding, p.ndim), (field, path, leaf.sharding)


@needs_8
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_init_and_update_keep_every_state_leaf_sharded_like_its_param(axis_type):
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(axis_type, axis_type))
  with jax.set_mesh(mesh):
    params = _sharded_params(mesh)
    opt = rmsprop_jax.rmsprop(0.1, momentum=0.9, centered=True, nu_dtype=jnp.bfloat16)
    for state in (opt.init(params), jax.jit(opt.init)(params)):
      _assert_state_sharded_like(state, params)
    _, eager_state = opt.update(params, state, params)  # the cached compiled update
    _assert_state_sharded_like(eager_state, params)
    updates, state = jax.jit(opt.update)(params, state, params)
    _assert_state_sharded_like(state, params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.sharding.is_equivalent_to(p.sharding, p.ndim)


@needs_8
def test_optax_jitted_init_is_the_hazard_we_fix():
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
  params = _sharded_params(mesh)
  theirs = jax.jit(optax.rmsprop(0.1).init)(params)[0].nu["w"]
  ours = jax.jit(rmsprop_jax.rmsprop(0.1).init)(params).nu["w"]
  assert len(theirs.sharding.device_set) == 1
  assert len(ours.sharding.device_set) == 8


def _linear_problem(n=64, d=6):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x @ rng.normal(size=(d,)) - 1.0).astype(np.float32)
  return x, y


def _train(x, y, params, steps=25):
  opt = rmsprop_jax.rmsprop(0.03, momentum=0.9)
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state, x, y)
  return params, state


@needs_8
def test_data_parallel_step_on_8_devices_equals_single_device():
  x, y = _linear_problem()
  params = {"w": jnp.zeros(6), "b": jnp.zeros(())}
  single, _ = _train(jnp.asarray(x), jnp.asarray(y), params)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  rep = jax.device_put(params, NamedSharding(mesh, P()))
  dp, state = _train(xs, ys, rep)
  assert len(state.nu["w"].sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_train_data_parallel_and_agree_with_one(tmp_path):
  worker = Path(__file__).with_name("multiprocess_worker.py")
  r0, r1 = run_two_processes(worker, tmp_path)
  for k in r0:
    np.testing.assert_array_equal(r0[k], r1[k])

  sys.path.insert(0, str(worker.parent))
  from multiprocess_worker import STEPS, problem

  x, y = problem()
  opt = rmsprop_jax.rmsprop(0.05, momentum=0.9, centered=True)
  params = {"w": jnp.zeros(5), "b": jnp.zeros(())}
  state = opt.init(params)
  for _ in range(STEPS):
    grads = jax.grad(lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(params)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for k in r0:
    np.testing.assert_allclose(r0[k], params[k], rtol=1e-5, atol=1e-6)


# optax's own sharding tests (optax/_src/sharding_test.py), run on ours.
OURS = {
  "plain": lambda: rmsprop_jax.rmsprop(1.0),
  "centered momentum": lambda: rmsprop_jax.rmsprop(1.0, centered=True, momentum=0.9),
  "bfloat16 nu": lambda: rmsprop_jax.rmsprop(1.0, nu_dtype=jnp.bfloat16),
  "torch": lambda: rmsprop_jax.presets.pytorch(1.0, momentum=0.5, weight_decay=0.1),
  "keras": lambda: rmsprop_jax.presets.keras(1.0, weight_decay=0.1),
}


@pytest.mark.parametrize("make", OURS.values(), ids=OURS.keys())
def test_optax_init_with_abstract_input(make):
  params = jax.ShapeDtypeStruct(shape=(2, 4, 8), dtype=jnp.float32)
  state = make().init(params)
  assert state is not None
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


@needs_8
@pytest.mark.parametrize("make", OURS.values(), ids=OURS.keys())
def test_optax_state_sharding_type_init_match_update_and_jit(make):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  sharding = NamedSharding(mesh, P(None, "x"))
  optimizer = make()
  with jax.set_mesh(mesh):
    params = jnp.zeros((2, 8, 4), dtype=jnp.float16, out_sharding=sharding)
    state0 = optimizer.init(params)
    _, state1 = optimizer.update(params, state0, params)
    types = lambda t: (jax.tree.structure(t), [jax.typeof(x) for x in jax.tree.leaves(t)])
    assert types(state0) == types(state1)
    assert types(state0) == types(jax.jit(optimizer.init)(params))
    _, state3 = jax.jit(optimizer.update)(params, state0, params)
    assert types(state1) == types(state3)


@needs_8
def test_abstract_init_places_state_with_the_given_sharding():
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
  params = {
    "w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("a", "b"))),
    "b": jax.ShapeDtypeStruct((8,), jnp.float32),
  }
  state = rmsprop_jax.rmsprop(0.1, momentum=0.9).init(params)
  for tree in (state.nu, state.trace):
    assert tree["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
    assert len(tree["w"].addressable_shards) == 8 and tree["w"].addressable_shards[0].data.shape == (2, 2)
    np.testing.assert_array_equal(tree["w"], np.zeros((8, 4)))
  assert state.nu["b"].shape == (8,)
