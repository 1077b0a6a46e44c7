"""rmsprop_jax.rmsprop against a float64 NumPy model and against optax."""

import itertools
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
  PARAMS0,
  assert_updates_close,
  count_compilations,
  fixed_grads,
  jax_param_grad,
  run,
)
from reference import ParamGrad, reference_updates

import rmsprop_jax

STEPS = 30

# Each option alone, in a form both we and the reference understand.
OPTIONS = {
  "centered": dict(centered=True),
  "momentum": dict(momentum=0.9),
  "nesterov": dict(momentum=0.8, nesterov=True),
  "eps outside sqrt": dict(eps_in_sqrt=False),
  "bias correction": dict(bias_correction=True),
  "initial scale 1": dict(initial_scale=1.0),
  "coupled weight decay": dict(weight_decay=0.05),
  "decoupled weight decay": dict(weight_decay=0.05, weight_decay_mode="decoupled"),
  "maximize": dict(maximize=True),
  "lr outside momentum": dict(momentum=0.7, lr_inside_momentum=False),
  "decay 0.5": dict(decay=0.5),
}


def _merge(*names):
  out = {}
  for n in names:
    out.update(OPTIONS[n])
  return out


def _compatible(a, b):
  opts = _merge(a, b)
  both_wd = "weight decay" in a and "weight decay" in b
  both_mom = a in ("momentum", "nesterov", "lr outside momentum") and b in (
    "momentum",
    "nesterov",
    "lr outside momentum",
  )
  return not (both_wd or both_mom) and opts


GRID = [(n,) for n in OPTIONS] + [(a, b) for a, b in itertools.combinations(OPTIONS, 2) if _compatible(a, b)]


@pytest.mark.parametrize("names", GRID, ids=lambda n: " and ".join(n))
def test_matches_float64_reference(names):
  opts = dict(lr=0.01, eps=1e-3, **_merge(*names))
  if "centered" in names and "bias correction" in names:
    # The debiased variance at step 1 is exactly zero; float32's rounding of
    # 1 - decay**t then dominates unless eps is large.
    opts["eps"] = 0.1
  grads = fixed_grads(STEPS, seed=len(names))
  expected, _ = reference_updates(PARAMS0, grads, **opts)
  lr = opts.pop("lr")
  actual, _ = run(rmsprop_jax.rmsprop(lr, **opts), grads)
  assert_updates_close(actual, expected, rtol=2e-5, atol=1e-8)


OPTAX_OPTIONS = [
  "centered",
  "momentum",
  "nesterov",
  "eps outside sqrt",
  "bias correction",
  "initial scale 1",
  "decay 0.5",
]
OPTAX_GRID = (
  [()]
  + [(n,) for n in OPTAX_OPTIONS]
  + [(a, b) for a, b in itertools.combinations(OPTAX_OPTIONS, 2) if _compatible(a, b)]
)


@pytest.mark.parametrize("names", OPTAX_GRID, ids=lambda n: " and ".join(n) or "defaults")
def test_matches_optax_rmsprop(names):
  opts = _merge(*names)
  if "centered" in names and "bias correction" in names:
    opts["eps"] = 0.1  # step 1 has a zero variance: keep it well conditioned
  ours, _ = run(rmsprop_jax.rmsprop(0.02, **opts), jax_param_grad, steps=STEPS)
  theirs, _ = run(optax.rmsprop(0.02, **opts), jax_param_grad, steps=STEPS)
  assert_updates_close(ours, theirs, rtol=1e-6, atol=1e-9)
  # And both follow the float64 model (parameter-dependent gradients).
  expected, _ = reference_updates(PARAMS0, ParamGrad(STEPS), lr=0.02, **opts)
  assert_updates_close(ours, expected, rtol=1e-3, atol=2e-5)


def test_default_update_is_bit_identical_to_jitted_optax():
  ours, _ = run(rmsprop_jax.rmsprop(0.01), jax_param_grad, steps=STEPS)
  theirs, _ = run(optax.rmsprop(0.01), jax_param_grad, steps=STEPS)
  for a, b in zip(ours, theirs):
    chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["plain", "with momentum"])
def test_schedule_is_called_with_the_count_before_the_step(momentum):
  sched = optax.exponential_decay(0.05, transition_steps=5, decay_rate=0.5)
  grads = fixed_grads(STEPS, seed=3)
  expected, _ = reference_updates(PARAMS0, grads, lr=lambda t: float(sched(t)), eps=1e-6, momentum=momentum)
  actual, state = run(rmsprop_jax.rmsprop(sched, eps=1e-6, momentum=momentum), grads)
  assert_updates_close(actual, expected, rtol=2e-5, atol=1e-9)
  assert int(state.count) == STEPS
  theirs, _ = run(optax.rmsprop(sched, eps=1e-6, momentum=momentum), grads)
  assert_updates_close(actual, theirs, rtol=1e-6, atol=1e-10)


def test_learning_rate_as_array():
  grads = fixed_grads(5)
  a, _ = run(rmsprop_jax.rmsprop(jnp.asarray(0.03)), grads)
  b, _ = run(rmsprop_jax.rmsprop(0.03), grads)
  assert_updates_close(a, b, rtol=0, atol=0)


def test_chain_with_clipping_and_weight_decay_matches_optax():
  def make(rms):
    return optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-2), rms)

  grads = fixed_grads(STEPS, seed=4, scale=3.0)
  ours, _ = run(make(rmsprop_jax.rmsprop(0.01, momentum=0.9)), grads)
  theirs, _ = run(make(optax.rmsprop(0.01, momentum=0.9)), grads)
  assert_updates_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_multisteps_averages_k_gradients_then_steps():
  k = 3
  grads = fixed_grads(3 * k * 4, seed=5)
  ours, _ = run(optax.MultiSteps(rmsprop_jax.rmsprop(0.01), every_k_schedule=k), grads)
  mean_grads = [
    {n: np.mean([grads[i * k + j][n] for j in range(k)], axis=0) for n in PARAMS0}
    for i in range(len(grads) // k)
  ]
  expected, _ = reference_updates(PARAMS0, mean_grads, lr=0.01)
  for i, e in enumerate(expected):
    for j in range(k - 1):
      chex.assert_trees_all_equal(ours[i * k + j], jax.tree.map(np.zeros_like, e))
  assert_updates_close(ours[k - 1 :: k], expected, rtol=2e-5, atol=1e-9)


def test_inject_hyperparams_matches_and_can_be_changed_mid_run():
  opt = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.01, decay=0.9)
  grads = fixed_grads(20, seed=6)
  params = jax.tree.map(jnp.asarray, PARAMS0)
  state = opt.init(params)
  update = jax.jit(opt.update)
  actual = []
  for t, g in enumerate(grads):
    if t == 10:
      state.hyperparams["learning_rate"] = jnp.asarray(0.002)
    u, state = update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, u)
    actual.append(jax.tree.map(np.asarray, u))
  expected, _ = reference_updates(PARAMS0, grads, lr=lambda t: 0.01 if t < 10 else 0.002)
  assert_updates_close(actual, expected, rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(
    rmsprop_jax.diagnostics.find_state(state).nu["b"],
    optax.tree_utils.tree_get(state, "nu")["b"],
  )


def test_inject_hyperparams_with_every_numeric_option_traced():
  kwargs = dict(decay=0.8, eps=1e-4, momentum=0.9, weight_decay=0.01, initial_scale=0.5)
  injected = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.01, **kwargs)
  grads = fixed_grads(12, seed=9)
  ours, state = run(injected, grads)  # jitted: every hyperparameter is a tracer
  assert set(state.hyperparams) >= {"learning_rate", "decay", "eps", "momentum", "weight_decay"}
  expected, _ = reference_updates(PARAMS0, grads, lr=0.01, **kwargs)
  assert_updates_close(ours, expected, rtol=2e-5, atol=1e-8)


def _train(lr, decay, grads):
  """A jittable run over a fixed gradient array sequence; returns final params."""
  opt = rmsprop_jax.rmsprop(lr, decay=decay)
  params = jnp.asarray(PARAMS0["w"])

  def step(carry, g):
    p, s = carry
    u, s = opt.update(g + 0.1 * p, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), grads)
  return params


def test_vmap_over_lr_and_decay_equals_separate_runs():
  grads = jnp.asarray(np.stack([g["w"] for g in fixed_grads(25, seed=7)]))
  lrs = jnp.array([0.001, 0.01, 0.1])
  decays = jnp.array([0.5, 0.9, 0.99])
  sweep = jax.jit(jax.vmap(jax.vmap(_train, in_axes=(None, 0, None)), in_axes=(0, None, None)))
  grid = sweep(lrs, decays, grads)
  assert grid.shape == (3, 3) + PARAMS0["w"].shape
  single = jax.jit(_train)
  for i, lr in enumerate(lrs):
    for j, d in enumerate(decays):
      np.testing.assert_allclose(grid[i, j], single(lr, d, grads), rtol=1e-6, atol=1e-7)
  # and a Python-float run (the concrete path) agrees too
  np.testing.assert_allclose(grid[1, 1], _train(0.01, 0.9, grads), rtol=1e-6, atol=1e-7)


def _first_updates(lr, decay, params, grads):
  """Un-jitted: one init and two updates of a fresh optimizer."""
  opt = rmsprop_jax.rmsprop(lr, decay=decay, momentum=0.5)
  state = opt.init(params)
  u, state = opt.update(grads, state, params)
  u, state = opt.update(grads, state, params)
  return u


def test_unjitted_vmap_runs_one_compiled_program_and_matches_numpy():
  params = {"w": jnp.asarray(PARAMS0["w"])}
  grads = {"w": jnp.asarray(fixed_grads(1, seed=3)[0]["w"])}
  lrs, decays = jnp.array([0.01, 0.1, 0.3]), jnp.array([0.9, 0.5, 0.99])
  sweep = jax.vmap(_first_updates, in_axes=(0, 0, None, None))
  sweep(lrs * 2, decays, params, grads)  # compiles the batched update once
  with count_compilations() as compiled:
    batched = sweep(lrs, decays, params, grads)  # new values: no new program
  assert compiled == []
  for i, (lr, d) in enumerate(zip(lrs.tolist(), decays.tolist())):
    expected, _ = reference_updates(
      {"w": PARAMS0["w"]}, [fixed_grads(1, seed=3)[0]] * 2, lr=lr, decay=d, momentum=0.5
    )
    np.testing.assert_allclose(batched["w"][i], expected[-1]["w"], rtol=2e-5, atol=1e-8)


def _primitives(jaxpr) -> list[str]:
  return [e.primitive.name for e in jaxpr.eqns]


def test_inside_jit_the_update_is_inlined_into_the_callers_program():
  params = {"w": jnp.asarray(PARAMS0["w"])}
  grads = {"w": jnp.asarray(fixed_grads(1, seed=3)[0]["w"])}
  jaxpr = jax.make_jaxpr(_first_updates)(0.1, 0.9, params, grads)
  # Two updates, each one rsqrt, both in the caller's own program: no nested
  # program holds the update (jnp's own small helpers, like where, may).
  assert _primitives(jaxpr).count("rsqrt") == 2
  nested = [e.params["jaxpr"] for e in jaxpr.eqns if e.primitive.name in ("jit", "pjit")]
  assert all("rsqrt" not in _primitives(j) for j in nested)


def test_grad_through_an_unjitted_update_wrt_learning_rate():
  # d/d lr of sum(update) = sum(update) / lr for the plain variant.
  params = jnp.asarray(PARAMS0["w"])
  g = jnp.asarray(fixed_grads(1, seed=4)[0]["w"])

  def total(lr):
    opt = rmsprop_jax.rmsprop(lr)
    u, _ = opt.update(g, opt.init(params), params)
    return jnp.sum(u)

  np.testing.assert_allclose(jax.grad(total)(0.2), total(0.2) / 0.2, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(total)(0.2), jax.jit(jax.grad(total))(0.2), rtol=1e-6)


@pytest.mark.parametrize(
  "opts", [{}, dict(centered=True, momentum=0.9)], ids=["plain", "centered with momentum"]
)
def test_jit_equals_no_jit(opts):
  grads = fixed_grads(10, seed=8)
  a, sa = run(rmsprop_jax.rmsprop(0.01, **opts), grads, jit=True)
  b, sb = run(rmsprop_jax.rmsprop(0.01, **opts), grads, jit=False)
  # One compiled program either way, but XLA may fuse constants (jit) and
  # arguments (eager) differently: a few float32 ulps per step at most.
  rtol = 4 * np.finfo(np.float32).eps * len(grads)
  assert_updates_close(a, b, rtol=rtol, atol=0)
  chex.assert_trees_all_close(sa, sb, rtol=rtol)


def test_jitted_step_does_not_retrace():
  opt = rmsprop_jax.rmsprop(0.01, momentum=0.9)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, g):
    u, state = opt.update(g, state, params)
    return optax.apply_updates(params, u), state

  params = jax.tree.map(jnp.asarray, PARAMS0)
  state = opt.init(params)
  for g in fixed_grads(5):
    params, state = step(params, state, jax.tree.map(jnp.asarray, g))
  chex.clear_trace_counter()


def test_eager_updates_share_one_compiled_program():
  opt = rmsprop_jax.rmsprop(0.01)
  params = jax.tree.map(jnp.asarray, PARAMS0)
  state = opt.init(params)
  g = jax.tree.map(jnp.asarray, fixed_grads(1)[0])
  opt.update(g, state, params)
  # A second optimizer with other numbers reuses the same compiled update:
  # hyperparameters are arguments of one cached XLA program, not constants.
  with count_compilations() as compiled:
    other = rmsprop_jax.rmsprop(0.5, decay=0.7, eps=1e-6)
    for _ in range(3):
      _, state = other.update(g, state, params)
  assert compiled == []


@pytest.mark.parametrize(
  "make",
  [
    lambda: dict(learning_rate=optax.cosine_decay_schedule(1e-2, 100)),
    lambda: dict(learning_rate=1e-2, decay=optax.linear_schedule(0.5, 0.99, 50)),
    lambda: dict(
      learning_rate=optax.exponential_decay(1e-2, 10, 0.5),
      momentum=0.9,
      decay=optax.linear_schedule(0.8, 0.95, 20),
    ),
  ],
  ids=["lr schedule", "decay schedule", "both, with momentum"],
)
def test_a_new_schedule_object_reuses_the_compiled_update(make):
  params = jax.tree.map(jnp.asarray, PARAMS0)
  g = jax.tree.map(jnp.asarray, fixed_grads(1)[0])
  opt = rmsprop_jax.rmsprop(**make())
  state = opt.init(params)
  for _ in range(2):
    _, state = opt.update(g, state, params)
  with count_compilations() as compiled:
    again = rmsprop_jax.rmsprop(**make())  # new schedule objects, same kind
    state2 = again.init(params)
    for _ in range(2):
      _, state2 = again.update(g, state2, params)
  assert compiled == []


def test_state_is_a_pickleable_namedtuple():
  opt = rmsprop_jax.rmsprop(0.01, centered=True, momentum=0.9)
  grads = fixed_grads(6)
  _, state = run(opt, grads[:3])
  assert isinstance(state, rmsprop_jax.RMSPropState)
  assert state._fields == ("count", "nu", "mu", "trace")
  restored = pickle.loads(pickle.dumps(state))
  chex.assert_trees_all_equal(state, restored)
  # Continuing from the restored state gives the same next update.
  params = jax.tree.map(jnp.asarray, PARAMS0)
  g = jax.tree.map(jnp.asarray, grads[3])
  chex.assert_trees_all_equal(opt.update(g, state, params), opt.update(g, restored, params))


def test_state_fields_for_the_plain_variant():
  state = rmsprop_jax.rmsprop(0.1).init(jax.tree.map(jnp.asarray, PARAMS0))
  assert state.mu is None and state.trace is None
  assert state.count.dtype == jnp.int32
  chex.assert_trees_all_equal(state.nu, jax.tree.map(np.zeros_like, PARAMS0))


def test_inputs_are_not_mutated():
  params = jax.tree.map(np.copy, PARAMS0)
  grads = fixed_grads(1)[0]
  before_p, before_g = jax.tree.map(np.copy, params), jax.tree.map(np.copy, grads)
  opt = rmsprop_jax.rmsprop(0.1, weight_decay=0.1)
  state = opt.init(params)
  nu_before = jax.tree.map(np.asarray, state.nu)
  opt.update(grads, state, params)
  chex.assert_trees_all_equal(params, before_p)
  chex.assert_trees_all_equal(grads, before_g)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.nu), nu_before)
