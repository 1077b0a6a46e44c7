"""What XLA says about a compiled or lowered optimizer step: bytes, memory, ops.

Deterministic figures, free of timing noise, for a given JAX/XLA version:

- :func:`xla_bytes_accessed`: the bytes a compiled program reads and writes per
  call (XLA's cost analysis). At the memory roofline two programs that move the
  same bytes take the same time.
- :func:`peak_bytes`: arguments, temporaries and outputs alive at once
  (``compiled.memory_analysis()``).
- :func:`narrow_moment_bytes`: the bytes of the moments a state stores narrower
  than float32, i.e. of one copy of each.
- :func:`compile_donated_step` and :func:`loop_kernels`: the jitted training
  step a user writes (update, then apply, params and state donated) and the
  elementwise loop kernels of its optimized HLO.
- :func:`inlined_ops` and :func:`ops_per_leaf`: the size of the lowered
  StableHLO program XLA is given, with nested ``jit`` calls expanded, per leaf.
- :func:`exported_step_text` and :func:`duplicate_ops`: the step as exported for
  other backends, and the array values a program computes more than once.

The figures belong to the XLA that compiled them; checks that pin them are
marked ``xla_current`` in the tests.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import export as jax_export

from rmsprop_jax.quantize import QuantizedArray

__all__ = [
  "compile_donated_step",
  "donated_step",
  "function_bodies",
  "inlined_ops",
  "loop_kernels",
  "lowered_text",
  "narrow_moment_bytes",
  "ops_per_leaf",
  "own_ops",
  "peak_bytes",
  "xla_bytes_accessed",
]


def xla_bytes_accessed(compiled: jax.stages.Compiled) -> float | None:
  """Bytes a compiled program reads and writes per call, by XLA's cost analysis.

  Args:
    compiled: the result of ``jax.jit(f).lower(...).compile()``.

  Returns:
    ``cost_analysis()["bytes accessed"]``, or None where the backend does not
    report it.
  """
  try:
    cost: Any = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "bytes accessed" not in cost:
    return None
  return float(cost["bytes accessed"])


def peak_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Peak bytes of a compiled program from XLA's memory analysis.

  The peak counts the arguments (donated or not), the temporaries and the
  outputs that do not reuse a donated argument's buffer: everything alive at
  once, at worst.

  Args:
    compiled: the result of ``jax.jit(f).lower(...).compile()``.

  Returns:
    ``{"peak": ..., "temp": ..., "arguments": ...}`` in bytes.
  """
  m = compiled.memory_analysis()
  if m is None:
    raise ValueError("this backend reports no memory analysis")
  peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return {"peak": int(peak), "temp": int(m.temp_size_in_bytes), "arguments": int(m.argument_size_in_bytes)}


def narrow_moment_bytes(state: Any) -> int:
  """Bytes of the moments a state stores narrower than float32.

  8-bit codes with their block scales, and floating arrays of fewer than 4
  bytes (a bfloat16 ``nu``): the size of one copy of each, which a step that
  overwrites them in place may make.

  Args:
    state: an optimizer state, of arrays or of ``jax.ShapeDtypeStruct`` s.

  Returns:
    The bytes, 0 for a state stored in float32.
  """
  total = 0
  for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QuantizedArray)):
    if isinstance(x, QuantizedArray):
      total += x.codes.size * x.codes.dtype.itemsize + x.scale.size * x.scale.dtype.itemsize
    elif jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
      total += x.size * x.dtype.itemsize
  return total


def donated_step(opt: optax.GradientTransformation) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
  """``step(params, state, grads) -> (params, state)``: the update, then ``optax.apply_updates``."""

  def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def compile_donated_step(opt: optax.GradientTransformation, params: Any) -> jax.stages.Compiled:
  """The jitted training step of :func:`donated_step`, params and state donated, compiled.

  Args:
    opt: the optimizer.
    params: a tree of arrays or of ``jax.ShapeDtypeStruct`` s (nothing is
      allocated); the gradients have the same shapes.

  Returns:
    The compiled step.
  """
  state = jax.eval_shape(opt.init, params)
  return jax.jit(donated_step(opt), donate_argnums=(0, 1)).lower(params, state, params).compile()


def loop_kernels(compiled: jax.stages.Compiled) -> list[str]:
  """The elementwise loop kernels of a compiled program's entry computation.

  The lines of the optimized HLO's ``ENTRY`` with ``kind=kLoop``, without the
  one-element (scalar) fusions, such as a step counter's increment.

  Args:
    compiled: the result of ``jax.jit(f).lower(...).compile()``.

  Returns:
    One HLO line per loop kernel.
  """
  hlo = compiled.as_text()
  if hlo is None:
    raise ValueError("this backend gives no text of the compiled program")
  entry = hlo[hlo.index("ENTRY") :]
  return [ln for ln in entry.splitlines() if "kind=kLoop" in ln and "[]" not in ln]


_NAME = r'@("[^"]+"|[\w.$-]+)'  # a symbol, quoted if it is not an identifier (@"<lambda>")
_FUNC = re.compile(r"^\s*func\.func (?:public |private )?" + _NAME + r"\(")
_CALL = re.compile(r"^\s*(?:%[\w#:, %]+ = )?(?:func\.)?call " + _NAME + r"\(")
_OP = re.compile(r"^\s*(?:%[\w#:, %]+ = )?\"?([a-z_]+\.[a-z_0-9.]+)")


def function_bodies(text: str) -> dict[str, list[str]]:
  """Each function of a lowered StableHLO module: its name and the lines of its body.

  Args:
    text: ``jax.jit(f).lower(...).as_text()``.
  """
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


def _is_op(line: str) -> bool:
  op = _OP.match(line)
  return op is not None and not op.group(1).endswith("return") and not _CALL.match(line)


def own_ops(text: str, entry: str = "main") -> int:
  """Ops in the body of one function of a lowered module, its calls and ``return`` excluded.

  Args:
    text: ``jax.jit(f).lower(...).as_text()``.
    entry: the function's name.
  """
  return sum(1 for line in function_bodies(text)[entry] if _is_op(line))


def inlined_ops(text: str, entry: str = "main") -> int:
  """Ops of a function of a lowered module, each call replaced by its callee's body.

  Every operation in the body counts, region bodies (a reduction's reducer)
  included, terminators (``return``) excluded. A ``call`` (a nested
  ``jax.jit``) counts its callee's ops, expanded the same way, once per call:
  the program XLA compiles after it inlines the calls.

  Args:
    text: ``jax.jit(f).lower(...).as_text()``.
    entry: the function to count, ``main`` for the jitted function itself.
  """
  bodies = function_bodies(text)

  @functools.cache
  def ops(name: str) -> int:
    total = 0
    for line in bodies[name]:
      call = _CALL.match(line)
      if call:
        total += ops(call.group(1))
      elif _is_op(line):
        total += 1
    return total

  return ops(entry)


def lowered_text(
  opt: optax.GradientTransformation, leaves: int, shape: tuple[int, ...] = (64, 128), init: bool = False
) -> str:
  """The lowered ``jax.jit(opt.update)`` (or ``jax.jit(opt.init)``) on identical float32 leaves.

  Args:
    opt: the optimizer.
    leaves: how many leaves of ``shape`` the params have.
    shape: each leaf's shape; the default's 8192 entries are quantized under
      ``state_bits=8``.
    init: lower ``opt.init`` instead of ``opt.update``.
  """
  params = {f"p{i}": jax.ShapeDtypeStruct(shape, jnp.float32) for i in range(leaves)}
  if init:
    return jax.jit(opt.init).lower(params).as_text()
  return jax.jit(opt.update).lower(params, jax.eval_shape(opt.init, params), params).as_text()


def ops_per_leaf(
  opt: optax.GradientTransformation, shape: tuple[int, ...] = (64, 128), init: bool = False
) -> float:
  """The ops one more leaf adds to the lowered, inlined step (or init).

  ``(ops(4 leaves) - ops(2 leaves)) / 2`` of identical leaves: what a step
  spends once, whatever the tree (the count's increment, the rounding's key),
  is left out.

  Args:
    opt: the optimizer.
    shape: each leaf's shape.
    init: count ``opt.init`` instead of ``opt.update``.
  """
  count = lambda n: inlined_ops(lowered_text(opt, n, shape, init))
  return (count(4) - count(2)) / 2


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


def exported_step_text(opt: optax.GradientTransformation, params: Any, platforms: list[str]) -> str:
  """The StableHLO of the jitted train step (update, then apply) exported for ``platforms``.

  What a backend is given, e.g. ``platforms=["cuda", "tpu"]``, with no such
  device present (``jax.export``).
  """
  state = opt.init(params)

  def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax_export.export(jax.jit(step), platforms=platforms)(params, state, params).mlir_module()
