"""Ops of the lowered step per leaf, per storage: a compile-cost bound that cannot creep.

Compile time grows with the program XLA is given, and that program is the
lowered StableHLO of ``jax.jit(opt.update)``. Its op count is deterministic
(no timing, the same on any machine for a given JAX version), so it can be
bounded where compile time cannot.

How ops are counted (:func:`inlined_ops`): every operation in a function's
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
bfloat16 nu, stochastic         83     109
bfloat16 nu, nearest            47     73
8-bit, stochastic               175    665
8-bit, nearest                  176    624
==============================  =====  ======================

The bounds are these counts plus about 10%: a change that grows the program
fails here, one that shrinks it should lower the bound.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import rmsprop_jax

# What the current XLA compiles (see pyproject.toml): run with the current releases.
pytestmark = pytest.mark.xla_current

_NAME = r'@("[^"]+"|[\w.$-]+)'  # a symbol, quoted if it is not an identifier (@"<lambda>")
_FUNC = re.compile(r"^\s*func\.func (?:public |private )?" + _NAME + r"\(")
_CALL = re.compile(r"^\s*(?:%[\w#:, %]+ = )?(?:func\.)?call " + _NAME + r"\(")
_OP = re.compile(r"^\s*(?:%[\w#:, %]+ = )?\"?([a-z_]+\.[a-z_0-9.]+)")


def _bodies(text: str) -> dict[str, list[str]]:
  """Each function of a lowered module: its name and the lines of its body."""
  bodies: dict[str, list[str]] = {}
  name = None
  for line in text.splitlines():
    m = _FUNC.match(line)
    if m:
      name = m.group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  return bodies


def inlined_ops(text: str, entry: str = "main") -> int:
  """Ops of ``entry`` with every call replaced by its callee's body (recursively)."""
  bodies = _bodies(text)

  @functools.cache
  def ops(name: str) -> int:
    total = 0
    for line in bodies[name]:
      call = _CALL.match(line)
      if call:
        total += ops(call.group(1))
        continue
      op = _OP.match(line)
      if op and not op.group(1).endswith("return"):
        total += 1
    return total

  return ops(entry)


SHAPE = (64, 128)


def _lowered(make, leaves: int, init: bool = False) -> str:
  """The lowered ``jax.jit(opt.update)`` (or ``jax.jit(opt.init)``) on identical leaves."""
  params = {f"p{i}": jnp.ones(SHAPE) for i in range(leaves)}
  opt = make()
  if init:
    return jax.jit(opt.init).lower(params).as_text()
  return jax.jit(opt.update).lower(params, opt.init(params), params).as_text()


def ops_per_leaf(make, init: bool = False) -> float:
  """The op count one more leaf adds to the lowered, inlined step (or init)."""
  return (inlined_ops(_lowered(make, 4, init)) - inlined_ops(_lowered(make, 2, init))) / 2


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
  ("bfloat16 nu stochastic", "plain"): 91,
  ("bfloat16 nu stochastic", "centered+momentum"): 120,
  ("bfloat16 nu nearest", "plain"): 52,
  ("bfloat16 nu nearest", "centered+momentum"): 80,
  ("8-bit stochastic", "plain"): 193,
  ("8-bit stochastic", "centered+momentum"): 732,
  ("8-bit nearest", "plain"): 194,
  ("8-bit nearest", "centered+momentum"): 687,
}

OPTIONS = {"plain": PLAIN, "centered+momentum": CENTERED_MOMENTUM}


@functools.cache
def optax_ops_per_leaf(options: str) -> float:
  return ops_per_leaf(lambda: optax.rmsprop(1e-3, **OPTIONS[options]))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o} options")
@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: f"{s} state")
def test_lowered_step_has_at_most_the_bounded_ops_per_leaf(storage, options):
  ours = ops_per_leaf(lambda: rmsprop_jax.rmsprop(1e-3, **OPTIONS[options], **STORAGES[storage]))
  theirs = optax_ops_per_leaf(options)
  bound = BOUNDS[storage, options]
  assert ours <= bound, (
    f"{storage}, {options}: {ours:g} ops per leaf, bound {bound} (optax.rmsprop with the same"
    f" options: {theirs:g}, ours / optax = {ours / theirs:.2f})"
  )


def test_float32_state_lowers_to_optax_op_count_per_leaf():
  """Float32 storage traces in line, to as many ops per leaf as optax's plain step."""
  assert ops_per_leaf(lambda: rmsprop_jax.rmsprop(1e-3)) == optax_ops_per_leaf("plain")


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
  assert inlined_ops(nested) > sum(1 for line in _bodies(nested)["main"] if _OP.match(line))


def test_narrow_leaves_are_calls_so_the_expansion_matters():
  """The count of a narrow step's main function alone would miss its leaves' ops."""
  text = _lowered(lambda: rmsprop_jax.rmsprop(1e-3, state_bits=8), 2)
  main_only = sum(1 for line in _bodies(text)["main"] if _OP.match(line) and not _CALL.match(line))
  assert inlined_ops(text) > 2 * main_only


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
  make = lambda: rmsprop_jax.rmsprop(1e-3, **OPTIONS[options], **STORAGES[storage])
  ours = ops_per_leaf(make, init=True)
  assert ours <= INIT_BOUNDS[storage, options], (storage, options, ours)
  # a reduction over the constant initial values is what XLA constant-folds (minutes at scale)
  assert "stablehlo.reduce" not in _lowered(make, 4, init=True), (storage, options)
