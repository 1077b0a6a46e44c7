"""One program for every backend: what GPU and TPU get, and what only CPU gets.

The step is exported for ``cuda`` and ``tpu`` with ``jax.export`` (no device
needed) and its StableHLO read: it has no ``optimization_barrier`` and no
array value computed twice (:func:`duplicate_ops`, a value numbering of each
function), for every option, storage and preset. The per-output recompute of
``rmsprop_jax.cpu_recompute`` shows up in the CPU lowering only; that its
numbers equal the portable step's is checked in ``tests/test_same_numbers.py``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export as jax_export

import rmsprop_jax
from rmsprop_jax import presets

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

_DEF = re.compile(r"^\s*(%[\w#:]+(?:, %[\w#:]+)*) = (.*)$")
_SSA = re.compile(r"%[\w#]+")
_LOC = re.compile(r"\s*loc\((?:[^()]|\([^()]*\))*\)")
_ARRAY = re.compile(r"tensor<\d+(?:x\d+)*x[a-z]")  # a tensor of rank >= 1


def duplicate_ops(text: str) -> list[str]:
  """The ops of a StableHLO module that compute an array another op of their function computed.

  A value numbering per function: an op's number is its text with its operands
  replaced by their numbers, so two ops with the same number compute the same
  value. Constants, values computed from constants only, broadcasts (of a
  scalar: not a computation) and scalars are left out, as are the bodies of
  regions (a reduction's reducer).
  """
  dups = []
  for body in re.split(r"\n\s*func\.func ", text)[1:]:
    number: dict[str, int] = {}
    constant: set[int] = set()
    seen: dict[str, int] = {}
    depth = 0
    for line in body.splitlines()[1:]:
      line = _LOC.sub("", line).rstrip()
      m = _DEF.match(line)
      if m and depth == 0:
        names, rest = m.group(1), m.group(2)
        op = rest.split("(")[0].split(" ")[0].strip('"')
        operands = _SSA.findall(rest.split("({")[0])
        key = _SSA.sub(lambda o, n=number: f"v{n.get(o.group(0), o.group(0))}", rest)
        result = rest.rsplit("->", 1)[-1] if "->" in rest else rest.rsplit(":", 1)[-1]
        is_constant = (
          not operands or op.endswith("constant") or all(number.get(o) in constant for o in operands)
        )
        array = _ARRAY.search(result) and not op.endswith("broadcast_in_dim")
        if key in seen and not is_constant and array:
          dups.append(rest.strip())
        v = seen.setdefault(key, len(seen))
        for name in names.split(", "):
          number[name.split(":")[0]] = v
        if is_constant:
          constant.add(v)
      depth += line.count("{") - line.count("}")
  return dups


def exported(opt: optax.GradientTransformation, platforms: list[str]) -> str:
  """The StableHLO of a jitted train step (update and apply) exported for ``platforms``."""
  state = opt.init(PARAMS)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax_export.export(jax.jit(step), platforms=platforms)(PARAMS, state, PARAMS).mlir_module()


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
