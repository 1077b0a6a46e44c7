"""Inspecting an RMSProp state: effective learning rates and friends."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _checks
from rmsprop_jax.quantize import QuantizedArray
from rmsprop_jax.storage import as_stored, is_centered_variance, is_stored_leaf, load
from rmsprop_jax.transform import (
  Config,
  Hyperparams,
  RMSPropState,
  last_step_size,
  recorded_settings,
  settings_of,
)


class _Injected(Protocol):
  """An ``optax.inject_hyperparams`` state (``InjectHyperparamsState`` or its stateful form)."""

  @property
  def hyperparams(self) -> Mapping[str, Any]: ...

  @property
  def inner_state(self) -> optax.OptState: ...


def find_state(state: optax.OptState) -> RMSPropState:
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
    hint = "; pass the part of the state that belongs to one of them" if len(found) > 1 else ""
    raise ValueError(f"state must contain exactly one RMSPropState, found {len(found)}{hint}")
  return found[0]


def effective_learning_rate(
  state: optax.OptState,
  opt: optax.GradientTransformation | optax.ScalarOrSchedule,
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

  Pass the optimizer: ours (:func:`rmsprop_jax.rmsprop`,
  :func:`rmsprop_jax.scale_by_rms`, a preset) or any wrapper around one of
  ours (``optax.chain``, ``optax.MultiSteps``, ``optax.apply_if_finite``,
  ``optax.masked``, ``optax.multi_transform``, ``optax.inject_hyperparams``,
  the transformation given to Flax's ``nnx.Optimizer``). Its learning rate or
  schedule, eps and its placement, bias correction and zero-denominator rule
  are then the update's own; hyperparameters injected by
  ``inject_hyperparams`` are read from the state, as the last step used them
  (or as you changed them since). Ours is found by running ``opt.init``
  abstractly (``jax.eval_shape``: nothing is allocated). Where that cannot
  tell (two of ours in one ``multi_transform``; a wrapper whose ``init``
  needs more than the shapes), it raises a ``TypeError``: then pass our
  transformation itself, with the whole state.

  Under a chain, "effective" is relative to the gradient our transformation
  receives (after clipping or any earlier transformation), and excludes what
  later transformations do to its output. For
  :func:`~rmsprop_jax.scale_by_rms` (no learning rate) it is the scale
  ``1 / sqrt(nu + eps)``. It is computed from the stored state: with
  ``nu_dtype=bfloat16`` or ``state_bits=8`` it differs from the factor of
  the last step (which divided by the exact float32 ``nu``) by the rounding
  of the stored ``nu``.

  The older form ``effective_learning_rate(state, learning_rate, eps=1e-8,
  *, eps_in_sqrt=True)`` still works where it cannot be wrong unnoticed: it
  warns (``FutureWarning``) when ``eps`` is not given, and raises a
  ``TypeError`` on a state with hyperparameters injected by
  ``inject_hyperparams`` (the learning rate passed may not be the one used).

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
  if hasattr(opt, "init") and hasattr(opt, "update"):
    if eps is not None or eps_in_sqrt is not None:
      raise TypeError(
        "effective_learning_rate(state, opt) takes eps and eps_in_sqrt from opt;"
        " pass them only with a learning rate"
      )
    cfg, hp = _settings_for(opt, state, st)
    return last_step_size(st, cfg, hp)
  injected = _injected(state, st)
  if injected is not None:
    raise TypeError(
      "effective_learning_rate(state, learning_rate): this state holds hyperparameters"
      f" injected by optax.inject_hyperparams ({', '.join(sorted(injected.hyperparams))}),"
      " which may differ from the learning rate passed; pass the optimizer instead:"
      " effective_learning_rate(state, opt)"
    )
  _checks.check_learning_rate("learning_rate", opt)
  if eps is None:
    warnings.warn(
      "effective_learning_rate(state, learning_rate) assumes eps=1e-8 (inside the root unless"
      " eps_in_sqrt=False) when eps is not given; pass the optimizer,"
      " effective_learning_rate(state, opt), to use its own",
      FutureWarning,
      stacklevel=2,
    )
  eps = 1e-8 if eps is None else eps
  _checks.check_scalar("eps", eps, 0.0)
  cfg = Config(
    eps_in_sqrt=True if eps_in_sqrt is None else eps_in_sqrt,
    centered=st.mu is not None,
    safe_divide=True,
  )
  return last_step_size(st, cfg, Hyperparams(learning_rate=opt, eps=eps))


def _is_injected(x: object) -> bool:
  """An ``optax.inject_hyperparams`` state (stateful or not)."""
  return isinstance(x, tuple) and hasattr(x, "hyperparams") and hasattr(x, "inner_state")


def _injected(state: optax.OptState, st: RMSPropState) -> _Injected | None:
  """The innermost ``inject_hyperparams`` state in ``state`` that holds ``st``."""
  is_ours = lambda x: isinstance(x, RMSPropState)
  found: _Injected | None = None
  stack = [state]
  while stack:
    node = stack.pop()
    for x in jax.tree.leaves(node, is_leaf=lambda x: _is_injected(x) or is_ours(x)):
      if _is_injected(x):
        inner = jax.tree.leaves(x.inner_state, is_leaf=is_ours)
        if any(s is st for s in inner):
          found = x
          stack.append(x.inner_state)
  return found


def _stand_in_params(st: RMSPropState) -> optax.Params:
  """A tree of ``jax.ShapeDtypeStruct`` shaped like the params ``st`` was built for."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  is_leaf = lambda x: is_stored_leaf(x) or is_masked(x)

  def one(x: Any) -> jax.ShapeDtypeStruct | optax.MaskedNode:
    if is_masked(x):
      return x
    x = as_stored(x)
    if isinstance(x, QuantizedArray):
      return jax.ShapeDtypeStruct(x.shape, jnp.float32)
    dtype = x.dtype if x.dtype in (jnp.float64, jnp.complex64, jnp.complex128) else jnp.float32
    return jax.ShapeDtypeStruct(x.shape, dtype)

  return jax.tree.map(one, st.nu, is_leaf=is_leaf)


def _settings_for(
  opt: optax.GradientTransformation, state: optax.OptState, st: RMSPropState
) -> tuple[Config, Hyperparams]:
  """The ``(Config, Hyperparams)`` the step that produced ``st`` used.

  ``opt`` is ours, or a wrapper around one of ours (found by running its
  ``init`` abstractly); hyperparameters that ``optax.inject_hyperparams``
  injected are read from its state, as the step used them.
  """
  settings = settings_of(opt)
  if settings is None:
    found, error = recorded_settings(opt, _stand_in_params(st))
    distinct = list({id(s): s for s in found}.values())
    if len(distinct) != 1:
      what = (
        "no rmsprop_jax transformation" if not distinct else f"{len(distinct)} rmsprop_jax transformations"
      )
      why = "" if error is None else f" (its init on stand-in params raised {type(error).__name__}: {error})"
      raise TypeError(
        f"effective_learning_rate: opt.init reaches {what}{why}; pass the rmsprop_jax"
        " transformation itself (the one inside the wrapper) as opt, with the wrapper's state"
      )
    settings = distinct[0]
  cfg, hp, names = settings
  injected = _injected(state, st)
  if injected is not None:
    values = {f: injected.hyperparams[n] for f, n in names if n in injected.hyperparams}
    hp = hp._replace(**values)
  unknown = [
    f for f, v in hp._asdict().items() if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(v))
  ]
  if unknown:
    raise TypeError(
      f"effective_learning_rate: the {', '.join(unknown)} of this optimizer is computed inside a"
      " wrapper that its state does not record; pass the rmsprop_jax transformation itself, built"
      " with the values the step used"
    )
  return cfg, hp


def dequantize_state(state: optax.OptState) -> optax.OptState:
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

  def moment(x: Any) -> jax.Array | None:
    if x is None:
      return None
    x = as_stored(x)  # Flax NNX keeps 8-bit codes as a {codes, scale} mapping
    wide = jnp.complex64 if not isinstance(x, QuantizedArray) and jnp.iscomplexobj(x) else jnp.float32
    return load(x, wide)

  def convert(s: Any) -> Any:
    if not is_ours(s):
      return s
    tree = lambda t: None if t is None else jax.tree.map(moment, t, is_leaf=is_stored_leaf)
    nu, mu = tree(s.nu), tree(s.mu)
    if s.mu is not None:  # centered 8-bit leaves keep nu - mu**2 (see the update)
      treedef: jax.tree_util.PyTreeDef = jax.tree.structure(s.nu, is_leaf=is_stored_leaf)
      stored = [[as_stored(x) for x in treedef.flatten_up_to(t)] for t in (s.nu, s.mu)]
      wide = (treedef.flatten_up_to(t) for t in (nu, mu))
      nu = treedef.unflatten(
        [v + jnp.square(m) if is_centered_variance(qv, qm) else v for qv, qm, v, m in zip(*stored, *wide)]
      )
    return s._replace(nu=nu, mu=mu, trace=tree(s.trace))

  return jax.tree.map(convert, state, is_leaf=is_ours)
