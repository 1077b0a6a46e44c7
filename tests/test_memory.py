"""Temporaries of the jitted, donated optimizer step, by XLA's memory analysis.

``compiled.memory_analysis().temp_size_in_bytes`` is what the step allocates
besides its arguments and outputs: deterministic bytes (no timing), decided
by XLA when it compiles. The step here is the one a user writes,
``jax.jit(step, donate_argnums=(0, 1))`` with ``step`` the update and
``optax.apply_updates``, so params and state are updated in place.

The bound is derived from the storage, never from a measurement:

- 0.1 B/param for everything: no float32 temporary of a leaf, for any option
  (optax allocates 4 B/param with nesterov or coupled weight decay);
- plus one copy of each moment stored narrower than float32 (bfloat16 ``nu``:
  2 B/param; an 8-bit moment: its codes, 1 B/param, and its block scales).
  Each step reads the stored moment to compute the exact new one, and
  XLA:CPU, without multi-output fusion, runs the loop that rewrites the
  moment in place and the loop that updates the params separately; the later
  one reads a copy of the old moment. The CPU lowering
  (``rmsprop_jax.cpu_recompute``) keeps it at that copy.

The tree is 4 leaves of 256x512 (131,072 params each), compiled from
abstract shapes (nothing is allocated): big enough that the step's scalars
are far below 0.1 B/param, small enough to compile in a fraction of a second.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import presets
from rmsprop_jax.xla_stats import narrow_moment_bytes  # the bytes of one copy of each narrow moment

# What the current XLA compiles (see pyproject.toml): run with the current releases.
pytestmark = pytest.mark.xla_current

PARAMS = {f"w{i}": jax.ShapeDtypeStruct((256, 512), jnp.float32) for i in range(4)}
N_PARAMS = sum(int(np.prod(p.shape)) for p in PARAMS.values())
EVERYTHING = 0.1  # B/param of temporaries allowed besides the copies of narrow moments

STORAGES = {
  "float32": {},
  "bfloat16 nu": {"nu_dtype": jnp.bfloat16},
  "8-bit": {"state_bits": 8},
}

OPTIONS = {
  "no option": {},
  "momentum": {"momentum": 0.9},
  "nesterov": {"momentum": 0.9, "nesterov": True},
  "centered": {"centered": True},
  "centered and momentum": {"centered": True, "momentum": 0.9},
  "coupled weight decay": {"weight_decay": 0.1},
  "decoupled weight decay": {"weight_decay": 0.1, "weight_decay_mode": "decoupled"},
  "eps outside the root": {"eps_in_sqrt": False},
  "lr after momentum": {"momentum": 0.9, "lr_inside_momentum": False},
  "bias correction, centered and momentum": {"bias_correction": True, "centered": True, "momentum": 0.9},
  "every option, weight decay decoupled": {
    "centered": True,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 0.1,
    "weight_decay_mode": "decoupled",
    "eps_in_sqrt": False,
    "lr_inside_momentum": False,
  },
}

PRESETS = {
  "pytorch defaults": lambda **s: presets.pytorch(**s),
  "pytorch centered with momentum": lambda **s: presets.pytorch(momentum=0.9, centered=True, **s),
  "pytorch momentum and weight decay": lambda **s: presets.pytorch(momentum=0.9, weight_decay=0.1, **s),
  "keras centered, momentum, weight decay": lambda **s: presets.keras(
    momentum=0.9, centered=True, weight_decay=0.1, **s
  ),
  "keras with clipnorm": lambda **s: presets.keras(clipnorm=1.0, **s),
  "tf1 centered with momentum": lambda **s: presets.tf1(1e-3, momentum=0.9, centered=True, **s),
  "optax centered nesterov debiased": lambda **s: presets.optax(
    1e-3, momentum=0.9, nesterov=True, centered=True, bias_correction=True, **s
  ),
}


def _cases(variants: dict) -> list:
  return [pytest.param(name, storage, id=f"{name}, {storage}") for name in variants for storage in STORAGES]


def step_temp_bytes(opt) -> tuple[int, int]:
  """(temporaries of the jitted donated step, bytes allowed for it), nothing allocated."""
  state = jax.eval_shape(opt.init, PARAMS)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(PARAMS, state, PARAMS).compile()
  allowed = EVERYTHING * N_PARAMS + narrow_moment_bytes(state)
  return compiled.memory_analysis().temp_size_in_bytes, allowed


def _assert_within(opt, what):
  temp, allowed = step_temp_bytes(opt)
  assert temp <= allowed, (
    f"{what}: {temp / N_PARAMS:.4f} B/param of temporaries, allowed {allowed / N_PARAMS:.4f}"
    f" ({EVERYTHING} + one copy of each narrow moment)"
  )


@pytest.mark.parametrize(("options", "storage"), _cases(OPTIONS))
def test_donated_step_allocates_no_float32_temporary(options, storage):
  _assert_within(rmsprop_jax.rmsprop(1e-3, **OPTIONS[options], **STORAGES[storage]), f"{options}, {storage}")


@pytest.mark.parametrize(("preset", "storage"), _cases(PRESETS))
def test_every_preset_step_allocates_no_float32_temporary(preset, storage):
  _assert_within(PRESETS[preset](**STORAGES[storage]), f"{preset}, {storage}")


@pytest.mark.parametrize("options", ["no option", "momentum", "centered and momentum"])
@pytest.mark.parametrize("storage", ["bfloat16 nu", "8-bit"])
def test_rounding_to_nearest_allocates_no_more(options, storage):
  opt = rmsprop_jax.rmsprop(1e-3, rounding="nearest", **OPTIONS[options], **STORAGES[storage])
  _assert_within(opt, f"{options}, {storage}, nearest")


def test_the_allowance_is_one_copy_of_each_narrow_moment():
  """The bound's narrow bytes, from the layout: per leaf and moment, bfloat16 2 B/param;
  8-bit 1 B/param and one float32 scale per block of 256."""
  state = jax.eval_shape(rmsprop_jax.rmsprop(1e-3, nu_dtype=jnp.bfloat16, momentum=0.9).init, PARAMS)
  assert narrow_moment_bytes(state) == 2 * N_PARAMS  # nu only: the trace stays float32
  opt = rmsprop_jax.rmsprop(1e-3, state_bits=8, centered=True, momentum=0.9)
  assert narrow_moment_bytes(jax.eval_shape(opt.init, PARAMS)) == 3 * (N_PARAMS + 4 * N_PARAMS // 256)
  assert narrow_moment_bytes(jax.eval_shape(rmsprop_jax.rmsprop(1e-3).init, PARAMS)) == 0


def test_optax_allocates_a_float32_temporary_with_nesterov():
  """What the bound rules out: optax's nesterov step keeps a float32 leaf (4 B/param)."""
  temp, allowed = step_temp_bytes(optax.rmsprop(1e-3, momentum=0.9, nesterov=True))
  assert temp == 4 * N_PARAMS > allowed
