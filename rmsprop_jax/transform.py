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

Outside a user's ``jit`` (including under an un-jitted ``vmap`` or ``grad``)
the whole tree update is a single cached XLA call instead of hundreds of
op-by-op dispatches; inside one it is traced inline (with ``lax`` primitives,
cheap to trace) and fuses into elementwise loops per leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

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
  mu: optax.Updates | None = None
  trace: optax.Updates | None = None


class Config(NamedTuple):
  """Static options of the fused update: which steps run and in which order."""

  eps_in_sqrt: bool = True
  centered: bool = False
  bias_correction: bool = False
  nu_dtype: Any = None
  momentum: bool = False
  nesterov: bool = False
  scale_by_learning_rate: bool = True
  schedule: Callable[[chex.Numeric], chex.Numeric] | None = None
  lr_inside_momentum: bool = True
  weight_decay: str | None = None
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
# Per-leaf steps. They use `lax` primitives on arrays of one dtype with
# scalar constants of that dtype (`_Consts`): tracing a 600-leaf update then
# costs a fraction of what `jnp` operators (each a small jit of its own) cost.
# ---------------------------------------------------------------------------


class _Consts(NamedTuple):
  """The update's scalars, converted once per dtype (None where unused)."""

  decay: Any
  one_minus_decay: Any
  eps: Any
  momentum: Any
  weight_decay: Any
  neg_lr: Any
  decoupled_wd: Any
  bias_corr: Any
  zero: Any
  one: Any


def _compute_dtype(dtype: Any) -> Any:
  """float32 for low-precision floats, else the dtype itself (complex kept)."""
  return jnp.promote_types(dtype, jnp.float32)


def _real_dtype(dtype: Any) -> Any:
  return jnp.finfo(dtype).dtype


def _cast(x: jax.Array, dtype: Any) -> jax.Array:
  """``x.astype(dtype)``, skipped (no trace work) when it is already that."""
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


def _abs_sq(x: jax.Array) -> jax.Array:
  """``|x|**2``, real for complex ``x`` (as optax's ``numerics.abs_sq``)."""
  if jnp.iscomplexobj(x):
    return lax.real(lax.mul(lax.conj(x), x))
  return lax.mul(x, x)


def _direction(g, p, c: _Consts, cfg: Config):
  """The gradient the moments see: ``-g`` if maximizing, plus ``wd * p``."""
  if cfg.maximize:
    g = lax.neg(g)
  if cfg.weight_decay == "coupled":
    g = lax.add(g, lax.mul(c.weight_decay, _cast(p, g.dtype)))
  return g


def _ema(moment, x, c: _Consts):
  """``decay * moment + (1 - decay) * x``, in optax's operand order."""
  return lax.add(lax.mul(c.one_minus_decay, x), lax.mul(c.decay, moment))


def _debias(moment, c: _Consts):
  return moment if c.bias_corr is None else lax.div(moment, c.bias_corr)


def _rms_scale(nu_hat, mu_hat, r: _Consts, cfg: Config):
  """The preconditioner ``1 / sqrt(nu - |mu|^2 + eps)`` (or eps outside)."""
  var = nu_hat
  if mu_hat is not None:
    # The variance is >= 0 in exact arithmetic; rounding may push it below.
    var = lax.max(lax.sub(nu_hat, _abs_sq(mu_hat)), r.zero)
  if cfg.eps_in_sqrt:
    denom = lax.add(var, r.eps)
    scale = lax.rsqrt(denom)
  else:
    denom = lax.add(lax.sqrt(var), r.eps)
    scale = lax.div(r.one, denom)
  if cfg.safe_divide:  # eps may be 0: a zero denominator scales by 0, not inf
    scale = lax.select(lax.gt(denom, lax.full_like(denom, 0)), scale, lax.full_like(scale, 0))
  return scale


def _momentum(u, trace, c: _Consts, cfg: Config):
  """Heavy-ball (or Nesterov) momentum: ``trace = u + momentum * trace``."""
  trace = lax.add(u, lax.mul(c.momentum, trace))
  out = lax.add(u, lax.mul(c.momentum, trace)) if cfg.nesterov else trace
  return out, trace


def _leaf_update(g, p, nu, mu, trace, consts: Callable[[Any], _Consts], cfg: Config):
  """One leaf of the fused update; returns ``(update, nu, mu, trace)``.

  When ``nu`` is stored narrower than it is computed (``nu_dtype=bfloat16``,
  or bfloat16 params), the step divides by the *stored*, rounded value: the
  trajectory is then a function of the state alone, and XLA can update ``nu``
  in place and read it once (16 instead of 20+ bytes per parameter).
  """
  out_dtype = g.dtype
  cdt = _compute_dtype(g.dtype)
  rdt = _real_dtype(cdt)
  c, r = consts(cdt), consts(rdt)
  g = _direction(_cast(g, cdt), p, c, cfg)
  store_dtype = cfg.nu_dtype or nu.dtype
  nu = _ema(_cast(nu, rdt), _abs_sq(g), r)
  if store_dtype != rdt:
    nu = _cast(_cast(nu, store_dtype), rdt)  # round to storage first
  mu_hat = None
  if cfg.centered:
    mu = _ema(_cast(mu, cdt), g, c)
    mu_hat = _debias(mu, c)
  u = lax.mul(_cast(_rms_scale(_debias(nu, r), mu_hat, r, cfg), cdt), g)
  if cfg.scale_by_learning_rate:
    if not cfg.momentum:
      u = lax.mul(c.neg_lr, u)
    elif cfg.lr_inside_momentum:  # optax, Keras, TF1
      u, trace = _momentum(lax.mul(c.neg_lr, u), _cast(trace, cdt), c, cfg)
    else:  # PyTorch: the buffer holds unscaled steps
      u, trace = _momentum(u, _cast(trace, cdt), c, cfg)
      u = lax.mul(c.neg_lr, u)
    if cfg.weight_decay == "decoupled":
      u = lax.sub(u, lax.mul(c.decoupled_wd, _cast(p, cdt)))
  return _cast(u, out_dtype), nu, mu, trace


# ---------------------------------------------------------------------------
# Tree level: the whole update and init as single functions of whole trees.
# ---------------------------------------------------------------------------


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
  scalars = {
      "decay": hp.decay,
      "one_minus_decay": hp.one_minus_decay,
      "eps": hp.eps,
      "momentum": hp.momentum if cfg.momentum else None,
      "weight_decay": hp.weight_decay if cfg.weight_decay else None,
      "neg_lr": None,
      "decoupled_wd": None,
      "bias_corr": 1 - hp.decay**count_inc if cfg.bias_correction else None,
      "zero": 0.0,
      "one": 1.0,
  }
  if cfg.scale_by_learning_rate:
    if cfg.schedule is not None:
      lr = cfg.schedule(state.count)  # the count before this step, as optax
    else:
      lr = hp.learning_rate
    scalars["neg_lr"] = -lr  # the learning rate is negated once, here
    if cfg.weight_decay == "decoupled":
      scalars["decoupled_wd"] = lr * hp.weight_decay

  @functools.cache
  def consts(dtype) -> _Consts:
    """The scalars as 0-d arrays of ``dtype`` (converted once per dtype)."""
    return _Consts(**{
        k: None if v is None else lax.convert_element_type(v, dtype)
        for k, v in scalars.items()
    })

  out = [
      _leaf_update(g, p, nu, mu, tr, consts, cfg)
      for g, p, nu, mu, tr in zip(g_leaves, p_leaves, nu_leaves, mu_leaves, tr_leaves)
  ]
  new_u, new_nu, new_mu, new_tr = (list(col) for col in zip(*out)) if out else ([],) * 4
  nu_store = [_cast(n, cfg.nu_dtype or old.dtype) for n, old in zip(new_nu, nu_leaves)]
  unflat = functools.partial(jax.tree.unflatten, treedef)
  new_state = RMSPropState(
      count=count_inc,
      nu=unflat(nu_store),
      mu=unflat([_cast(m, o.dtype) for m, o in zip(new_mu, mu_leaves)])
      if cfg.centered
      else None,
      trace=unflat([_cast(t, o.dtype) for t, o in zip(new_tr, tr_leaves)])
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


# Unless a program is being staged around it, an update is one call of a cached
# compiled program (hyperparameters are its arguments, so new values do not
# recompile); under an un-jitted vmap or grad it is that program, batched or
# differentiated, not op-by-op dispatch. Inside a user's jit/scan the plain
# functions are traced inline instead: the outer program compiles them, and
# XLA need not inline a nested computation (8% more compile time on 600 leaves).
_update_jit = jax.jit(_update_tree, static_argnames=("cfg",))
_init_jit = jax.jit(_init_tree, static_argnames=("cfg",))


def _in_trace(*trees: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def _current_trace() -> Any:
  from jax._src import core as jax_core

  return jax_core.trace_ctx.trace


def _staging(*trees: Any) -> bool:
  """Whether a jit/scan/... trace is building a program around this call.

  Walks the current trace and its parents (vmap and grad traces sit on top of
  the one they were called in). If JAX's internals ever change shape, falls
  back to "any argument is a tracer", which is always correct, only slower
  under an un-jitted vmap.
  """
  try:
    trace = _current_trace()
    while trace is not None:
      if "Jaxpr" in type(trace).__name__:  # DynamicJaxprTrace, JaxprTrace
        return True
      trace = getattr(trace, "parent_trace", None)
    return False
  except Exception:
    return _in_trace(*trees)


def fused_rmsprop(cfg: Config, hp: Hyperparams) -> optax.GradientTransformationExtraArgs:
  """Builds the transformation for a validated ``cfg`` and ``hp``.

  This is the one implementation behind :func:`scale_by_rms`,
  :func:`rmsprop_jax.rmsprop` and every preset; it does no validation of its
  own beyond the tree checks in ``init`` and ``update``.
  """
  if cfg.nu_dtype is not None:
    nu_dtype = jnp.dtype(cfg.nu_dtype)
    if not jnp.issubdtype(nu_dtype, jnp.floating):
      raise TypeError(f"nu_dtype must be a real floating dtype, got {nu_dtype}")
    cfg = cfg._replace(nu_dtype=nu_dtype)
  eps_may_be_zero = not _checks.is_concrete(hp.eps) or np.min(np.asarray(hp.eps)) == 0.0
  if eps_may_be_zero:
    cfg = cfg._replace(safe_divide=True)

  def init_fn(params: optax.Params) -> RMSPropState:
    _checks.check_float_params(params)
    init = _init_tree if _staging(params, hp) else _init_jit
    return init(params, hp.initial_scale, cfg)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    update = _update_tree if _staging(updates, state.count, hp) else _update_jit
    if cfg.weight_decay is None:
      params = None  # unused: not worth passing to the compiled update
    return update(updates, state, params, hp, cfg)

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
      its memory); the arithmetic is done in float32 or wider regardless, and
      the step divides by the stored (rounded) ``nu``. None keeps the
      parameters' (real) dtype.

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
