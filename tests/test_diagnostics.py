"""effective_learning_rate and find_state."""

import warnings

import jax
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
  eff = rmsprop_jax.effective_learning_rate(state, sched, 1e-8)
  nu = 1 - 0.9**3
  np.testing.assert_allclose(eff, 0.1 / 3 / np.sqrt(nu + 1e-8), rtol=1e-6)


def test_find_state_inside_chain_and_inject_hyperparams():
  opt = optax.chain(
    optax.clip(1.0), optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.1, eps=1.0)
  )
  state = opt.init(jnp.zeros(3))
  assert isinstance(find_state(state), rmsprop_jax.RMSPropState)
  # nu = 0 before any step: lr / sqrt(0 + eps) with the injected eps
  np.testing.assert_allclose(rmsprop_jax.effective_learning_rate(state, opt), np.full(3, 0.1), rtol=1e-6)


def test_find_state_refuses_a_state_without_ours():
  with pytest.raises(ValueError, match="exactly one RMSPropState, found 0"):
    find_state(optax.adam(0.1).init(jnp.zeros(2)))


# ---- Through the wrappers ------------------------------------------------------------------
# Each wrapper is run with a constant gradient G (so optax.MultiSteps' average is G too); the
# gradient our transformation receives is known, and so is its nu after n of its own steps:
# (1 - decay**n) * (scale * G)**2, computed here in float64.

_G = {"w": np.full((16, 32), 0.5), "b": np.full((3,), -2.0)}
_LR, _DECAY, _EPS = 0.01, 0.9, 1e-6


def _run(opt, steps):
  params = jax.tree.map(lambda g: jnp.ones(g.shape, jnp.float32), _G)
  grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), _G)
  state = opt.init(params)
  for _ in range(steps):
    _, state = opt.update(grads, state, params)
  return state


def _expected(inner_steps, scale=1.0, lr=_LR, eps=_EPS):
  nu = {k: (1 - _DECAY**inner_steps) * (scale * g) ** 2 for k, g in _G.items()}
  return {k: lr / np.sqrt(v + eps) for k, v in nu.items()}


def _ours(**kw):
  return rmsprop_jax.rmsprop(_LR, decay=_DECAY, eps=_EPS, **kw)


_WRAPPERS = {
  # name: (wrapper of ours, steps run, our steps taken, scale of the gradient we receive, keys)
  "ours": (lambda o: o, 3, 3, 1.0, ("w", "b")),
  "chain": (lambda o: optax.chain(optax.scale(0.5), o), 3, 3, 0.5, ("w", "b")),
  "MultiSteps": (lambda o: optax.MultiSteps(o, every_k_schedule=2), 4, 2, 1.0, ("w", "b")),
  "apply_if_finite": (lambda o: optax.apply_if_finite(o, 3), 3, 3, 1.0, ("w", "b")),
  "masked": (lambda o: optax.masked(o, {"w": True, "b": False}), 3, 3, 1.0, ("w",)),
  "multi_transform": (
    lambda o: optax.multi_transform({"ours": o, "sgd": optax.sgd(0.1)}, {"w": "ours", "b": "sgd"}),
    3,
    3,
    1.0,
    ("w",),
  ),
}
_STORAGES = {
  "float32": {},
  "bfloat16": {"nu_dtype": jnp.bfloat16},
  "8-bit": {"state_bits": 8, "min_quantize_size": 256},
}


@pytest.mark.parametrize("storage", list(_STORAGES))
@pytest.mark.parametrize("wrapper", list(_WRAPPERS))
def test_effective_learning_rate_through_wrappers(wrapper, storage):
  wrap, steps, inner_steps, scale, keys = _WRAPPERS[wrapper]
  opt = wrap(_ours(**_STORAGES[storage]))
  eff = rmsprop_jax.effective_learning_rate(_run(opt, steps), opt)
  want = _expected(inner_steps, scale)
  # float32: a few roundings; bfloat16 / 8-bit: the stored nu's rounding (2**-8 relative for
  # bfloat16, halved by the root; 8-bit codes of a constant block are its scale, exact)
  rtol = 1e-5 if storage != "bfloat16" else 2.0**-8
  for k in keys:
    np.testing.assert_allclose(eff[k], want[k], rtol=rtol, err_msg=f"{wrapper}, {storage}, {k}")
  for k in set(_G) - set(keys):
    assert isinstance(eff[k], optax.MaskedNode)


def test_effective_learning_rate_reads_injected_hyperparameters_from_the_state():
  opt = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=_LR, decay=_DECAY, eps=_EPS)
  state = _run(opt, 3)
  eff = rmsprop_jax.effective_learning_rate(state, opt)
  np.testing.assert_allclose(eff["w"], _expected(3)["w"], rtol=1e-5)
  # the user changes the injected learning rate and eps; the next step uses them
  state.hyperparams["learning_rate"] = jnp.asarray(0.5 * _LR)
  state.hyperparams["eps"] = jnp.asarray(1e-2)
  params = jax.tree.map(lambda g: jnp.ones(g.shape), _G)
  _, state = opt.update(jax.tree.map(jnp.asarray, _G), state, params)
  eff = rmsprop_jax.effective_learning_rate(state, opt)
  np.testing.assert_allclose(eff["w"], _expected(4, lr=0.5 * _LR, eps=1e-2)["w"], rtol=1e-5)


def test_effective_learning_rate_reads_an_injected_schedule_at_the_last_step():
  sched = optax.linear_schedule(0.1, 0.0, 10)
  opt = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=sched, decay=_DECAY, eps=_EPS)
  eff = rmsprop_jax.effective_learning_rate(_run(opt, 3), opt)
  np.testing.assert_allclose(eff["b"], _expected(3, lr=float(sched(2)))["b"], rtol=1e-5)


def test_effective_learning_rate_of_an_injected_preset_uses_its_argument_names():
  # torch: lr, alpha; eps outside the root
  opt = optax.inject_hyperparams(rmsprop_jax.presets.pytorch)(lr=_LR, alpha=_DECAY, eps=_EPS)
  state = _run(opt, 2)
  state.hyperparams["lr"] = jnp.asarray(3 * _LR)
  eff = rmsprop_jax.effective_learning_rate(state, opt)
  nu = (1 - _DECAY**2) * _G["w"] ** 2
  np.testing.assert_allclose(eff["w"], 3 * _LR / (np.sqrt(nu) + _EPS), rtol=1e-5)


def test_effective_learning_rate_under_inject_with_8bit_state_and_static_storage():
  inject = optax.inject_hyperparams(rmsprop_jax.rmsprop, static_args=("state_bits", "min_quantize_size"))
  opt = inject(learning_rate=_LR, decay=_DECAY, eps=_EPS, state_bits=8, min_quantize_size=256)
  state = _run(opt, 3)
  assert isinstance(find_state(state).nu["w"], rmsprop_jax.quantize.QuantizedArray)
  np.testing.assert_allclose(
    rmsprop_jax.effective_learning_rate(state, opt)["w"], _expected(3)["w"], rtol=1e-5
  )


def test_effective_learning_rate_says_what_to_pass_when_it_cannot_tell():
  ours = _ours()
  with pytest.raises(
    TypeError, match="no rmsprop_jax transformation.*pass the rmsprop_jax transformation itself"
  ):
    rmsprop_jax.effective_learning_rate(_run(optax.chain(optax.adam(0.1), ours), 1), optax.adam(0.1))
  # two of ours: the state says so, and the part of it that belongs to one of them works
  opt = optax.multi_transform({"a": ours, "b": _ours(momentum=0.5)}, {"w": "a", "b": "b"})
  state = _run(opt, 2)
  with pytest.raises(ValueError, match="exactly one RMSPropState, found 2.*the part of the state"):
    rmsprop_jax.effective_learning_rate(state, opt)
  eff = rmsprop_jax.effective_learning_rate(state.inner_states["a"], ours)
  np.testing.assert_allclose(eff["w"], _expected(2)["w"], rtol=1e-5)
  # a wrapper around two of ours, given the part of the state of one: ambiguous, said so
  with pytest.raises(TypeError, match="2 rmsprop_jax transformations"):
    rmsprop_jax.effective_learning_rate(state.inner_states["a"], opt)


def test_the_numeric_form_refuses_injected_hyperparameters_and_warns_without_eps():
  opt = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=_LR)
  with pytest.raises(TypeError, match="inject_hyperparams.*effective_learning_rate\\(state, opt\\)"):
    rmsprop_jax.effective_learning_rate(_run(opt, 1), _LR, eps=1e-8)
  state = _run(_ours(), 2)
  with pytest.warns(FutureWarning, match="assumes eps=1e-8"):
    rmsprop_jax.effective_learning_rate(state, _LR)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    eff = rmsprop_jax.effective_learning_rate(state, _LR, _EPS)
  np.testing.assert_allclose(eff["w"], _expected(2)["w"], rtol=1e-5)


def test_settings_travel_with_the_transformation():
  # no registry: a transformation rebuilt inside a wrapper's update (inject_hyperparams does
  # so every step) and one that is garbage-collected leave nothing behind
  import gc

  from rmsprop_jax import transform

  opt = _ours(momentum=0.9)
  settings = transform.settings_of(opt)
  assert settings.config.momentum and settings.hyperparams.learning_rate == _LR
  assert transform.settings_of(optax.chain(opt)) is None
  assert not any(
    isinstance(v, dict) and len(v) > 0 and all(callable(k) for k in v) for v in vars(transform).values()
  )
  del opt
  gc.collect()
