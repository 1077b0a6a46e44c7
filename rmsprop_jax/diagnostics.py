"""Inspecting an RMSProp state: effective learning rates and friends."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _checks
from rmsprop_jax.quantize import QuantizedArray
from rmsprop_jax.transform import (
  Config,
  Hyperparams,
  RMSPropState,
  is_centered_variance,
  last_step_size,
  load,
  settings_of,
)


def find_state(state: Any) -> RMSPropState:
  """The one :class:`~rmsprop_jax.RMSPropState` inside ``state``.

  Works on our own state and on states that wrap it (``optax.chain``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``, ...).

  Args:
    state: an optimizer state containing exactly one
      :class:`~rmsprop_jax.RMSPropState`.

  Returns:
    That :class:`~rmsprop_jax.RMSPropState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import rmsprop_jax
    >>> opt = optax.chain(optax.clip(1.0), rmsprop_jax.rmsprop(0.1))
    >>> print(rmsprop_jax.diagnostics.find_state(opt.init(jnp.zeros(2))).nu)
    [0. 0.]
  """
  is_ours = lambda x: isinstance(x, RMSPropState)
  found = [s for s in jax.tree.leaves(state, is_leaf=is_ours) if is_ours(s)]
  if len(found) != 1:
    raise ValueError(f"state must contain exactly one RMSPropState, found {len(found)}")
  return found[0]


def effective_learning_rate(
  state: Any,
  opt: Any,
  eps: jax.typing.ArrayLike | None = None,
  *,
  eps_in_sqrt: bool | None = None,
) -> optax.Updates:
  r"""The per-parameter step size of the last update, ``lr / sqrt(nu + eps)``.

  .. math::

    \eta^{\text{eff}}_t = \frac{\eta_t}{\sqrt{\hat\nu_t - |\hat\mu_t|^2 + \epsilon}}
    \quad\text{or}\quad \frac{\eta_t}{\sqrt{\hat\nu_t - |\hat\mu_t|^2} + \epsilon}

  (:math:`\hat\mu_t = 0` unless the state is centered; hats mark bias
  correction when the optimizer uses it.) The last update was
  ``-effective_learning_rate * g`` for RMSProp without momentum or weight
  decay; this is the "Effective LR" column of tutorial tables, and the quantity
  whose decay to zero distinguishes AdaGrad from RMSProp.

  Pass the optimizer itself (built by :func:`rmsprop_jax.rmsprop`,
  :func:`rmsprop_jax.scale_by_rms` or a preset): its learning rate or
  schedule, eps and its placement, bias correction and zero-denominator rule
  are then the update's own, so the two cannot disagree (with ``state_bits=8``
  the update also floors the decoded ``nu`` at ``(1 - decay) g**2``, which
  the state alone cannot know: there, for the ~1% of entries where rounding
  left ``nu`` below that bound, the last step was smaller than this). For
  :func:`~rmsprop_jax.scale_by_rms` (no learning rate) it is the scale
  ``1 / sqrt(nu + eps)``. The older form ``effective_learning_rate(state,
  learning_rate, eps=1e-8, *, eps_in_sqrt=True)`` still works.

  Args:
    state: an :class:`RMSPropState`, or any optimizer state containing one.
    opt: the optimizer that produced ``state``; or a learning rate (float or
      schedule, evaluated at the count of the last step, ``count - 1``).
    eps: only with a learning rate: the eps used (None means 1e-8).
    eps_in_sqrt: only with a learning rate: whether eps was inside the root
      (None means True).

  Returns:
    A tree like the params with the effective learning rate of each entry.

  Example:
    >>> import jax.numpy as jnp
    >>> import rmsprop_jax
    >>> opt = rmsprop_jax.rmsprop(0.1, decay=0.9, eps=0.0)
    >>> _, state = opt.update(jnp.array([8.0]), opt.init(jnp.array([4.0])))
    >>> print(rmsprop_jax.effective_learning_rate(state, opt).round(6))  # 0.1/sqrt(6.4)
    [0.039528]
  """
  st = find_state(state)
  settings = settings_of(opt)
  if settings is not None:
    if eps is not None or eps_in_sqrt is not None:
      raise TypeError(
        "effective_learning_rate(state, opt) takes eps and eps_in_sqrt from opt;"
        " pass them only with a learning rate"
      )
    cfg, hp = settings
    return last_step_size(st, cfg, hp)
  if isinstance(opt, optax.GradientTransformation):
    raise TypeError(
      "effective_learning_rate needs an optimizer built by rmsprop_jax (rmsprop,"
      " scale_by_rms or a preset), or a learning rate; got another transformation"
    )
  _checks.check_learning_rate("learning_rate", opt)
  eps = 1e-8 if eps is None else eps
  _checks.check_scalar("eps", eps, 0.0)
  cfg = Config(
    eps_in_sqrt=True if eps_in_sqrt is None else eps_in_sqrt,
    centered=st.mu is not None,
    safe_divide=True,
  )
  return last_step_size(st, cfg, Hyperparams(learning_rate=opt, eps=eps))


def dequantize_state(state: Any) -> Any:
  """``state`` with every moment of every RMSProp state as a float32 array.

  For inspection and export: ``nu``, ``mu`` and ``trace`` become trees shaped
  like the params, whatever their storage (8-bit codes with block scales from
  ``state_bits=8``, ``nu_dtype=bfloat16``, low-precision params). Complex
  moments stay complex (complex64). Anything else in ``state`` (counts,
  other transformations' states) is returned as it is.

  Args:
    state: an :class:`~rmsprop_jax.RMSPropState`, or any optimizer state
      containing some (``optax.chain``, ``optax.MultiSteps``, ...).

  Returns:
    The same structure, each RMSProp moment a float32 (or complex64) array.

  Example:
    >>> import jax.numpy as jnp
    >>> import rmsprop_jax
    >>> opt = rmsprop_jax.rmsprop(0.1, state_bits=8, min_quantize_size=256)
    >>> params = {"w": jnp.ones((4, 256))}
    >>> _, state = opt.update({"w": jnp.full((4, 256), 2.0)}, opt.init(params))
    >>> type(state.nu["w"]).__name__, state.nu["w"].codes.dtype
    ('QuantizedArray', dtype('uint8'))
    >>> nu = rmsprop_jax.dequantize_state(state).nu["w"]
    >>> nu.shape, nu.dtype, float(nu[0, 0])  # 0.1 * 2**2
    ((4, 256), dtype('float32'), 0.4)
  """
  is_ours = lambda x: isinstance(x, RMSPropState)

  def moment(x: Any) -> Any:
    if x is None:
      return None
    wide = jnp.complex64 if not isinstance(x, QuantizedArray) and jnp.iscomplexobj(x) else jnp.float32
    return load(x, wide)

  def convert(s: Any) -> Any:
    if not is_ours(s):
      return s
    is_q = lambda x: isinstance(x, QuantizedArray)
    tree = lambda t: None if t is None else jax.tree.map(moment, t, is_leaf=is_q)
    nu, mu = tree(s.nu), tree(s.mu)
    if s.mu is not None:  # centered 8-bit leaves keep nu - mu**2 (see the update)
      treedef = jax.tree.structure(s.nu, is_leaf=is_q)
      leaves = (treedef.flatten_up_to(t) for t in (s.nu, s.mu, nu, mu))
      nu = treedef.unflatten(
        [v + jnp.square(m) if is_centered_variance(qv, qm) else v for qv, qm, v, m in zip(*leaves)]
      )
    return s._replace(nu=nu, mu=mu, trace=tree(s.trace))

  return jax.tree.map(convert, state, is_leaf=is_ours)
