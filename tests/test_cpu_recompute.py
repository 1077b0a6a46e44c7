"""One program for every backend: what GPU and TPU get, and what only CPU gets.

The step is exported for ``cuda`` and ``tpu`` with ``jax.export`` (no device
needed) and its StableHLO read: it has no ``optimization_barrier`` and no
array value computed twice (``xla_stats.duplicate_ops``, a value numbering of
each function), for every option, storage and preset. The per-output recompute of
``rmsprop_jax.cpu_recompute`` shows up in the CPU lowering only; that its
numbers equal the portable step's is checked in ``tests/test_same_numbers.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export as jax_export

import rmsprop_jax
from rmsprop_jax import presets
from rmsprop_jax.xla_stats import duplicate_ops, exported_step_text

PARAMS = {"w": jnp.ones((64, 128)), "b": jnp.ones((128,)), "s": jnp.ones((3,))}  # row, flat, tiny
STORAGES = {
  "float32": {},
  "bfloat16 nu": {"nu_dtype": jnp.bfloat16},
  "bfloat16 nu nearest": {"nu_dtype": jnp.bfloat16, "rounding": "nearest"},
  "8-bit": {"state_bits": 8, "min_quantize_size": 128},
  "8-bit nearest": {"state_bits": 8, "min_quantize_size": 128, "rounding": "nearest"},
}
OPTIONS = {
  "plain": {},
  "momentum": {"momentum": 0.9},
  "nesterov, coupled wd": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
  "centered+momentum": {"centered": True, "momentum": 0.9},
  "every option": {
    "centered": True,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 0.1,
    "weight_decay_mode": "decoupled",
    "eps_in_sqrt": False,
    "lr_inside_momentum": False,
    "bias_correction": True,
    "maximize": True,
  },
}
PRESETS = {
  "pytorch": lambda **kw: presets.pytorch(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01, **kw),
  "keras": lambda **kw: presets.keras(momentum=0.9, centered=True, weight_decay=0.01, **kw),
  "tf1": lambda **kw: presets.tf1(0.01, momentum=0.9, centered=True, **kw),
  "optax": lambda **kw: presets.optax(1e-3, momentum=0.9, nesterov=True, bias_correction=True, **kw),
}


def exported(opt: optax.GradientTransformation, platforms: list[str]) -> str:
  return exported_step_text(opt, PARAMS, platforms)


def _assert_portable(opt, what):
  text = exported(opt, ["cuda", "tpu"])
  assert "optimization_barrier" not in text, what
  assert duplicate_ops(text) == [], (what, duplicate_ops(text)[:5])


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("storage", list(STORAGES))
def test_gpu_and_tpu_get_each_value_computed_once(storage, options):
  _assert_portable(
    rmsprop_jax.rmsprop(1e-3, **STORAGES[storage], **OPTIONS[options]), f"{storage}, {options}"
  )


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("storage", ["float32", "bfloat16 nu", "8-bit"])
def test_every_preset_gives_gpu_and_tpu_each_value_once(storage, preset):
  _assert_portable(PRESETS[preset](**STORAGES[storage]), f"{preset}, {storage}")


def test_only_the_cpu_lowering_recomputes_per_output():
  """What the checks above rule out is there on CPU: barriers and recomputed values."""
  opt = rmsprop_jax.rmsprop(1e-3, **STORAGES["8-bit"], **OPTIONS["nesterov, coupled wd"])
  cpu = exported(opt, ["cpu"])
  assert "optimization_barrier" in cpu
  assert duplicate_ops(cpu)  # the weight decay term, once per output
  # one export for several platforms carries both lowerings, each chosen at run time
  both = exported(opt, ["cpu", "cuda"])
  assert "optimization_barrier" in both and "stablehlo.case" in both


def test_float32_without_shared_values_has_no_cpu_variant():
  """Plain float32 state: one output per leaf needs no recompute, so one lowering everywhere."""
  opt = rmsprop_jax.rmsprop(1e-3)
  assert "stablehlo.case" not in exported(opt, ["cpu", "cuda"])


def test_duplicate_ops_finds_a_value_computed_twice():
  def twice(x):
    return jnp.sin(x) * jnp.sin(x), jnp.cos(x) + 1.0

  text = jax_export.export(jax.jit(twice), platforms=["cuda"])(jnp.ones(8)).mlir_module()
  assert [d.split()[0] for d in duplicate_ops(text)] == ["stablehlo.sine"]
  once = jax_export.export(jax.jit(lambda x: jnp.sin(x) * 2.0), platforms=["cuda"])(jnp.ones(8))
  assert duplicate_ops(once.mlir_module()) == []
