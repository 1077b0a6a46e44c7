"""The core: RMSProp's state, its per-leaf steps, and the fused update.

Everything RMSProp-like in this package is one transformation, built here by
:func:`fused_rmsprop` from a static :class:`Config` (which steps run, in which
order) and dynamic :class:`Hyperparams` (numbers that may be arrays or
tracers). It computes, per leaf and in this order, the same chain as optax's
``chain(scale_by_rms | scale_by_stddev, scale_by_learning_rate, trace)``:

1. ``_direction``: the gradient RMSProp sees (maximize, coupled weight decay);
2. ``_ema``: the second moment ``nu`` (and the first moment ``mu`` if centered);
3. ``_rms_scale``: ``1 / sqrt(nu + eps)`` or ``1 / (sqrt(nu) + eps)``;
4. ``_momentum`` and the learning rate, in either order;
5. decoupled weight decay.

The whole tree update is one ``jax.jit``-compiled function (``inline=True``):
outside a user's ``jit`` an update is a single cached XLA call instead of
hundreds of op-by-op dispatches, and inside one it inlines and fuses into one
elementwise pass per leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _checks

WEIGHT_DECAY_MODES = ("coupled", "decoupled")


class RMSPropState(NamedTuple):
  """State of :func:`rmsprop_jax.rmsprop` and :func:`scale_by_rms`.

  Attributes:
    count: int32 scalar, the number of updates taken (saturating).
    nu: exponential moving average of ``|g|**2``, one leaf per parameter, in
      the parameter's real dtype or ``nu_dtype``.
    mu: exponential moving average of ``g`` when ``centered=True``, else None.
    trace: the momentum buffer when ``momentum`` is set, else None.
  """

  count: chex.Array
  nu: optax.Updates
  mu: Optional[optax.Updates] = None
  trace: Optional[optax.Updates] = None


class Config(NamedTuple):
  """Static options of the fused update: which steps run and in which order."""

  eps_in_sqrt: bool = True
  centered: bool = False
  bias_correction: bool = False
  nu_dtype: Any = None
  momentum: bool = False
  nesterov: bool = False
  scale_by_learning_rate: bool = True
  schedule: Optional[Callable[[chex.Numeric], chex.Numeric]] = None
  lr_inside_momentum: bool = True
  weight_decay: Optional[str] = None
  maximize: bool = False
  safe_divide: bool = False


class Hyperparams(NamedTuple):
  """Numeric hyperparameters: Python floats, arrays or tracers."""

  learning_rate: Any = None
  decay: Any = 0.9
  one_minus_decay: Any = 0.1
  eps: Any = 1e-8
  momentum: Any = None
  weight_decay: Any = None
  initial_scale: Any = 0.0


def make_hyperparams(**kwargs: Any) -> Hyperparams:
  """Builds :class:`Hyperparams`, computing ``1 - decay`` once, up front.

  For a Python float ``decay`` this is done in float64, as optax, PyTorch and
  Keras do, so the float32 factor is ``f32(1 - decay)``, not the less exact
  ``1 - f32(decay)``.
  """
  decay = kwargs.get("decay", 0.9)
  return Hyperparams(one_minus_decay=1 - decay, **kwargs)


# ---------------------------------------------------------------------------
# Per-leaf steps. Each takes and returns arrays in the compute dtype.
# ---------------------------------------------------------------------------


def _compute_dtype(dtype: Any) -> Any:
  """float32 for low-precision floats, else the dtype itself (complex kept)."""
  return jnp.promote_types(dtype, jnp.float32)


def _real_dtype(dtype: Any) -> Any:
  return jnp.finfo(dtype).dtype


def _abs_sq(x: jax.Array) -> jax.Array:
  """``|x|**2``, real for complex ``x`` (as optax's ``numerics.abs_sq``)."""
  if jnp.iscomplexobj(x):
    return (x.conj() * x).real
  return x * x


def _direction(g, p, hp: Hyperparams, cfg: Config):
  """The gradient the moments see: ``-g`` if maximizing, plus ``wd * p``."""
  if cfg.maximize:
    g = -g
  if cfg.weight_decay == "coupled":
    g = g + hp.weight_decay * p.astype(g.dtype)
  return g


def _ema(moment, x, hp: Hyperparams):
  """``decay * moment + (1 - decay) * x``, in optax's operand order."""
  return hp.one_minus_decay * x + hp.decay * moment


def _rms_scale(nu_hat, mu_hat, hp: Hyperparams, cfg: Config):
  """The preconditioner ``1 / sqrt(nu - |mu|^2 + eps)`` (or eps outside)."""
  var = nu_hat
  if mu_hat is not None:
    # The variance is >= 0 in exact arithmetic; rounding may push it below.
    var = jnp.maximum(nu_hat - _abs_sq(mu_hat), 0)
  if cfg.eps_in_sqrt:
    denom_sq = var + hp.eps
    scale = jax.lax.rsqrt(denom_sq)
    if cfg.safe_divide:
      scale = jnp.where(denom_sq > 0, scale, 0)
  else:
    denom = jnp.sqrt(var) + hp.eps
    scale = 1 / denom
    if cfg.safe_divide:
      scale = jnp.where(denom > 0, scale, 0)
  return scale


def _momentum(u, trace, hp: Hyperparams, cfg: Config):
  """Heavy-ball (or Nesterov) momentum: ``trace = u + momentum * trace``."""
  trace = u + hp.momentum * trace
  out = u + hp.momentum * trace if cfg.nesterov else trace
  return out, trace


def _leaf_update(g, p, nu, mu, trace, lr, bias_corr, hp: Hyperparams, cfg: Config):
  """One leaf of the fused update; returns ``(update, nu, mu, trace)``."""
  out_dtype = g.dtype
  cdt = _compute_dtype(g.dtype)
  g = _direction(g.astype(cdt), p, hp, cfg)
  nu = _ema(nu.astype(_real_dtype(cdt)), _abs_sq(g), hp)
  nu_hat = nu if bias_corr is None else nu / bias_corr.astype(nu.dtype)
  mu_hat = None
  if cfg.centered:
    mu = _ema(mu.astype(cdt), g, hp)
    mu_hat = mu if bias_corr is None else mu / bias_corr.astype(mu.dtype)
  u = _rms_scale(nu_hat, mu_hat, hp, cfg) * g
  if cfg.scale_by_learning_rate:
    neg_lr = -jnp.asarray(lr, dtype=_real_dtype(cdt))
    if not cfg.momentum:
      u = neg_lr * u
    elif cfg.lr_inside_momentum:  # optax, Keras, TF1
      u, trace = _momentum(neg_lr * u, trace.astype(cdt), hp, cfg)
    else:  # PyTorch: the buffer holds unscaled steps
      u, trace = _momentum(u, trace.astype(cdt), hp, cfg)
      u = neg_lr * u
    if cfg.weight_decay == "decoupled":
      u = u - (lr * hp.weight_decay) * p.astype(cdt)
  return u.astype(out_dtype), nu, mu, trace


# ---------------------------------------------------------------------------
# Tree level: one compiled function for the whole update.
# ---------------------------------------------------------------------------


def _is_none(x: Any) -> bool:
  return x is None


@functools.partial(jax.jit, static_argnames=("cfg",), inline=True)
def _update_tree(updates, state: RMSPropState, params, hp: Hyperparams, cfg: Config):
  """Applies :func:`_leaf_update` to every leaf; checks shapes at trace time."""
  _checks.check_same_tree("updates", updates, state.nu, "state.nu")
  needs_params = cfg.weight_decay is not None
  if needs_params:
    if params is None:
      raise ValueError(
          "params must be passed to update(updates, state, params) when"
          " weight_decay is used"
      )
    _checks.check_same_tree("params", params, updates, "updates")
  g_leaves, treedef = jax.tree.flatten(updates)
  nu_leaves = treedef.flatten_up_to(state.nu)
  none = [None] * len(g_leaves)
  p_leaves = treedef.flatten_up_to(params) if needs_params else none
  mu_leaves = treedef.flatten_up_to(state.mu) if cfg.centered else none
  tr_leaves = treedef.flatten_up_to(state.trace) if cfg.momentum else none

  count_inc = optax.safe_increment(state.count)
  if cfg.schedule is not None:
    lr = cfg.schedule(state.count)  # the count before this step, as optax
  else:
    lr = hp.learning_rate
  bias_corr = 1 - hp.decay**count_inc if cfg.bias_correction else None

  out = [
      _leaf_update(g, p, nu, mu, tr, lr, bias_corr, hp, cfg)
      for g, p, nu, mu, tr in zip(g_leaves, p_leaves, nu_leaves, mu_leaves, tr_leaves)
  ]
  new_u, new_nu, new_mu, new_tr = (list(col) for col in zip(*out)) if out else ([],) * 4
  nu_store = [
      n.astype(cfg.nu_dtype or old.dtype) for n, old in zip(new_nu, nu_leaves)
  ]
  unflat = functools.partial(jax.tree.unflatten, treedef)
  new_state = RMSPropState(
      count=count_inc,
      nu=unflat(nu_store),
      mu=unflat([m.astype(o.dtype) for m, o in zip(new_mu, mu_leaves)])
      if cfg.centered
      else None,
      trace=unflat([t.astype(o.dtype) for t, o in zip(new_tr, tr_leaves)])
      if cfg.momentum
      else None,
  )
  return unflat(new_u), new_state


def _full_like(p: jax.Array, value: Any, dtype: Any) -> jax.Array:
  """``full_like(p, value, dtype)`` that keeps ``p``'s sharding under ``jit``.

  A plain ``jnp.full_like`` has no data dependence on ``p``, so XLA places
  it on one device; selecting from ``p`` lets sharding propagate from ``p``.
  """
  src = p.real if jnp.iscomplexobj(p) and not jnp.issubdtype(dtype, jnp.complexfloating) else p
  keep = jnp.zeros(p.shape, dtype=bool)
  return jnp.where(keep, src.astype(dtype), jnp.asarray(value, dtype=dtype))


@functools.partial(jax.jit, static_argnames=("cfg",), inline=True)
def _init_tree(params, initial_scale, cfg: Config) -> RMSPropState:
  def nu_like(p):
    dtype = cfg.nu_dtype or _real_dtype(jnp.result_type(p))
    return _full_like(p, initial_scale, dtype)

  def zeros_like(p):
    return _full_like(p, 0, jnp.result_type(p))

  return RMSPropState(
      count=jnp.zeros([], jnp.int32),
      nu=jax.tree.map(nu_like, params),
      mu=jax.tree.map(zeros_like, params) if cfg.centered else None,
      trace=jax.tree.map(zeros_like, params) if cfg.momentum else None,
  )


def fused_rmsprop(cfg: Config, hp: Hyperparams) -> optax.GradientTransformationExtraArgs:
  """Builds the transformation for a validated ``cfg`` and ``hp``.

  This is the one implementation behind :func:`scale_by_rms`,
  :func:`rmsprop_jax.rmsprop` and every preset; it does no validation of its
  own beyond the tree checks in ``init`` and ``update``.
  """
  if cfg.nu_dtype is not None:
    cfg = cfg._replace(nu_dtype=jnp.dtype(cfg.nu_dtype))
  if not _checks.is_concrete(hp.eps):
    cfg = cfg._replace(safe_divide=True)
  elif float(np.min(np.asarray(hp.eps))) == 0.0:
    cfg = cfg._replace(safe_divide=True)

  def init_fn(params: optax.Params) -> RMSPropState:
    _checks.check_float_params(params)
    return _init_tree(params, hp.initial_scale, cfg)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return _update_tree(updates, state, params, hp, cfg)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_rms(
    decay: jax.typing.ArrayLike = 0.9,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_in_sqrt: bool = True,
    initial_scale: jax.typing.ArrayLike = 0.0,
    centered: bool = False,
    bias_correction: bool = False,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by the root of an exponential moving average of squares.

  The learning-rate-free half of RMSProp, a drop-in for optax's
  ``scale_by_rms`` (and ``scale_by_stddev`` when ``centered=True``):

  .. math::

    \nu_t = \rho\,\nu_{t-1} + (1-\rho)\,|g_t|^2, \qquad
    u_t = \frac{g_t}{\sqrt{\nu_t - |\mu_t|^2 + \epsilon}}

  with :math:`\mu_t = \rho\,\mu_{t-1} + (1-\rho)\,g_t` if centered (else
  :math:`\mu_t = 0`) and :math:`\epsilon` outside the root if
  ``eps_in_sqrt=False``.

  Args:
    decay: :math:`\rho`, the EMA decay in [0, 1]. 0.9 as in Hinton's lecture
      and optax.
    eps: :math:`\epsilon` >= 0, keeps the denominator away from zero. With
      ``eps=0`` a zero denominator gives a zero update instead of NaN.
    eps_in_sqrt: add ``eps`` inside the root (optax, Keras, TF1) rather than
      outside it (PyTorch).
    initial_scale: initial value of ``nu``; 0 (PyTorch, optax) or 1 (TF1).
    centered: divide by the root of the variance estimate ``nu - mu**2``
      (Graves, 2013) instead of the second moment.
    bias_correction: divide ``nu`` (and ``mu``) by ``1 - decay**t``.
    nu_dtype: dtype in which ``nu`` is stored (e.g. ``jnp.bfloat16`` halves
      its memory); the arithmetic is done in float32 or wider regardless.
      None keeps the parameters' (real) dtype.

  Returns:
    An :class:`optax.GradientTransformation` whose state is an
    :class:`RMSPropState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import scale_by_rms
    >>> tx = scale_by_rms(decay=0.9, eps=0.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> u, state = tx.update(jnp.array([2.0, -0.5]), state)
    >>> u  # g / sqrt(0.1 g**2) = sign(g) * sqrt(10)
    Array([ 3.1622777, -3.1622777], dtype=float32)

  References:
    Hinton, Lecture 6e of "Neural Networks for Machine Learning", 2012.
    Graves, "Generating Sequences With Recurrent Neural Networks", 2013.
  """
  _checks.check_scalar("decay", decay, 0.0, 1.0)
  _checks.check_scalar("eps", eps, 0.0)
  _checks.check_scalar("initial_scale", initial_scale, 0.0)
  cfg = Config(
      eps_in_sqrt=eps_in_sqrt,
      centered=centered,
      bias_correction=bias_correction,
      nu_dtype=nu_dtype,
      scale_by_learning_rate=False,
  )
  hp = make_hyperparams(decay=decay, eps=eps, initial_scale=initial_scale)
  return fused_rmsprop(cfg, hp)
