"""What "the same numbers eager, under jit, under vmap" means, per storage and option.

The update of one step is the same function in each mode; XLA compiles the eager program, the
jitted one and the batched one separately, and may fuse their float32 arithmetic differently
(on another CPU too), which moves the last bit. What holds on any machine, and what the README
says:

* float32 state: params and state agree to float32 rounding (a few ulps per step);
* bfloat16 / 8-bit state: the same random bits round the same values, so the stored codes are
  the same except where a last-bit difference of the float32 value crosses a rounding
  threshold: a rare entry is one code (one bfloat16 ulp, one 8-bit code) apart.

The same holds between the two lowerings of the step on CPU: the per-output recompute
XLA:CPU gets (``rmsprop_jax.cpu_recompute``) and the portable step every other backend gets.

Sharded runs: ``tests/test_low_precision.py::test_sharded_state_rounds_exactly_as_unsharded``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import cpu_recompute, presets
from rmsprop_jax.quantize import QuantizedArray

# What the current XLA compiles (see pyproject.toml): run with the current releases. Every case
# compiles three programs (eager, jit, vmap) of its own: slow, run by CI.
pytestmark = [pytest.mark.xla_current, pytest.mark.slow]

SHAPES = {"w": (64, 96), "b": (96,)}
STEPS = 3
STORAGES = {
  "float32": {},
  "bfloat16": {"nu_dtype": jnp.bfloat16},
  "8-bit": {"state_bits": 8, "min_quantize_size": 64},
}
OPTIONS = {
  "plain": {},
  "nesterov": {"momentum": 0.9, "nesterov": True},
  "centered+momentum": {"centered": True, "momentum": 0.9},
  "decoupled wd, eps outside, lr after momentum": {
    "weight_decay": 0.01,
    "weight_decay_mode": "decoupled",
    "eps_in_sqrt": False,
    "momentum": 0.5,
    "lr_inside_momentum": False,
  },
}


def _grads():
  rng = np.random.default_rng(0)
  return [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]


def _params():
  return {k: jnp.full(s, 0.5, jnp.float32) for k, s in SHAPES.items()}


def _run(opt, update):
  params, state = _params(), opt.init(_params())
  for g in _grads():
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def _moments(state):
  """(name, stored value as float64, one code step) for each stored moment entry."""
  out = []
  for field in ("nu", "mu", "trace"):
    tree = getattr(state, field)
    if tree is None:
      continue
    for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedArray)):
      if isinstance(x, QuantizedArray):
        out.append((field, np.asarray(x.codes).astype(np.int64), "code"))
      else:
        out.append((field, np.asarray(x.astype(jnp.float32), np.float64), jnp.dtype(x.dtype).name))
  return out


def _assert_same_numbers(a, b, storage):
  (pa, sa), (pb, sb) = a, b
  # the params: float32 rounding of each step's update, lr * |u| <= 1e-2 * a few
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(x, y, rtol=0, atol=STEPS * 8 * 2.0**-24)
  for (field, x, kind), (_, y, _) in zip(_moments(sa), _moments(sb)):
    if kind == "float32":  # sums of terms of either sign (trace, mu): ulps of the largest term
      np.testing.assert_allclose(x, y, rtol=0, atol=STEPS * 8 * 2.0**-24 * np.max(np.abs(y)), err_msg=field)
      continue
    differ = x != y
    assert np.mean(differ) <= 0.005, (field, np.mean(differ))
    if kind == "code":  # 8-bit: a neighbouring code of the same map
      continue
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), np.abs(y)) + 1e-38)) - 7)  # bfloat16
    assert np.all(np.abs(x - y)[differ] <= ulp[differ]), field


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("storage", list(STORAGES))
def test_eager_jit_and_vmap_give_the_same_numbers(storage, option):
  kw = {**STORAGES[storage], **OPTIONS[option]}
  opt = rmsprop_jax.rmsprop(0.01, **kw)
  jitted = _run(opt, jax.jit(opt.update))
  _assert_same_numbers(_run(opt, opt.update), jitted, storage)

  # a batch of two learning rates, the first one ours: the batched program's first member
  def one(lr):
    o = rmsprop_jax.rmsprop(lr, **kw)
    return _run(o, o.update)

  batched = jax.jit(jax.vmap(one))(jnp.array([0.01, 0.02]))
  _assert_same_numbers(jax.tree.map(lambda x: x[0], batched), jitted, storage)


# Every option the per-output recompute handles differently: exact and narrow moments,
# Nesterov's shared scaled gradient, coupled weight decay's ordering, the centered variance.
PATH_OPTIONS = {
  "plain": {},
  "momentum": {"momentum": 0.9},
  "nesterov, coupled wd": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
  "centered+momentum": {"centered": True, "momentum": 0.9},
  "centered, bias correction": {"centered": True, "bias_correction": True, "decay": 0.99},
  "decoupled wd, eps outside, lr after momentum": OPTIONS["decoupled wd, eps outside, lr after momentum"],
  "maximize, initial scale 1, nearest": {"maximize": True, "initial_scale": 1.0, "rounding": "nearest"},
}
PATH_PRESETS = {
  "pytorch": lambda **kw: presets.pytorch(lr=0.01, alpha=0.9, momentum=0.9, weight_decay=0.01, **kw),
  "keras": lambda **kw: presets.keras(learning_rate=0.01, momentum=0.9, weight_decay=0.01, **kw),
  "tf1": lambda **kw: presets.tf1(0.01, momentum=0.9, centered=True, **kw),
  "optax": lambda **kw: presets.optax(0.01, 0.9, 1e-8, momentum=0.9, nesterov=True, **kw),
}


def _both_paths(make):
  """The run of ``make()``'s optimizer on CPU's lowering and on the portable one."""
  cpu = make()
  with cpu_recompute.portable_on_cpu():
    portable = make()
  return _run(cpu, jax.jit(cpu.update)), _run(portable, jax.jit(portable.update))


@pytest.mark.parametrize("option", list(PATH_OPTIONS))
@pytest.mark.parametrize("storage", list(STORAGES))
def test_cpu_and_portable_lowerings_give_the_same_numbers(storage, option):
  kw = {**STORAGES[storage], **PATH_OPTIONS[option]}
  _assert_same_numbers(*_both_paths(lambda: rmsprop_jax.rmsprop(0.01, **kw)), storage)


@pytest.mark.parametrize("preset", list(PATH_PRESETS))
@pytest.mark.parametrize("storage", ["bfloat16", "8-bit"])
def test_each_preset_gives_the_same_numbers_on_both_lowerings(storage, preset):
  _assert_same_numbers(*_both_paths(lambda: PATH_PRESETS[preset](**STORAGES[storage])), storage)


def test_the_portable_switch_changes_the_cpu_program():
  """The comparison above compares two programs: the switch reaches the lowering."""
  make = lambda: rmsprop_jax.rmsprop(0.01, state_bits=8, min_quantize_size=64, momentum=0.9)
  params = _params()
  text = lambda opt: jax.jit(opt.update).lower(params, opt.init(params), params).as_text()
  cpu = make()
  with cpu_recompute.portable_on_cpu():
    portable = make()
  assert "optimization_barrier" in text(cpu)
  assert "optimization_barrier" not in text(portable)
  assert "optimization_barrier" in text(make())  # the switch ends with its context
