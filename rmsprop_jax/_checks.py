"""Validation of hyperparameters and trees.

Checks that need concrete values are skipped for tracers (``jax.vmap`` sweeps,
``optax.inject_hyperparams`` under ``jit``); checks on structure and shapes use
only static information and run at trace time, so they cost nothing per step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_NOT_CONCRETE = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError)


def _concrete_leaf(x: Any) -> bool:
  if not isinstance(x, jax.Array):
    return True
  try:
    np.asarray(x)  # raises for a tracer (jit, vmap, grad, ...)
  except _NOT_CONCRETE:
    return False
  return True


def is_concrete(value: Any) -> bool:
  """Whether every leaf of ``value`` has a value known in Python (no tracer)."""
  return all(_concrete_leaf(x) for x in jax.tree.leaves(value))


def is_known_zero(value: Any) -> bool:
  """Whether ``value`` is concrete and all zero (a tracer is never known zero)."""
  return is_concrete(value) and bool(np.all(np.asarray(value) == 0))


def has_abstract_leaves(tree: Any) -> bool:
  """Whether ``tree`` has ``jax.ShapeDtypeStruct`` leaves (shapes, no values)."""
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def _show(value: Any) -> str:
  arr = np.asarray(value)
  return repr(arr.item()) if arr.ndim == 0 else np.array2string(arr)


def _described(value: Any) -> str:
  """``value`` as an error message shows it: its type, then its repr."""
  return f"the {type(value).__name__} {value!r}"


def check_number(name: str, value: Any) -> None:
  """Raise ``TypeError`` unless ``value`` is a real number or an array of real numbers.

  It reads only types and dtypes, so it also runs for tracers (``jax.vmap``,
  ``optax.inject_hyperparams`` under ``jit``). Without it a string would pass
  the range check (NumPy reads ``"1e-3"`` as 0.001) and a list or a dict
  would fail only at the first update, far from where it was passed.
  """
  if value is None:
    raise TypeError(f"{name} must be a number, got None")
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a number, got the bool {value!r}")
  if isinstance(value, numbers.Real):
    return
  dtype = getattr(value, "dtype", None)
  if dtype is None or not hasattr(value, "shape"):  # not an array: str, list, dict, ...
    hint = " (for an array of them, pass jnp.asarray(...))" if isinstance(value, (list, tuple)) else ""
    raise TypeError(f"{name} must be a number or an array of numbers, got {_described(value)}{hint}")
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f"{name} must be a number or an array of real numbers, got an array of dtype {dtype}")


def check_scalar(
  name: str,
  value: Any,
  low: float | None = None,
  high: float | None = None,
  *,
  high_open: bool = False,
  allow_none: bool = False,
) -> None:
  """Raise ``ValueError`` unless ``value`` is finite and in ``[low, high]``.

  ``high_open`` makes the upper bound exclusive. Tracers pass unchecked.
  """
  if value is None and allow_none:
    return
  if callable(value):
    raise TypeError(
      f"{name} must be a number or an array, got the callable {value!r}"
      " (only the learning rate and the decay may be schedules)"
    )
  check_number(name, value)
  if not is_concrete(value):
    return
  arr = np.asarray(value, dtype=np.float64)
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be finite, got {_show(value)}")
  lo = -math.inf if low is None else low
  hi = math.inf if high is None else high
  bad = (arr < lo) | ((arr >= hi) if high_open else (arr > hi))
  if np.any(bad):
    if high is None:
      rng = f">= {low:g}"
    else:
      rng = f"in [{lo:g}, {hi:g}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be {rng}, got {_show(value)}")


def check_learning_rate(name: str, value: Any) -> None:
  """A learning rate: a finite number >= 0, an array of them, or a schedule."""
  check_scalar_or_schedule(name, value, 0.0)


def check_scalar_or_schedule(
  name: str, value: Any, low: float | None = None, high: float | None = None
) -> None:
  """:func:`check_scalar`, or for a schedule, its value at step 0.

  A schedule's later values are not known before training; its first one is
  checked here so that a schedule that starts out of range fails at once.
  """
  if value is not None and callable(value):
    first = value(jnp.zeros([], jnp.int32))
    if is_concrete(first):
      check_scalar(f"{name}(0)", first, low, high)
    return
  check_scalar(name, value, low, high)


def static_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
  """``value`` as a Python int; it selects the compiled program, so no tracer.

  ``optax.inject_hyperparams`` turns every numeric argument into an array:
  a concrete one is accepted here; a traced one (its update under ``jit``)
  is refused with the way out.
  """
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not (isinstance(value, numbers.Real) or hasattr(value, "dtype")):
    raise TypeError(f"{name} must be an int, got {_described(value)}")
  if not is_concrete(value):
    raise TypeError(
      f"{name} chooses the compiled program and cannot be traced; with"
      f" optax.inject_hyperparams, pass static_args=({name!r},)"
    )
  arr = np.asarray(value)
  if (
    arr.ndim
    or isinstance(value, bool)
    or not (np.issubdtype(arr.dtype, np.integer) or float(arr) == int(arr))
  ):
    raise TypeError(f"{name} must be an int, got {value!r}")
  return int(arr)


def check_seed(name: str, value: Any) -> None:
  """A seed: an integer scalar >= 0 (an int or integer array; tracers pass)."""
  if not is_concrete(value):
    return
  arr = np.asarray(value)
  if isinstance(value, bool) or arr.ndim or not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{name} must be an integer scalar, got {value!r}")
  if arr < 0 or arr >= 2**32:
    raise ValueError(f"{name} must be in [0, 2**32), got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _path(path: tuple[Any, ...]) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _check_inexact(what: str, tree: Any, advice: str) -> None:
  """Raise ``TypeError`` naming the first leaf of ``tree`` that is not floating or complex."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(f"{what}{_path(path)} has dtype {dtype}; {advice}")


def check_float_params(params: Any, what: str = "params") -> None:
  """Raise ``TypeError`` if any leaf of ``params`` is not floating or complex."""
  _check_inexact(
    what,
    params,
    "RMSProp needs floating or complex parameters (cast it, e.g. with"
    " .astype(jnp.float32), or mask it out with optax.masked)",
  )


def check_float_updates(updates: Any) -> None:
  """Raise ``TypeError`` if any leaf of ``updates`` (the gradients) is not floating or complex.

  Static (dtypes only): it runs when the update is traced, so it costs nothing per step.
  """
  _check_inexact(
    "updates",
    updates,
    "RMSProp needs floating or complex gradients (cast this one, e.g. with"
    " .astype(jnp.float32), or mask its leaf out with optax.masked)",
  )


def _shape(x: Any) -> tuple[int, ...]:
  """A leaf's shape; for 8-bit state (codes and scales), its codes' shape."""
  return jnp.shape(x.codes) if hasattr(x, "codes") else jnp.shape(x)


def check_same_tree(
  name: str, tree: Any, ref: Any, ref_name: str, *, is_leaf: Callable | None = None
) -> None:
  """Raise ``ValueError`` unless ``tree`` has ``ref``'s structure and shapes."""
  treedef: jax.tree_util.PyTreeDef
  ref_def: jax.tree_util.PyTreeDef
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(ref, is_leaf=is_leaf)
  if treedef != ref_def:
    raise ValueError(
      f"{name} has tree structure {treedef}, but {ref_name} has {ref_def};"
      " pass a tree with the same structure as the params given to init"
    )
  for (path, leaf), (_, ref_leaf) in zip(leaves, ref_leaves):
    if _shape(leaf) != _shape(ref_leaf):
      raise ValueError(
        f"{name}{_path(path)} has shape {_shape(leaf)}, but"
        f" {ref_name}{_path(path)} has shape {_shape(ref_leaf)};"
        " shapes must match exactly (no broadcasting)"
      )
