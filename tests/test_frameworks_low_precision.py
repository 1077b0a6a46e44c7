"""Low-precision state where users train: Flax NNX, Equinox, optax.MultiSteps, inject_hyperparams.

Each framework's run is checked against the same optimizer stepped on a plain dict of arrays
under ``jax.jit`` (the path the rest of the suite checks against float64 references), with the
same gradients; the diagnostics read the framework's state as they read the plain one.
"""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rmsprop_jax
from rmsprop_jax.diagnostics import find_state

STEPS = 6
X = jax.random.normal(jax.random.key(0), (64, 4))
Y = jnp.sum(X**2, axis=1, keepdims=True)
STORAGES = {
  "8-bit centered+momentum": dict(state_bits=8, min_quantize_size=64, centered=True, momentum=0.9),
  "8-bit": dict(state_bits=8, min_quantize_size=64),
  "bfloat16 momentum": dict(nu_dtype=jnp.bfloat16, momentum=0.9),
}


def leaves(tree):
  """The arrays of a tree, NNX variables unwrapped (their value may be a {codes, scale} State)."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  value = lambda x: x.get_value() if hasattr(x, "get_value") else x.value
  out = []
  for x in jax.tree.leaves(tree, is_leaf=is_var):
    out += [np.asarray(a) for a in jax.tree.leaves(value(x) if is_var(x) else x)]
  return out


def assert_same_leaves(ours, ref, **tol):
  a, b = leaves(ours), leaves(ref)
  assert [x.shape for x in a] == [x.shape for x in b]
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, **tol)


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 64, rngs=rngs)
    self.out = nnx.Linear(64, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


@nnx.jit
def nnx_step(model, optimizer):
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - Y) ** 2))(model)
  optimizer.update(model, grads)
  return loss


def plain_run(tx, params, loss, steps=STEPS):
  """``tx`` on a plain pytree under jax.jit: the reference."""

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.slow  # nnx traces the model and the optimizer per storage: slow, run by CI
@pytest.mark.parametrize("storage", list(STORAGES))
def test_flax_nnx_optimizer_with_low_precision_state(storage):
  tx = rmsprop_jax.rmsprop(1e-2, **STORAGES[storage])
  graphdef, rest = nnx.split(MLP(nnx.Rngs(0)))
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for _ in range(STEPS):
    nnx_step(model, optimizer)

  def loss(p):
    state = nnx.State(rest.to_pure_dict())
    nnx.replace_by_pure_dict(state, p)
    return jnp.mean((nnx.merge(graphdef, state)(X) - Y) ** 2)

  ref_params, ref_state = plain_run(tx, rest.to_pure_dict(), loss)
  # the same numbers: same program per leaf, same random streams
  assert_same_leaves(nnx.state(model, nnx.Param), ref_params, rtol=1e-6, atol=1e-7)
  ours = find_state(optimizer.opt_state)
  assert leaves(ours.count) == [STEPS]
  assert_same_leaves(rmsprop_jax.dequantize_state(ours), rmsprop_jax.dequantize_state(ref_state), rtol=1e-6)
  eff = rmsprop_jax.effective_learning_rate(optimizer.opt_state, tx)
  assert_same_leaves(eff, rmsprop_jax.effective_learning_rate(ref_state, tx), rtol=1e-6)
  if "8-bit" in storage:  # every leaf of >= 64 entries is stored as codes, the (1,) bias is not
    codes = {x.shape for x in leaves(ours.nu) if x.dtype == np.uint8}
    assert codes == {(64,), (4, 64), (64, 1)}


@pytest.mark.parametrize("storage", list(STORAGES))
def test_equinox_filter_jit_with_low_precision_state(storage):
  tx = rmsprop_jax.rmsprop(1e-2, **STORAGES[storage])
  model = eqx.nn.MLP(4, 1, width_size=64, depth=1, key=jax.random.key(0))
  loss_fn = lambda m: jnp.mean((jax.vmap(m)(X) - Y) ** 2)

  @eqx.filter_jit
  def step(model, opt_state):
    grads = eqx.filter_grad(loss_fn)(model)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state

  opt_state = tx.init(eqx.filter(model, eqx.is_array))
  for _ in range(STEPS):
    model, opt_state = step(model, opt_state)
  params, static = eqx.partition(
    eqx.nn.MLP(4, 1, width_size=64, depth=1, key=jax.random.key(0)), eqx.is_array
  )
  ref_params, ref_state = plain_run(tx, params, lambda p: loss_fn(eqx.combine(p, static)))
  chex.assert_trees_all_close(eqx.filter(model, eqx.is_array), ref_params, rtol=1e-6, atol=1e-7)
  assert_same_leaves(
    rmsprop_jax.dequantize_state(opt_state), rmsprop_jax.dequantize_state(ref_state), rtol=1e-6
  )


def _quadratic_params():
  return {"w": jnp.linspace(-1.0, 1.0, 512).reshape(8, 64), "b": jnp.ones(3)}


def _loss(p):
  return jnp.sum(jnp.sin(3 * p["w"]) * p["w"]) + jnp.sum(p["b"] ** 2)


@pytest.mark.parametrize("storage", list(STORAGES))
def test_multisteps_with_low_precision_state(storage):
  # MultiSteps(k=2) on a deterministic gradient takes STEPS / 2 steps of the inner optimizer on
  # the average of two equal gradients: the inner optimizer's own run.
  inner = rmsprop_jax.rmsprop(1e-2, **STORAGES[storage])
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  params, state = _quadratic_params(), tx.init(_quadratic_params())
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p))
  for _ in range(STEPS):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  ref_params, ref_state = plain_run(inner, _quadratic_params(), _loss, steps=STEPS // 2)
  chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=1e-7)
  deq = rmsprop_jax.dequantize_state
  assert_same_leaves(deq(state.inner_opt_state), deq(ref_state), rtol=1e-6)
  eff = rmsprop_jax.effective_learning_rate
  assert_same_leaves(eff(state, tx), eff(ref_state, inner), rtol=1e-6)


@pytest.mark.parametrize("storage", list(STORAGES))
def test_inject_hyperparams_with_low_precision_state(storage):
  # The storage options choose the compiled program: static under inject_hyperparams.
  kw = STORAGES[storage]
  static = tuple(k for k in kw if k != "momentum")
  tx = optax.inject_hyperparams(rmsprop_jax.rmsprop, static_args=static)(learning_rate=1e-2, **kw)
  params, ref_params = _quadratic_params(), _quadratic_params()
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p))
  for _ in range(STEPS):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  assert type(find_state(state).nu["w"]).__name__ == ("QuantizedArray" if "8-bit" in storage else "ArrayImpl")
  # Injected numbers are float32 arrays, not Python floats (1 - decay is formed in float32): the
  # run agrees with the direct optimizer's to the rounding of the stored state, a code step
  # (1/127 of a block's largest nu, 2**-8 for bfloat16) through lr / sqrt(nu).
  direct = rmsprop_jax.rmsprop(1e-2, **kw)
  ref_params, ref_state = plain_run(direct, ref_params, _loss)
  chex.assert_trees_all_close(params, ref_params, rtol=0, atol=STEPS * 1e-2 * 2.0**-7)
  eff = rmsprop_jax.effective_learning_rate(state, tx)
  assert_same_leaves(eff, rmsprop_jax.effective_learning_rate(ref_state, direct), rtol=2.0**-6)
