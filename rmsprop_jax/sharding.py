"""Optimizer state sharded over the data-parallel devices (ZeRO-1), in one call.

In data-parallel training every device holds the whole model and, by default,
the whole optimizer state too. :func:`state_shardings` lays the state out so
that each of the ``N`` devices of a mesh axis holds ``1/N`` of it, while the
parameters stay as they are (replicated, or sharded over other axes). JAX's
SPMD partitioner does the rest: each device updates its slice of the state,
and the gradient all-reduce becomes a reduce-scatter plus an all-gather of
the updated parameters. There is no communication code here, only a layout.

It works for any optax transformation (our :func:`rmsprop_jax.rmsprop`,
``optax.adam``, chains, ``optax.MultiSteps``, ...): state leaves are matched
to parameters by tree structure and shape, not by knowing the optimizer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rmsprop_jax import quantize
from rmsprop_jax.quantize import QuantizedArray

# 2**14 float32 elements are 64 KiB: biases and norm scales (up to 16k wide)
# stay put, where sharding would save little and cost a collective each.
DEFAULT_MIN_SIZE = 2**14

_Spec = tuple[Any, ...]  # a PartitionSpec padded to its leaf's rank


def state_shardings(
  opt: optax.GradientTransformation,
  params: optax.Params,
  mesh: Mesh,
  axis: str | tuple[str, ...] = "data",
  *,
  min_size: int = DEFAULT_MIN_SIZE,
) -> Any:
  """Shardings that split the optimizer state over a data-parallel mesh axis.

  Returns one :class:`jax.sharding.NamedSharding` per leaf of
  ``opt.init(params)``, in the same tree structure, for ZeRO-1 (Rajbhandari
  et al., 2020): each device of ``axis`` holds a ``1/N`` slice of the state
  while the parameters stay as they are. Each state leaf

  1. starts from its parameter's sharding if it has its parameter's shape
     (``nu``, ``mu``, ``trace``, optax's moments, accumulated gradients),
     else from replicated (counts, scalars, per-block scales of quantized
     state, anything else);
  2. if it has at least ``min_size`` elements and ``axis`` is not used by
     that sharding yet, is also split over ``axis`` along its largest
     dimension that is not sharded yet and is divisible by the size of
     ``axis`` (the first such dimension on a tie). Leaves without one stay as
     they are.

  State leaves are matched to parameters by tree structure and shape, so any
  optax transformation or chain works, not only this package's.

  Use the result as ``out_shardings`` of a jitted ``init`` and as the state's
  in/out sharding of a jitted, donated train step::

    s = state_shardings(opt, params, mesh)
    state = jax.jit(opt.init, out_shardings=s)(params)
    step = jax.jit(train_step, in_shardings=(p_sh, s, batch_sh),
                   out_shardings=(p_sh, s), donate_argnums=(0, 1))

  Args:
    opt: the optimizer (any :class:`optax.GradientTransformation`).
    params: the parameters, as arrays or :class:`jax.ShapeDtypeStruct` s (no
      memory is allocated: ``opt.init`` is only traced). A parameter with a
      :class:`~jax.sharding.NamedSharding` over ``mesh`` keeps its partition
      spec in the state; one without (a NumPy array, a single-device or
      unsharded array) counts as replicated.
    mesh: the device mesh of the train step.
    axis: the data-parallel mesh axis the state is split over, or a tuple of
      mesh axes to split over their product (e.g. ``("replica", "data")``).
    min_size: leaves with fewer elements are not split over ``axis``.
      Default ``2**14``: biases and normalization scales stay put (they
      would save little memory and cost a collective each), weight matrices
      and convolution kernels are split. 0 splits every divisible leaf.

  Returns:
    A tree of :class:`~jax.sharding.NamedSharding` with the structure of
    ``opt.init(params)``.

  Raises:
    ValueError: if ``axis`` is not an axis of ``mesh``, ``min_size`` is
      negative, or a parameter is sharded over another mesh.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import rmsprop_jax
    >>> n = jax.device_count()  # e.g. 1 on a laptop, 8 in this package's tests
    >>> mesh = jax.make_mesh((n,), ("data",))
    >>> params = {"w": jnp.zeros((1024, 64)), "b": jnp.zeros(64)}
    >>> opt = rmsprop_jax.rmsprop(1e-3, momentum=0.9)
    >>> s = rmsprop_jax.state_shardings(opt, params, mesh)
    >>> state = jax.jit(opt.init, out_shardings=s)(params)
    >>> state.nu["w"].addressable_shards[0].data.shape == (1024 // n, 64)
    True
    >>> state.trace["b"].addressable_shards[0].data.shape  # under min_size: whole
    (64,)
    >>> s.count.spec == jax.sharding.PartitionSpec()  # scalars stay replicated
    True

  References:
    Rajbhandari, Rasley, Ruwase, He, "ZeRO: Memory Optimizations Toward
    Training Trillion Parameter Models", SC 2020 (stage 1: optimizer state
    partitioning).
    Xu et al., "Automatic Cross-Replica Sharding of Weight Update in
    Data-Parallel Training", 2020 (the same, done by XLA's SPMD partitioner).
  """
  axes = _check_axis(axis, mesh)
  _check_min_size(min_size)
  n = int(np.prod([mesh.shape[a] for a in axes]))
  p_leaves, p_treedef = jax.tree_util.tree_flatten(params)
  p_info = [
    (tuple(np.shape(p)), _param_spec(path, p, mesh))
    for (path, _), p in zip(jax.tree_util.tree_leaves_with_path(params), p_leaves)
  ]
  state = jax.eval_shape(opt.init, params)
  base = _base_specs(state, p_treedef, p_info)
  entry = axes[0] if len(axes) == 1 else axes

  def sharding(
    leaf: jax.ShapeDtypeStruct, spec: _Spec, keeps: Callable[[int], bool] | None = None
  ) -> NamedSharding:
    spec = _add_axis(tuple(leaf.shape), spec, axes, entry, n, min_size, keeps)
    while spec and spec[-1] is None:  # P("data"), not P("data", None)
      spec = spec[:-1]
    return NamedSharding(mesh, P(*spec))

  def one(leaf: Any, spec: Any) -> Any:
    if not isinstance(leaf, QuantizedArray):
      return sharding(leaf, spec)
    # 8-bit codes are split only where the split keeps their 256-value blocks whole.
    keeps = functools.partial(_keeps_blocks, tuple(leaf.codes.shape), n)
    codes, scale = jax.tree.leaves(leaf)  # ShapeDtypeStructs (the state is abstract)
    specs = jax.tree.leaves(spec, is_leaf=lambda x: isinstance(x, tuple))
    out = [sharding(codes, specs[0], keeps), sharding(scale, specs[1])]
    return jax.tree.unflatten(jax.tree.structure(leaf), out)  # a QuantizedArray of shardings

  return jax.tree.map(one, state, base, is_leaf=lambda x: isinstance(x, QuantizedArray))


def _keeps_blocks(shape: tuple[int, ...], n: int, d: int) -> bool:
  """Whether splitting dimension ``d`` of 8-bit codes of ``shape`` in ``n`` keeps blocks whole.

  Blocks run along each row (``shape[0]`` rows of the rest, flattened) or, for
  1-D and thin arrays, along the whole flattened array (:func:`quantize.scale_shape`).
  """
  flat = len(shape) < 2 or math.prod(shape[1:]) < quantize.BLOCK_SIZE
  if flat:
    return d == 0 and (math.prod(shape) // n) % quantize.BLOCK_SIZE == 0
  return d == 0 or (d == 1 and (math.prod(shape[1:]) // n) % quantize.BLOCK_SIZE == 0)


# ---------------------------------------------------------------- arguments


def _check_axis(axis: object, mesh: object) -> tuple[str, ...]:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  axes = (axis,) if isinstance(axis, str) else axis
  if not isinstance(axes, tuple) or not axes or not all(isinstance(a, str) for a in axes):
    raise TypeError(f"axis must be a mesh axis name or a tuple of them, got {axis!r}")
  for a in axes:
    if a not in mesh.axis_names:
      raise ValueError(f"axis {a!r} is not an axis of mesh; its axes are {tuple(mesh.axis_names)}")
  if len(set(axes)) != len(axes):
    raise ValueError(f"axis names a mesh axis twice: {axis!r}")
  return axes


def _check_min_size(min_size: object) -> None:
  if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)):
    raise TypeError(f"min_size must be an int, got {min_size!r}")
  if min_size < 0:
    raise ValueError(f"min_size must be >= 0, got {min_size}")


def _param_spec(path: jax.tree_util.KeyPath, p: Any, mesh: Mesh) -> _Spec:
  """A parameter's partition spec over ``mesh``, padded to its rank."""
  name = "params" + jax.tree_util.keystr(path)
  if not hasattr(p, "shape") and not isinstance(p, (int, float, complex, np.number)):
    raise TypeError(
      f"{name} is a {type(p).__name__}; params must be a tree of arrays or jax.ShapeDtypeStruct"
    )
  ndim = len(np.shape(p))
  sharding = getattr(p, "sharding", None)
  if sharding is None:
    return (None,) * ndim
  if isinstance(sharding, NamedSharding):
    if dict(sharding.mesh.shape) != dict(mesh.shape):
      raise ValueError(
        f"{name} is sharded over a mesh with axes {dict(sharding.mesh.shape)}, but mesh has"
        f" {dict(mesh.shape)}; shard params and state over the same mesh"
      )
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))
  if sharding.is_fully_replicated:  # a single-device or replicated array
    return (None,) * ndim
  raise ValueError(f"{name} has sharding {sharding}; give it a NamedSharding over mesh (or replicate it)")


# ---------------------------------------------------------------- matching


def _is_array(x: object) -> bool:
  return x is not None and hasattr(x, "shape") and hasattr(x, "dtype")


def _children(node: object) -> tuple[list[Any], jax.tree_util.PyTreeDef]:
  """The immediate children of a pytree node, and the treedef to rebuild it."""
  return jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)


def _is_empty(node: object) -> bool:
  return not jax.tree_util.tree_leaves(node)


def _slot_kind(sub: Any, shape: tuple[int, ...]) -> str:
  """What ``sub``, at a parameter's position in a state tree, holds for that parameter.

  "param": an array of the parameter's shape, or a node of arrays of which
  one has it (e.g. quantized codes and their per-block scales); "other": an
  array or node of arrays of other shapes (e.g. a factored moment's
  placeholder); "empty": no arrays (None, ``optax.MaskedNode``); "deep":
  nested nodes, so this is not a per-parameter slot at all.
  """
  if _is_array(sub):
    return "param" if tuple(sub.shape) == shape else "other"
  if _is_empty(sub):
    return "empty"
  kids, _ = _children(sub)
  if not all(_is_array(k) or _is_empty(k) for k in kids):
    return "deep"
  return "param" if any(_is_array(k) and tuple(k.shape) == shape for k in kids) else "other"


def _match(
  node: Any, p_treedef: jax.tree_util.PyTreeDef, p_info: list[tuple[tuple[int, ...], _Spec]]
) -> list[Any] | None:
  """The parameter slots of ``node`` if it is a copy of the parameter tree, else None.

  A copy has the params' tree structure down to the parameters, one slot per
  parameter, at least one of which holds a param-shaped array. Requiring
  shallow slots keeps a chain's tuple of states from passing for a tuple of
  params.
  """
  try:
    subs = p_treedef.flatten_up_to(node)
  except (ValueError, TypeError):
    return None
  kinds = [_slot_kind(sub, shape) for sub, (shape, _) in zip(subs, p_info)]
  if "deep" in kinds or "param" not in kinds:
    return None
  return subs


def _base_specs(
  node: Any, p_treedef: jax.tree_util.PyTreeDef, p_info: list[tuple[tuple[int, ...], _Spec]]
) -> Any:
  """Starting specs for every state leaf: its parameter's, or replicated."""
  if node is None:
    return None
  subs = _match(node, p_treedef, p_info)
  if subs is not None:
    slots = [
      jax.tree.map(lambda x, s=shape, sp=spec: sp if tuple(x.shape) == s else (None,) * len(x.shape), sub)
      for sub, (shape, spec) in zip(subs, p_info)
    ]
    return p_treedef.unflatten(slots)
  if _is_array(node):
    return (None,) * len(node.shape)
  kids, treedef = _children(node)
  return treedef.unflatten([_base_specs(k, p_treedef, p_info) for k in kids])


# ---------------------------------------------------------------- the rule


def _used_axes(spec: _Spec) -> set[str]:
  used: set[str] = set()
  for e in spec:
    if isinstance(e, str):
      used.add(e)
    elif isinstance(e, tuple):
      used.update(e)
  return used


def _add_axis(
  shape: tuple[int, ...],
  spec: _Spec,
  axes: tuple[str, ...],
  entry: str | tuple[str, ...],
  n: int,
  min_size: int,
  keeps: Callable[[int], bool] | None = None,
) -> _Spec:
  """``spec`` with ``entry`` on the largest free dimension divisible by ``n`` (and ``keeps``)."""
  if n == 1 or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1):
    return spec
  if _used_axes(spec) & set(axes):
    return spec
  free = [d for d, e in enumerate(spec) if e is None and shape[d] >= n and shape[d] % n == 0]
  free = [d for d in free if keeps is None or keeps(d)]
  if not free:
    return spec
  d = max(free, key=lambda i: (shape[i], -i))
  return spec[:d] + (entry,) + spec[d + 1 :]
