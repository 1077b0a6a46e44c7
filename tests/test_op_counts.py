"""Ops of the lowered step per leaf, per storage: a compile-cost bound that cannot creep.

Compile time grows with the program XLA is given, and that program is the
lowered StableHLO of ``jax.jit(opt.update)``. Its op count is deterministic
(no timing, the same on any machine for a given JAX version), so it can be
bounded where compile time cannot.

How ops are counted (:func:`rmsprop_jax.xla_stats.inlined_ops`): every operation in a function's
body, region bodies (a reduction's reducer) included, terminators
(``return``) excluded. A ``call`` to another function (a nested ``jax.jit``,
which the core uses for each distinct narrow leaf) is not an op of its own:
it counts the callee's body, expanded in the same way, *once per call*. That
is the program XLA compiles after it inlines the calls, so a nested ``jit``
cannot hide ops from the count (counting each distinct callee once would).

Per leaf: the marginal count of one more leaf, ``(ops(4 leaves) - ops(2
leaves)) / 2`` of identical 64x128 leaves (8192 entries: quantized under
``state_bits=8``). What a step spends once, whatever the tree (the count's
increment, hashing the seed and count into a key), is left out.

Counted here when the bounds were set (JAX 0.10.2, optax 0.2.8), per leaf:

==============================  =====  ======================
storage                         plain  centered + momentum
==============================  =====  ======================
optax.rmsprop (measured below)  16     29
float32                         16     32
bfloat16 nu, stochastic         58     73
bfloat16 nu, nearest            22     37
8-bit, stochastic               131    689
8-bit, nearest                  99     619
==============================  =====  ======================

The bounds are these counts plus about 10%: a change that grows the program
fails here, one that shrinks it should lower the bound.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import rmsprop_jax
from rmsprop_jax.xla_stats import inlined_ops, lowered_text, ops_per_leaf, own_ops

# What the current XLA compiles (see pyproject.toml): run with the current releases.
pytestmark = pytest.mark.xla_current

PLAIN = {}
CENTERED_MOMENTUM = {"centered": True, "momentum": 0.9}

STORAGES = {
  "float32": {},
  "bfloat16 nu stochastic": {"nu_dtype": jnp.bfloat16},
  "bfloat16 nu nearest": {"nu_dtype": jnp.bfloat16, "rounding": "nearest"},
  "8-bit stochastic": {"state_bits": 8},
  "8-bit nearest": {"state_bits": 8, "rounding": "nearest"},
}

# (storage, options) -> at most this many ops per leaf: the counts of the module
# docstring plus about 10%.
BOUNDS = {
  ("float32", "plain"): 18,
  ("float32", "centered+momentum"): 35,
  ("bfloat16 nu stochastic", "plain"): 64,
  ("bfloat16 nu stochastic", "centered+momentum"): 80,
  ("bfloat16 nu nearest", "plain"): 25,
  ("bfloat16 nu nearest", "centered+momentum"): 41,
  ("8-bit stochastic", "plain"): 145,
  ("8-bit stochastic", "centered+momentum"): 732,
  ("8-bit nearest", "plain"): 109,
  ("8-bit nearest", "centered+momentum"): 687,
}

OPTIONS = {"plain": PLAIN, "centered+momentum": CENTERED_MOMENTUM}


@functools.cache
def optax_ops_per_leaf(options: str) -> float:
  return ops_per_leaf(optax.rmsprop(1e-3, **OPTIONS[options]))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o} options")
@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: f"{s} state")
def test_lowered_step_has_at_most_the_bounded_ops_per_leaf(storage, options):
  ours = ops_per_leaf(rmsprop_jax.rmsprop(1e-3, **OPTIONS[options], **STORAGES[storage]))
  theirs = optax_ops_per_leaf(options)
  bound = BOUNDS[storage, options]
  assert ours <= bound, (
    f"{storage}, {options}: {ours:g} ops per leaf, bound {bound} (optax.rmsprop with the same"
    f" options: {theirs:g}, ours / optax = {ours / theirs:.2f})"
  )


def test_float32_state_lowers_to_optax_op_count_per_leaf():
  """Float32 storage traces in line, to as many ops per leaf as optax's plain step."""
  assert ops_per_leaf(rmsprop_jax.rmsprop(1e-3)) == optax_ops_per_leaf("plain")


def test_calls_count_their_callee_once_per_call():
  """A nested jit is a ``call``: its body counts at each call, not once, not zero."""
  inner = jax.jit(lambda x: jnp.sin(x) * 2.0 + 1.0)

  def twice(x):
    return inner(inner(x))

  def inline(x):
    f = lambda x: jnp.sin(x) * 2.0 + 1.0
    return f(f(x))

  x = jnp.ones(8)
  nested = jax.jit(twice).lower(x).as_text()
  assert "call @" in nested  # the nested jit is a call in the lowered text
  assert inlined_ops(nested) == inlined_ops(jax.jit(inline).lower(x).as_text())
  assert inlined_ops(nested) > own_ops(nested)


def test_narrow_leaves_are_calls_so_the_expansion_matters():
  """The count of a narrow step's main function alone would miss its leaves' ops."""
  text = lowered_text(rmsprop_jax.rmsprop(1e-3, state_bits=8), 2)
  assert inlined_ops(text) > 2 * own_ops(text)


# The initial state, ``jax.jit(opt.init)`` lowered: per leaf at most this many ops (the
# counts when the bounds were set, JAX 0.10.2, plus about 10%; optax.rmsprop: 2 plain, 6
# centered + momentum). Every storage writes its constant down: a broadcast of each value
# (and a select on the param that carries its sharding), never a reduction to fold.
INIT_BOUNDS = {
  ("float32", "plain"): 6,
  ("float32", "centered+momentum"): 17,
  ("bfloat16 nu stochastic", "plain"): 7,
  ("bfloat16 nu stochastic", "centered+momentum"): 18,
  ("8-bit stochastic", "plain"): 22,
  ("8-bit stochastic", "centered+momentum"): 77,
}


@pytest.mark.parametrize(("storage", "options"), list(INIT_BOUNDS), ids=lambda x: x)
def test_lowered_init_writes_the_state_down_in_bounded_ops_per_leaf(storage, options):
  opt = rmsprop_jax.rmsprop(1e-3, **OPTIONS[options], **STORAGES[storage])
  ours = ops_per_leaf(opt, init=True)
  assert ours <= INIT_BOUNDS[storage, options], (storage, options, ours)
  # a reduction over the constant initial values is what XLA constant-folds (minutes at scale)
  assert "stablehlo.reduce" not in lowered_text(opt, 4, init=True), (storage, options)
