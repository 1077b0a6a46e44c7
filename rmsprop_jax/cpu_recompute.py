"""XLA:CPU lowering of a leaf's step: each stored output computed on its own.

XLA:CPU has no multi-output fusion: each output of a leaf's step (the update,
each new moment, each block scale) is a loop of its own. A value several of
them need, such as the new ``nu`` of a moment stored in 8 bits or bfloat16,
would be computed once and kept in a temporary array the size of the leaf,
and a moment overwritten in place would be copied for the loops that read it
later. Here each output instead runs :func:`rmsprop_jax.leaf.leaf_step` on its
own copy of the stored inputs, behind an optimization barrier that keeps XLA
from merging the copies back (common-subexpression elimination): the values
are recomputed, and nothing the size of the leaf is kept but one copy of each
narrow moment. Moments stored exactly are computed once and read from their
new buffers by the later outputs; coupled weight decay orders the update
after the narrow moments' loops.

Only the CPU lowering does this (:func:`rmsprop_jax.transform` selects it with
``jax.lax.platform_dependent``): backends with multi-output fusion get the
portable step, each value computed once. Optimizers built under
``with portable_on_cpu():`` lower the portable step on CPU too, to compare.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rmsprop_jax import storage
from rmsprop_jax.leaf import Given, Inputs, Outputs, StoredMoments
from rmsprop_jax.quantize import QuantizedArray
from rmsprop_jax.storage import Plan, Stored

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("cpu_recompute", default=True)


@contextlib.contextmanager
def portable_on_cpu() -> Iterator[None]:
  """Optimizers built within this context lower their step for CPU as for any backend.

  For comparing the two lowerings: read when an optimizer is built, so that
  its ``update`` (a function of its own) is traced and cached apart.
  """
  token = _ENABLED.set(False)
  try:
    yield
  finally:
    _ENABLED.reset(token)


def enabled() -> bool:
  """Whether optimizers built now use this lowering on CPU (outside :func:`portable_on_cpu`)."""
  return _ENABLED.get()


def needed(plan: Plan, nesterov: bool, coupled_weight_decay: bool) -> bool:
  """Whether XLA:CPU would keep a temporary the size of the leaf for this leaf's step.

  It does when several outputs need a value it will not recompute on its own:
  Nesterov momentum (the update and the buffer both need the scaled
  gradient), coupled weight decay (the params, which the update rewrites in
  place, are read by every moment's loop) and 8-bit first moments (``mu``,
  ``trace``: the codes, the block maximum and the update all need the new
  moment). A narrow ``nu`` alone (bfloat16, or 8-bit) compiles to the same
  bytes and time either way: XLA:CPU duplicates its elementwise recompute into
  each loop by itself (``benchmarks/lowerings.py``).
  """
  first_moments = (plan.mu, plan.trace)
  return nesterov or coupled_weight_decay or any(st is not None and st.quantized for st in first_moments)


Step = Callable[[Inputs, Given], Outputs]


def _copies(ins: Inputs) -> Callable[[Given], tuple[Inputs, Given]]:
  """``fresh(given)``: the inputs and ``given`` again, for one more output to recompute from."""
  tags = iter(range(1 << 30))

  def fresh(given: Given) -> tuple[Inputs, Given]:
    # The tag tells the barriers apart. XLA drops a barrier's unused operands, so the
    # output uses it: g * (1 + min(tag, 0)), a multiplication by 1 that XLA cannot
    # see through until the barrier is gone (then it folds it away). The params are
    # read as they are, not through the barrier: the caller's p + u rewrites them in
    # place, and XLA copies a buffer that a barrier passes on.
    ins_b, given_b, tag = lax.optimization_barrier((ins._replace(p=None), given, np.int32(next(tags))))
    one = lax.convert_element_type(lax.add(np.int32(1), lax.min(tag, np.int32(0))), ins.g.dtype)
    return ins_b._replace(g=lax.mul(ins_b.g, one), p=ins.p), given_b

  return fresh


def per_output(
  step: Step, ins: Inputs, plan: Plan, coupled_weight_decay: bool
) -> tuple[jax.Array, StoredMoments]:
  """The update and the stored new moments, each output from its own run of ``step``."""
  fresh = _copies(ins)
  run = lambda given: step(*fresh(given))
  given = Given()
  stored: dict[str, Stored | None] = dict.fromkeys(storage.MOMENTS)
  # Moments stored exactly, in dependency order: later outputs read their new buffers.
  for i, m in ((1, "mu"), (0, "nu"), (2, "trace")):
    st = plan[i]
    if st is not None and not st.narrow:
      out = run(given)
      given = given._replace(moments=given.moments._replace(**{m: out.new[i]}))
      stored[m] = out.stored[i]
  # Moments stored narrower than computed: each rounded from its own recomputation,
  # 8-bit codes after their block scales.
  for i, m in ((2, "trace"), (0, "nu"), (1, "mu")):
    st = plan[i]
    if st is None or not st.narrow:
      continue
    if st.quantized:
      scale = _quantized(run(given).stored[i]).scale
      given = given._replace(scales=given.scales._replace(**{m: scale}))
      q = _quantized(run(given).stored[i])
      stored[m] = QuantizedArray(q.codes, scale, q.code)
    else:
      stored[m] = run(given).stored[i]
  update = run(given).update
  if coupled_weight_decay:
    update = _after(
      update, [stored[m] for m, st in zip(storage.MOMENTS, plan) if st is not None and st.narrow]
    )
  return update, StoredMoments(**stored)


def _quantized(x: Stored | None) -> QuantizedArray:
  assert isinstance(x, QuantizedArray)
  return x


def _after(update: jax.Array, narrow: list[Stored | None]) -> jax.Array:
  """``update``, computed after the loops that write ``narrow``.

  Those loops read the params, which the caller's ``p + u`` (fused with the
  update) rewrites in place: the update uses their outputs (multiplying by 1)
  so that XLA copies only the old moments, not the params.
  """
  if not narrow:
    return update
  (after,) = lax.optimization_barrier((narrow,))
  zero = functools.reduce(lax.add, [_zero_from(x) for x in jax.tree.leaves(after)])
  return lax.mul(update, lax.convert_element_type(lax.add(np.int32(1), zero), update.dtype))


def _zero_from(x: jax.Array) -> jax.Array:
  """int32 0, computed from ``x``'s first entries (whatever they hold, NaN included).

  The first entry; along dimensions an explicit mesh shards, all of them (a
  slice of a sharded dimension must keep it whole), reduced with ``min``.
  """
  sharding = storage.explicit_sharding(x)
  spec = tuple(sharding.spec) if sharding is not None else ()
  limits = tuple(n if d < len(spec) and spec[d] is not None else 1 for d, n in enumerate(x.shape))
  part = lax.slice(x, (0,) * x.ndim, limits)
  if jnp.issubdtype(part.dtype, jnp.floating):
    part = lax.bitcast_convert_type(part, jnp.dtype(f"int{8 * part.dtype.itemsize}"))
  nonnegative = lax.shift_right_logical(lax.convert_element_type(part, jnp.int32), np.int32(1))
  return jnp.min(lax.min(nonnegative, np.int32(0)))
