"""scale_by_rms, dtypes, complex parameters and the fused kernel's shape."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import PARAMS0, assert_updates_close, fixed_grads, run
from reference import reference_updates

import rmsprop_jax
from rmsprop_jax import scale_by_rms
from rmsprop_jax.xla_stats import compile_donated_step, loop_kernels, xla_bytes_accessed


@pytest.mark.parametrize(
  "opts",
  [{}, dict(centered=True), dict(eps_in_sqrt=False), dict(bias_correction=True), dict(initial_scale=1.0)],
  ids=["plain", "centered", "eps outside sqrt", "bias corrected", "initial scale 1"],
)
def test_scale_by_rms_is_rmsprop_with_unit_learning_rate(opts):
  grads = fixed_grads(12, seed=11)
  expected, _ = reference_updates(PARAMS0, grads, lr=-1.0, eps=1e-4, **opts)
  actual, state = run(scale_by_rms(eps=1e-4, **opts), grads)
  assert_updates_close(actual, expected, rtol=2e-5, atol=1e-8)
  assert state.trace is None
  assert (state.mu is not None) == opts.get("centered", False)


@pytest.mark.parametrize("centered", [False, True], ids=["scale_by_rms", "scale_by_stddev"])
def test_scale_by_rms_matches_optax(centered):
  grads = fixed_grads(12, seed=12)
  ours, _ = run(scale_by_rms(centered=centered), grads)
  make = optax.scale_by_stddev if centered else optax.scale_by_rms
  theirs, _ = run(make(), grads)
  assert_updates_close(ours, theirs, rtol=1e-6, atol=0)


# Bias-corrected forms next to optax's. The centered one starts from nu = 1: from 0, the debiased
# variance at step 1 is exactly 0 and float32 noise (which we clamp at 0 and optax does not)
# decides the step.
BIAS_CORRECTED = {  # options of both, ours only, optax's transformation
  "eps inside the root": (dict(), dict(), optax.scale_by_rms),
  "eps outside the root": (dict(eps_in_sqrt=False), dict(), optax.scale_by_rms),
  "centered": (dict(initial_scale=1.0), dict(centered=True), optax.scale_by_stddev),
}
# Eagerly optax rounds each operation by itself, while our update is one compiled program that
# may fuse a product and a sum into one rounding: of the EMA's products and sum, the debiasing
# division, the eps sum, the root and the product, a few round differently, each by at most
# 2**-24 relative. 16 of them: the 1 - decay**t formed eagerly instead (binary exponentiation)
# was 2e-5 relative off at decay 0.999, about 340 of them.
F32_ROUNDINGS = 16 * 2.0**-24


@pytest.mark.parametrize("jit", [True, False], ids=["jitted", "eager"])
@pytest.mark.parametrize("decay", [0.9, 0.99, 0.999])
@pytest.mark.parametrize("variant", list(BIAS_CORRECTED))
def test_bias_correction_matches_optax_to_float32_rounding(variant, decay, jit):
  opts, ours_only, make = BIAS_CORRECTED[variant]
  grads = fixed_grads(30, seed=21)
  ours, s_ours = run(scale_by_rms(decay, bias_correction=True, **opts, **ours_only), grads, jit=jit)
  theirs, s_theirs = run(make(decay, bias_correction=True, **opts), grads, jit=jit)
  assert_updates_close(ours, theirs, rtol=F32_ROUNDINGS, atol=0)
  assert int(s_ours.count) == int(s_theirs.count) == 30


def test_bfloat16_params_give_bfloat16_updates_computed_in_float32():
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), PARAMS0)
  opt = rmsprop_jax.rmsprop(0.01, momentum=0.9, centered=True)
  state = opt.init(params)
  assert state.nu["w"].dtype == jnp.bfloat16
  assert state.trace["w"].dtype == jnp.bfloat16
  grads = fixed_grads(5, seed=13)
  expected, _ = reference_updates(
    jax.tree.map(np.asarray, params), grads, lr=0.01, momentum=0.9, centered=True
  )
  for t, g in enumerate(grads):
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g)
    u, state = opt.update(g, state, params)
    assert u["w"].dtype == jnp.bfloat16
    if t == 0:  # one step: only bf16 rounding of inputs and output
      np.testing.assert_allclose(np.asarray(u["w"], np.float64), expected[0]["w"], rtol=2e-2)


def test_bfloat16_second_moment_halves_state_and_tracks_float32():
  grads = fixed_grads(30, seed=14)
  f32, s32 = run(rmsprop_jax.rmsprop(0.01), grads)
  b16, s16 = run(rmsprop_jax.rmsprop(0.01, nu_dtype=jnp.bfloat16), grads)
  assert s16.nu["w"].dtype == jnp.bfloat16
  nbytes = lambda s: sum(x.nbytes for x in jax.tree.leaves(s.nu))
  assert nbytes(s16) * 2 == nbytes(s32)
  assert_updates_close(b16, f32, rtol=1e-2, atol=1e-6)


def test_bfloat16_second_moment_rounded_to_nearest_is_stored_and_each_step_is_exact():
  # The stored nu is rounded to bfloat16; each step divides by the exact new nu
  # (the stored one updated with this gradient in float32).
  ml_dtypes = pytest.importorskip("ml_dtypes")
  to_bf16 = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float64)
  grads = fixed_grads(20, seed=15)
  expected, _ = reference_updates(PARAMS0, grads, lr=0.01, eps=1e-6, nu_round=to_bf16)
  unrounded, _ = reference_updates(PARAMS0, grads, lr=0.01, eps=1e-6)
  opt = rmsprop_jax.rmsprop(0.01, eps=1e-6, nu_dtype=jnp.bfloat16, rounding="nearest")
  actual, state = run(opt, grads)
  assert_updates_close(actual, expected, rtol=20 * 2.0**-24, atol=1e-12)  # float32 rounding
  err = lambda ref: max(np.abs(a[k] - e[k]).max() for a, e in zip(actual, ref) for k in e)
  assert err(expected) < err(unrounded) / 4


def test_bfloat16_second_moment_update_dtype_is_float32():
  params = jax.tree.map(jnp.asarray, PARAMS0)
  opt = rmsprop_jax.rmsprop(0.01, nu_dtype="bfloat16")
  u, s = opt.update(jax.tree.map(jnp.asarray, fixed_grads(1)[0]), opt.init(params), params)
  assert u["w"].dtype == jnp.float32 and s.nu["w"].dtype == jnp.bfloat16


def test_complex_params_use_abs_squared_like_optax():
  rng = np.random.default_rng(0)
  params = jnp.asarray(rng.normal(size=(4,)) + 1j * rng.normal(size=(4,)), jnp.complex64)
  grads = [jnp.asarray(rng.normal(size=(4,)) + 1j * rng.normal(size=(4,)), jnp.complex64) for _ in range(10)]
  for opts in ({}, dict(centered=True, momentum=0.9)):
    ours, theirs = rmsprop_jax.rmsprop(0.01, **opts), optax.rmsprop(0.01, **opts)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    assert s_ours.nu.dtype == jnp.float32  # real: |g|^2 needs no imaginary part
    for g in grads:
      u1, s_ours = ours.update(g, s_ours, params)
      u2, s_theirs = jax.jit(theirs.update)(g, s_theirs, params)
      assert u1.dtype == jnp.complex64
      np.testing.assert_allclose(u1, u2, rtol=1e-5, atol=1e-7)
    # numpy: |g|^2 EMA
    nu = np.zeros(4)
    for g in grads:
      nu = 0.9 * nu + 0.1 * np.abs(np.asarray(g, np.complex128)) ** 2
    np.testing.assert_allclose(s_ours.nu, nu, rtol=1e-5)


@pytest.mark.xla_current  # what XLA fuses and how many bytes it moves: the current releases
@pytest.mark.parametrize(
  "opts", [{}, dict(momentum=0.9, centered=True)], ids=["plain", "centered with momentum"]
)
def test_jitted_update_fuses_into_no_more_kernels_than_optax(opts):
  # Every per-leaf step (moments, preconditioner, lr, momentum) fuses into
  # loops over each leaf; XLA:CPU emits one loop per stored output (it has no
  # multi-output loop fusion), XLA:GPU one kernel per leaf. Never more than
  # optax's chain, and the count is per leaf, not per step of the chain.
  n = 6
  params = {f"p{i}": jnp.ones((64, 32)) * (i + 1) for i in range(n)}
  ours = loop_kernels(compile_donated_step(rmsprop_jax.rmsprop(0.01, **opts), params))
  theirs = loop_kernels(compile_donated_step(optax.rmsprop(0.01, **opts), params))
  assert len(ours) <= len(theirs), "\n".join(ours)
  outputs_per_leaf = 2 + len(opts)  # params and nu, plus mu and trace
  assert len(ours) <= n * outputs_per_leaf, "\n".join(ours)


@pytest.mark.xla_current  # what XLA fuses and how many bytes it moves: the current releases
@pytest.mark.parametrize(
  "opts",
  [{}, dict(momentum=0.9, centered=True), dict(eps_in_sqrt=False, nesterov=True, momentum=0.5)],
  ids=["plain", "centered with momentum", "eps outside, nesterov"],
)
def test_jitted_step_moves_no_more_bytes_than_optax(opts):
  # The step is memory-bound: XLA's (deterministic) count of the bytes it
  # reads and writes is what its time follows.
  params = {f"p{i}": jnp.ones((128, 64)) * (i + 1) for i in range(4)}
  n = 4 * 128 * 64
  ours = xla_bytes_accessed(compile_donated_step(rmsprop_jax.rmsprop(0.01, **opts), params)) / n
  theirs = xla_bytes_accessed(compile_donated_step(optax.rmsprop(0.01, **opts), params)) / n
  assert ours <= theirs + 0.01, (ours, theirs)


@pytest.mark.xla_current  # what XLA fuses and how many bytes it moves: the current releases
def test_bfloat16_second_moment_moves_fewer_bytes_than_optax():
  # float32 params: optax reads and writes a float32 nu, ours a bfloat16 one:
  # 2 bytes saved per access of nu stored narrow. Recent XLA:CPU saves 6 (22
  # against 28 bytes); how it fuses the loops varies between releases (jax
  # 0.7.1's keeps nu's reads at float32: 26 against 28), so the bound here is
  # the narrow write, which every release saves.
  params = {f"p{i}": jnp.ones((128, 64)) for i in range(4)}
  n = 4 * 128 * 64
  ours = (
    xla_bytes_accessed(compile_donated_step(rmsprop_jax.rmsprop(0.01, nu_dtype=jnp.bfloat16), params)) / n
  )
  theirs = xla_bytes_accessed(compile_donated_step(optax.rmsprop(0.01), params)) / n
  assert ours <= theirs - 2 + 0.01, (ours, theirs)


def test_init_keeps_input_layout_and_does_not_read_values():
  params = {"w": jnp.array([jnp.nan, jnp.inf, 1.0])}
  state = rmsprop_jax.rmsprop(0.1, initial_scale=0.5, momentum=0.9).init(params)
  chex.assert_trees_all_equal(state.nu, {"w": jnp.full(3, 0.5)})
  chex.assert_trees_all_equal(state.trace, {"w": jnp.zeros(3)})


# --- decay schedules -------------------------------------------------------

RISING = optax.linear_schedule(0.5, 0.99, transition_steps=20)


def _sched64(t):
  return float(RISING(t))


@pytest.mark.parametrize(
  "opts",
  [{}, dict(centered=True, momentum=0.9), dict(eps_in_sqrt=False, initial_scale=1.0)],
  ids=["plain", "centered with momentum", "eps outside, initial scale 1"],
)
def test_decay_schedule_matches_the_float64_model(opts):
  grads = fixed_grads(25, seed=21)
  expected, _ = reference_updates(PARAMS0, grads, lr=0.01, decay=_sched64, eps=1e-6, **opts)
  actual, state = run(rmsprop_jax.rmsprop(0.01, decay=RISING, eps=1e-6, **opts), grads)
  # atol: momentum sums terms of size lr that can cancel.
  assert_updates_close(actual, expected, rtol=2e-5, atol=2e-7)
  scaled, _ = run(scale_by_rms(decay=RISING, eps=1e-6), grads)
  unit, _ = reference_updates(PARAMS0, grads, lr=-1.0, decay=_sched64, eps=1e-6)
  assert_updates_close(scaled, unit, rtol=2e-5, atol=1e-8)


@pytest.mark.parametrize(
  "make, model",
  [
    (
      lambda: rmsprop_jax.presets.pytorch(lr=0.01, alpha=RISING, momentum=0.5),
      dict(eps_in_sqrt=False, momentum=0.5, lr_inside_momentum=False),
    ),
    (lambda: rmsprop_jax.presets.keras(learning_rate=0.01, rho=RISING, epsilon=1e-6), dict(eps=1e-6)),
    (lambda: rmsprop_jax.presets.tf1(0.01, decay=RISING, epsilon=1e-6), dict(eps=1e-6, initial_scale=1.0)),
  ],
  ids=["torch alpha", "keras rho", "tf1 decay"],
)
def test_presets_take_a_decay_schedule_under_their_own_name(make, model):
  grads = fixed_grads(25, seed=22)
  expected, _ = reference_updates(PARAMS0, grads, lr=0.01, decay=_sched64, **model)
  actual, _ = run(make(), grads)
  assert_updates_close(actual, expected, rtol=2e-5, atol=1e-9)


# --- abstract init -----------------------------------------------------------


def test_init_of_shape_dtype_structs_gives_concrete_arrays_like_optax():
  params = {"w": jax.ShapeDtypeStruct((2, 4, 8), jnp.float32), "b": jax.ShapeDtypeStruct((8,), jnp.bfloat16)}
  opt = rmsprop_jax.rmsprop(0.1, momentum=0.9, centered=True, initial_scale=0.5)
  state = opt.init(params)
  theirs = optax.rmsprop(0.1, momentum=0.9, centered=True, initial_scale=0.5).init(params)
  for ours, ref in ((state.nu, theirs[0].nu), (state.mu, theirs[0].mu), (state.trace, theirs[2].trace)):
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, ref)
    chex.assert_trees_all_equal(ours, jax.tree.map(np.asarray, ref))
  assert isinstance(state.nu["w"], jax.Array) and float(state.nu["w"][0, 0, 0]) == 0.5


def test_eval_shape_of_init_and_update():
  params = {"w": jax.ShapeDtypeStruct((3, 5), jnp.float32)}
  opt = rmsprop_jax.rmsprop(optax.constant_schedule(0.1), decay=RISING, momentum=0.9)
  abstract = jax.eval_shape(opt.init, params)
  assert abstract.nu["w"].shape == (3, 5) and abstract.trace["w"].dtype == jnp.float32
  updates, new = jax.eval_shape(opt.update, params, abstract, params)
  assert updates["w"].shape == (3, 5) and new.count.dtype == jnp.int32


# --- effective learning rate -------------------------------------------------


@pytest.mark.parametrize(
  "make",
  [
    lambda: rmsprop_jax.rmsprop(0.01),
    lambda: rmsprop_jax.rmsprop(0.01, eps=0.0, centered=True),
    lambda: rmsprop_jax.rmsprop(0.01, eps=1e-3, eps_in_sqrt=False, bias_correction=True),
    lambda: rmsprop_jax.rmsprop(optax.exponential_decay(0.05, 2, 0.5), decay=RISING),
    lambda: rmsprop_jax.rmsprop(0.01, nu_dtype=jnp.bfloat16, eps=1e-4),
    lambda: rmsprop_jax.presets.pytorch(lr=0.01, alpha=0.9, eps=1e-3),
    lambda: rmsprop_jax.presets.keras(learning_rate=0.01, epsilon=1e-3, centered=True),
    lambda: rmsprop_jax.presets.keras(learning_rate=0.01, clipvalue=10.0),
    lambda: rmsprop_jax.presets.tf1(0.01),
    lambda: rmsprop_jax.presets.optax(0.01, 0.9, 1e-8, bias_correction=True),
  ],
  ids=[
    "plain",
    "eps 0 centered",
    "eps outside, bias corrected",
    "lr and decay schedules",
    "bfloat16 nu",
    "torch",
    "keras centered",
    "keras with clipping",
    "tf1",
    "optax",
  ],
)
def test_effective_learning_rate_from_the_optimizer_is_minus_update_over_grad(make):
  # It is read from the stored state; each step divides by the exact new nu. For nu
  # stored in bfloat16 the two differ by nu's rounding: under one ulp (2**-7 relative,
  # stochastic rounding), so 2**-8 in 1 / sqrt(nu).
  opt = make()
  stored_nu = jax.tree.leaves(opt.init(jax.tree.map(jnp.asarray, PARAMS0)))[1].dtype
  rtol = 4e-7 + (2.0**-8 if stored_nu == jnp.bfloat16 else 0)
  grads = fixed_grads(4, seed=23)
  params = jax.tree.map(jnp.asarray, PARAMS0)
  state = opt.init(params)
  for g in grads:
    u, state = opt.update(jax.tree.map(jnp.asarray, g), state, params)
  eff = rmsprop_jax.effective_learning_rate(state, opt)
  for k in g:
    np.testing.assert_allclose(eff[k], -np.asarray(u[k]) / g[k], rtol=rtol, atol=0, err_msg=k)


def test_effective_learning_rate_refuses_eps_beside_an_optimizer_and_foreign_optimizers():
  opt = rmsprop_jax.rmsprop(0.1)
  state = opt.init(jnp.zeros(2))
  with pytest.raises(TypeError, match="takes eps and eps_in_sqrt from opt"):
    rmsprop_jax.effective_learning_rate(state, opt, eps=1e-3)
  with pytest.raises(TypeError, match="opt.init reaches no rmsprop_jax transformation"):
    rmsprop_jax.effective_learning_rate(state, optax.rmsprop(0.1))


# --- dtypes against the float64 model -----------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "complex64"])
def test_each_dtype_against_the_float64_model(dtype):
  # Inputs are rounded to ``dtype`` first, so the model sees what we see; then
  # per step: nu stored in the param's (real) dtype (<= 1/2 ulp, not compounding
  # through the EMA), the update rounded to ``dtype`` (1/2 ulp): 3 ulps suffice.
  rng = np.random.default_rng(24)
  cast = lambda x: np.asarray(jnp.asarray(x, dtype))
  if dtype == "complex64":
    make = lambda shape: rng.normal(size=shape) + 1j * rng.normal(size=shape)
  else:
    make = lambda shape: rng.normal(size=shape)
  params = {k: cast(make(v.shape)) for k, v in PARAMS0.items()}
  grads = [{k: cast(make(v.shape)) for k, v in PARAMS0.items()} for _ in range(6)]
  opts = dict(centered=True, momentum=0.5, eps=1e-3)
  expected, _ = reference_updates(params, grads, lr=0.01, **opts)
  actual, state = run(rmsprop_jax.rmsprop(0.01, **opts), grads, params0=params)
  real = jnp.finfo(jnp.dtype(dtype)).dtype
  assert state.nu["w"].dtype == real and state.trace["w"].dtype == jnp.dtype(dtype)
  eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
  rtol = 3 * eps if dtype != "float32" and dtype != "complex64" else 50 * eps
  for t, (a, e) in enumerate(zip(actual, expected)):
    for k in e:
      # atol: the momentum buffer sums terms of size lr that can cancel.
      np.testing.assert_allclose(a[k], e[k], rtol=rtol, atol=0.01 * rtol, err_msg=f"{t} {k}")


_X64_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, sys.argv[1])
from reference import reference_updates
from helpers import PARAMS0, fixed_grads
import rmsprop_jax
assert jax.config.jax_enable_x64
params = {k: np.asarray(v, np.float64) for k, v in PARAMS0.items()}
grads = [{k: np.asarray(v, np.float64) for k, v in g.items()} for g in fixed_grads(20, seed=25)]
for opts in ({}, dict(centered=True, momentum=0.9, bias_correction=True), dict(eps_in_sqrt=False)):
  opt = rmsprop_jax.rmsprop(0.01, eps=1e-6, **opts)
  p = jax.tree.map(jnp.asarray, params)
  state = opt.init(p)
  assert state.nu["w"].dtype == jnp.float64
  expected, _ = reference_updates(params, grads, lr=0.01, eps=1e-6, **opts)
  for g, e in zip(grads, expected):
    u, state = jax.jit(opt.update)(jax.tree.map(jnp.asarray, g), state, p)
    for k in e:
      assert u[k].dtype == jnp.float64
      # float32 could not get within 1e-7; centered variances cancel a few digits
      np.testing.assert_allclose(np.asarray(u[k]), e[k], rtol=1e-9, atol=0)
print("ok")
"""


def test_float64_with_x64_enabled_matches_the_model_to_float64_rounding():
  import os
  import subprocess
  import sys
  from pathlib import Path

  env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  here = str(Path(__file__).parent)
  out = subprocess.run(
    [sys.executable, "-c", _X64_SCRIPT, here], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
