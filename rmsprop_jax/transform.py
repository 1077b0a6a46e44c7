"""The core: RMSProp's state, its per-leaf steps, and the fused update.

Everything RMSProp-like in this package is one transformation, built here by
:func:`fused_rmsprop` from a static :class:`Config` (hashable flags: which
steps run, in which order) and :class:`Hyperparams` (the user's numbers, which
may be floats, arrays, tracers or schedules). It computes, per leaf and in this
order, the same chain as optax's ``chain(scale_by_rms | scale_by_stddev,
scale_by_learning_rate, trace)``:

1. ``_direction``: the gradient RMSProp sees (maximize, coupled weight decay);
2. ``_ema``: the second moment ``nu`` (and the first moment ``mu`` if centered);
3. ``_rms_scale``: ``1 / sqrt(nu + eps)`` or ``1 / (sqrt(nu) + eps)``;
4. ``_momentum`` and the learning rate, in either order;
5. decoupled weight decay.

Each update first evaluates this step's numbers (:func:`step_scalars`: the
schedules, ``1 - decay``, the bias correction) and then runs the tree update
(:func:`_update_tree`) as ``jax.jit(..., inline=True)``: called eagerly, and
under an un-jitted ``vmap`` or ``grad``, it is one cached XLA program (the
numbers are its arguments, so new values and new schedule objects reuse it);
inside a user's ``jit`` or ``scan`` it is inlined into the caller's program.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from rmsprop_jax import _checks, quantize
from rmsprop_jax.quantize import QuantizedArray

WEIGHT_DECAY_MODES = ("coupled", "decoupled")
ROUNDINGS = ("stochastic", "nearest")


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
  """Static options of the fused update: hashable flags that select its steps.

  It is the static part of the compiled update's cache key, so it holds no
  numbers and no callables: optimizers with equal flags share one compiled
  program whatever their hyperparameters and schedules.
  """

  eps_in_sqrt: bool = True
  centered: bool = False
  bias_correction: bool = False
  nu_dtype: np.dtype | None = None
  momentum: bool = False
  nesterov: bool = False
  scale_by_learning_rate: bool = True
  lr_inside_momentum: bool = True
  weight_decay: str | None = None
  maximize: bool = False
  safe_divide: bool = False
  rounding: str = "stochastic"
  state_bits: int | None = None
  min_quantize_size: int = quantize.MIN_QUANTIZE_SIZE


class Hyperparams(NamedTuple):
  """The user's numbers: floats, arrays or tracers.

  ``learning_rate`` and ``decay`` may also be schedules ``count -> value``.
  """

  learning_rate: Any = None
  decay: Any = 0.9
  eps: Any = 1e-8
  momentum: Any = None
  weight_decay: Any = None
  initial_scale: Any = 0.0
  seed: Any = 0


class StepScalars(NamedTuple):
  """One step's numbers: arguments, not constants, of the compiled update.

  None where the configuration does not use them.
  """

  decay: Any
  one_minus_decay: Any
  eps: Any
  momentum: Any
  weight_decay: Any
  neg_lr: Any
  decoupled_wd: Any
  bias_corr: Any
  seed: Any  # of the random bits for stochastic rounding (not converted)
  count: Any  # steps taken before this one (not converted)


def _value_at(value: Any, count: chex.Array) -> Any:
  """``value(count)`` for a schedule, else ``value``."""
  return value(count) if callable(value) else value


def step_scalars(hp: Hyperparams, count: chex.Array, cfg: Config) -> StepScalars:
  """Evaluates one step's numbers from ``hp`` and the steps taken before it.

  Schedules are called with ``count``, the number of steps taken before this
  one, as optax does. ``1 - decay`` of a Python float is formed in float64, as
  optax, PyTorch and Keras do, so its float32 value is ``f32(1 - decay)``, not
  the less exact ``1 - f32(decay)``.
  """
  decay = _value_at(hp.decay, count)
  neg_lr = decoupled_wd = None
  if cfg.scale_by_learning_rate:
    lr = _value_at(hp.learning_rate, count)
    neg_lr = -lr  # the learning rate is negated once, here
    if cfg.weight_decay == "decoupled":
      decoupled_wd = lr * hp.weight_decay
  return StepScalars(
    decay=decay,
    one_minus_decay=1 - decay,
    eps=hp.eps,
    momentum=hp.momentum if cfg.momentum else None,
    weight_decay=hp.weight_decay if cfg.weight_decay == "coupled" else None,
    neg_lr=neg_lr,
    decoupled_wd=decoupled_wd,
    # A constant decay only: fused_rmsprop refuses decay schedules with it.
    bias_corr=1 - decay ** optax.safe_increment(count) if cfg.bias_correction else None,
    seed=hp.seed,
    count=count,
  )


# ---------------------------------------------------------------------------
# Per-leaf steps. They use `lax` primitives on arrays of one dtype with
# scalar constants of that dtype (`_Consts`): tracing a 600-leaf update then
# costs a fraction of what `jnp` operators (each a small jit of its own) cost.
# ---------------------------------------------------------------------------


class _Consts(NamedTuple):
  """A step's scalars as 0-d arrays of one dtype (None where unused)."""

  s: StepScalars
  zero: jax.Array
  one: jax.Array


def _consts_factory(scalars: StepScalars) -> Callable[[Any], _Consts]:
  """``dtype -> _Consts``, converting each scalar once per dtype."""

  @functools.cache
  def consts(dtype: Any) -> _Consts:
    conv = lambda v: None if v is None else lax.convert_element_type(v, dtype)
    floats = scalars._replace(seed=None, count=None)
    converted = StepScalars(*map(conv, floats))._replace(seed=scalars.seed, count=scalars.count)
    return _Consts(converted, conv(0.0), conv(1.0))

  return consts


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


def _direction(g: jax.Array, p: jax.Array | None, c: _Consts, cfg: Config) -> jax.Array:
  """The gradient the moments see: ``-g`` if maximizing, plus ``wd * p``."""
  if cfg.maximize:
    g = lax.neg(g)
  if cfg.weight_decay == "coupled":
    g = lax.add(g, lax.mul(c.s.weight_decay, _cast(p, g.dtype)))
  return g


def _ema(moment: jax.Array, x: jax.Array, c: _Consts) -> jax.Array:
  """``decay * moment + (1 - decay) * x``, in optax's operand order."""
  return lax.add(lax.mul(c.s.one_minus_decay, x), lax.mul(c.s.decay, moment))


def _debias(moment: jax.Array, c: _Consts) -> jax.Array:
  return moment if c.s.bias_corr is None else lax.div(moment, c.s.bias_corr)


def _rms_scale(nu_hat: jax.Array, mu_hat: jax.Array | None, r: _Consts, cfg: Config) -> jax.Array:
  """The preconditioner ``1 / sqrt(nu - |mu|^2 + eps)`` (or eps outside)."""
  var = nu_hat
  if mu_hat is not None:
    # The variance is >= 0 in exact arithmetic; rounding may push it below.
    var = lax.max(lax.sub(nu_hat, _abs_sq(mu_hat)), r.zero)
  return _inv_rms(var, r, cfg)


def _inv_rms(var: jax.Array, r: _Consts, cfg: Config) -> jax.Array:
  """``1 / sqrt(var + eps)``, or ``1 / (sqrt(var) + eps)``, for ``var >= 0``."""
  if cfg.eps_in_sqrt:
    denom = lax.add(var, r.s.eps)
    scale = lax.rsqrt(denom)
  else:
    denom = lax.add(lax.sqrt(var), r.s.eps)
    scale = lax.div(r.one, denom)
  if cfg.safe_divide:  # eps may be 0: a zero denominator scales by 0, not inf
    scale = lax.select(lax.gt(denom, lax.full_like(denom, 0)), scale, lax.full_like(scale, 0))
  return scale


def _momentum(u: jax.Array, trace: jax.Array, c: _Consts, cfg: Config) -> tuple[jax.Array, jax.Array]:
  """Heavy-ball (or Nesterov) momentum: ``trace = u + momentum * trace``."""
  trace = lax.add(u, lax.mul(c.s.momentum, trace))
  out = lax.add(u, lax.mul(c.s.momentum, trace)) if cfg.nesterov else trace
  return out, trace


# ---------------------------------------------------------------------------
# Storage: each moment is kept in its parameter's dtype, in ``nu_dtype``, or
# as 8-bit block codes; it is computed in float32 (or wider) either way, and
# rounded to storage stochastically unless ``rounding="nearest"``.
# ---------------------------------------------------------------------------

_STREAMS = {"nu": 0, "mu": 1, "trace": 2}  # one stream of random bits per moment


class _Store(NamedTuple):
  """How one moment of one leaf is stored (static, decided from its shape)."""

  dtype: Any  # storage dtype of a plain array (unused when quantized)
  quantized: bool  # 8-bit codes and block scales
  signed: bool  # signed codes (first moments) or not (nu)
  stream: int  # index of the random-bit stream: 3 * leaf + moment


def _quantizable(shape: tuple[int, ...], dtype: Any, cfg: Config) -> bool:
  """8-bit storage for real leaves of rank >= 1 with >= min_quantize_size entries."""
  return (
    cfg.state_bits == 8
    and len(shape) >= 1
    and int(np.prod(shape)) >= cfg.min_quantize_size
    and not jnp.issubdtype(dtype, jnp.complexfloating)
  )


def _store_for(moment: str, p_shape: tuple[int, ...], p_dtype: Any, leaf: int, cfg: Config) -> _Store:
  real = _real_dtype(p_dtype)
  dtype = (cfg.nu_dtype or real) if moment == "nu" else jnp.dtype(p_dtype)
  return _Store(dtype, _quantizable(p_shape, p_dtype, cfg), moment != "nu", 3 * leaf + _STREAMS[moment])


def load(x: Any, dtype: Any) -> jax.Array:
  """A stored moment in compute dtype ``dtype`` (dequantized if 8-bit)."""
  if isinstance(x, QuantizedArray):
    return _cast(quantize.dequantize(x), dtype)
  return _cast(x, dtype)


def _bits(st: _Store, x: jax.Array, c: _Consts, cfg: Config) -> jax.Array | None:
  if cfg.rounding == "nearest":
    return None
  shape, sharding = tuple(x.shape), quantize._explicit_sharding(x)
  return quantize.random_bits(c.s.seed, c.s.count, st.stream, shape, out_sharding=sharding)


def _store(x: jax.Array, st: _Store, c: _Consts, cfg: Config) -> Any:
  """Rounds a computed moment to its storage (unbiased unless nearest)."""
  if st.quantized:
    return quantize.quantize(x, signed=st.signed, bits=_bits(st, x, c, cfg))
  if jnp.finfo(st.dtype).bits >= jnp.finfo(x.dtype).bits or jnp.iscomplexobj(x):
    return _cast(x, st.dtype)
  return quantize.round_to(x, st.dtype, _bits(st, x, c, cfg))


def _ema_quantized(q: QuantizedArray, x: jax.Array, st: _Store, r: _Consts, cfg: Config) -> QuantizedArray:
  """``decay * q + (1 - decay) * x`` for ``x >= 0``, in 8-bit codes."""
  if cfg.rounding == "nearest":
    # Rounding to nearest drops every change below half a code (biased: that is why it
    # is not the default). The exact block maximum, which moves every step, drops fewer
    # of them than the slowly moving bound below (notebook 06: +4.9% vs +58%).
    return _store(_ema(load(q, r.one.dtype), x, r), st, r, cfg)
  # One pass over the codes; the block scale is an upper bound from x alone.
  return quantize.ema_update(q, x, r.s.decay, r.s.one_minus_decay, bits=_bits(st, x, r, cfg))


def _floored(stored: jax.Array, floor: jax.Array) -> jax.Array:
  """``max(stored, floor)`` as a select: cheaper on CPU, and a NaN stored stays NaN."""
  return lax.select(lax.gt(floor, stored), floor, stored)


def _centered_variance(v: jax.Array, mu: jax.Array, r: _Consts) -> jax.Array:
  """``nu_hat - mu_hat**2`` from ``v = nu - mu**2``, debiased as the float path does."""
  if r.s.bias_corr is None:
    return v
  # nu / bc - mu**2 / bc**2 = v / bc - mu**2 (1 - bc) / bc**2, clamped as rounding may cross 0.
  bc = r.s.bias_corr
  var = lax.sub(lax.div(v, bc), lax.div(lax.mul(_abs_sq(mu), lax.sub(r.one, bc)), lax.mul(bc, bc)))
  return lax.max(var, r.zero)


def _centered_quantized(
  g: jax.Array, v: Any, mu: Any, v_st: _Store, mu_st: _Store, r: _Consts, cfg: Config
) -> tuple[jax.Array, Any, Any]:
  r"""Centered RMSProp with 8-bit moments: the state keeps the variance.

  ``nu - mu**2`` of two 8-bit moments (codes 6-12% apart) cancels where the
  variance is small next to ``nu``: it rounds to 0 and a step divides by
  ``sqrt(eps)``. In ``nu``'s place the state keeps :math:`v = \nu - \mu^2`,
  updated by the exact identity (Welford's, with exponential weights)

  .. math::

    v_t = \gamma\, v_{t-1} + (1 - \gamma)\, \gamma\, (g_t - \mu_{t-1})^2

  which subtracts nothing that can cancel. In exact arithmetic the step is the
  same; ``dequantize_state`` returns :math:`\nu = v + \mu^2`. The update
  takes :math:`\gamma (g_t - \mu_{t-1})^2 = (g_t - \mu_t)^2 / \gamma` from the
  new, stored :math:`\mu_t`; as ``nu`` is, ``v`` is floored by its lower bound
  :math:`(1 - \gamma)(g_t - \mu_t)^2 / \gamma` when the step divides by it.
  """
  dt = r.one.dtype
  mu = _store(_ema(load(mu, dt), g, r), mu_st, r, cfg)
  # decay (g - mu_{t-1})**2 = (g - mu_t)**2 / decay: from the new, stored mu, so that every
  # later loop reads the new codes (from the old ones XLA would copy them before their
  # update in place). decay = 0 keeps v = 0, as nu - mu**2 = g**2 - g**2.
  mu_new = load(mu, dt)
  dev = lax.sub(g, mu_new)
  decay = r.s.decay
  inv_decay = lax.select(
    lax.gt(decay, r.zero), lax.div(r.one, lax.max(decay, r.one * np.float32(1e-30))), r.zero
  )
  x = lax.mul(inv_decay, lax.mul(dev, dev))
  v = _ema_quantized(v, x, v_st, r, cfg)
  v_used = _floored(load(v, dt), lax.mul(r.s.one_minus_decay, x))
  return _centered_variance(v_used, mu_new, r), v, mu


class _Leaf(NamedTuple):
  """One leaf's update and new moments, as stored (None if unused)."""

  update: jax.Array
  nu: Any
  mu: Any
  trace: Any


def _leaf_update(
  g: jax.Array,
  p: jax.Array | None,
  nu: Any,
  mu: Any,
  trace: Any,
  leaf: int,
  consts: Callable[[Any], _Consts],
  cfg: Config,
) -> _Leaf:
  """One leaf of the fused update, from stored moments to stored moments.

  When ``nu`` is stored narrower than it is computed (``nu_dtype=bfloat16``,
  bfloat16 params, 8-bit state), the step divides by the *stored*, rounded
  value: the trajectory is then a function of the state alone, and XLA can
  update ``nu`` in place and read it once (16 instead of 20+ bytes per
  parameter for bfloat16).
  """
  out_dtype = g.dtype
  cdt = _compute_dtype(g.dtype)
  rdt = _real_dtype(cdt)
  c, r = consts(cdt), consts(rdt)
  store = functools.partial(_store_for, p_shape=tuple(g.shape), p_dtype=out_dtype, leaf=leaf, cfg=cfg)
  g = _direction(_cast(g, cdt), p, c, cfg)
  nu_st = store("nu")
  if cfg.centered and nu_st.quantized:
    var_hat, nu, mu = _centered_quantized(g, nu, mu, nu_st, store("mu"), r, cfg)
    u = lax.mul(_inv_rms(var_hat, r, cfg), g)
  else:
    g2 = _abs_sq(g)
    if nu_st.quantized:
      nu = _ema_quantized(nu, g2, nu_st, r, cfg)
      # nu >= (1 - decay) g**2 holds exactly; flooring the decoded value by it caps a
      # step whose nu was rounded far down at lr / sqrt(1 - decay), at no cost in bytes.
      nu_used = _floored(load(nu, rdt), lax.mul(r.s.one_minus_decay, g2))
    else:
      nu = _store(_ema(load(nu, rdt), g2, r), nu_st, r, cfg)
      nu_used = load(nu, rdt)  # the stored value, as the next step will see it
    mu_hat = None
    if cfg.centered:
      mu = _store(_ema(load(mu, cdt), g, c), store("mu"), r, cfg)
      mu_hat = _debias(load(mu, cdt), c)
    u = lax.mul(_cast(_rms_scale(_debias(nu_used, r), mu_hat, r, cfg), cdt), g)
  if cfg.scale_by_learning_rate:
    if not cfg.momentum:
      u = lax.mul(c.s.neg_lr, u)
    elif cfg.lr_inside_momentum:  # optax, Keras, TF1
      u, trace_new = _momentum(lax.mul(c.s.neg_lr, u), load(trace, cdt), c, cfg)
      trace = _store(trace_new, store("trace"), r, cfg)
    else:  # PyTorch: the buffer holds unscaled steps
      u, trace_new = _momentum(u, load(trace, cdt), c, cfg)
      trace = _store(trace_new, store("trace"), r, cfg)
      u = lax.mul(c.s.neg_lr, u)
    if cfg.weight_decay == "decoupled":
      u = lax.sub(u, lax.mul(c.s.decoupled_wd, _cast(p, cdt)))
  return _Leaf(_cast(u, out_dtype), nu, mu, trace)


# ---------------------------------------------------------------------------
# Tree level: checks, one map over the leaves, and the new state.
# ---------------------------------------------------------------------------


def _is_stored_leaf(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def _check_trees(updates: Any, state: RMSPropState, params: Any, cfg: Config) -> None:
  """Structure and shape checks; they run when the update is traced."""
  _checks.check_same_tree("updates", updates, state.nu, "state.nu", is_leaf=_is_stored_leaf)
  if cfg.weight_decay is not None:
    if params is None:
      raise ValueError("params must be passed to update(updates, state, params) when weight_decay is used")
    _checks.check_same_tree("params", params, updates, "updates")


def _leaves_or_none(treedef: Any, tree: Any) -> list[Any]:
  """``tree``'s leaves in ``treedef``'s order, or Nones if ``tree`` is None."""
  return [None] * treedef.num_leaves if tree is None else treedef.flatten_up_to(tree)


def _update_tree(
  updates: optax.Updates,
  state: RMSPropState,
  params: optax.Params | None,
  scalars: StepScalars,
  cfg: Config,
) -> tuple[optax.Updates, RMSPropState]:
  """The whole update: :func:`_leaf_update` on every leaf, then the state."""
  _check_trees(updates, state, params, cfg)
  g_leaves, treedef = jax.tree.flatten(updates)
  old = [_leaves_or_none(treedef, t) for t in (params, state.nu, state.mu, state.trace)]
  consts = _consts_factory(scalars)
  leaves = [_leaf_update(*args, i, consts, cfg) for i, args in enumerate(zip(g_leaves, *old))]
  unflat = lambda xs: jax.tree.unflatten(treedef, xs)
  new_state = RMSPropState(
    count=optax.safe_increment(state.count),
    nu=unflat([x.nu for x in leaves]),
    mu=unflat([x.mu for x in leaves]) if cfg.centered else None,
    trace=unflat([x.trace for x in leaves]) if cfg.momentum else None,
  )
  return unflat([x.update for x in leaves]), new_state


def last_step_size(state: RMSPropState, cfg: Config, hp: Hyperparams) -> optax.Updates:
  """Per parameter, the factor the last step multiplied the gradient by.

  ``lr_t * _rms_scale(...)`` of the step that produced ``state``, computed by
  the update's own functions (same storage, eps placement, bias correction,
  centering and zero-denominator rule), so it cannot disagree with the update.
  """
  scalars = step_scalars(hp, jnp.maximum(state.count - 1, 0), cfg)
  consts = _consts_factory(scalars)

  def one(nu: Any, mu: Any) -> jax.Array:
    if is_centered_variance(nu, mu):
      r = consts(jnp.float32)
      scale = _inv_rms(_centered_variance(load(nu, jnp.float32), load(mu, jnp.float32), r), r, cfg)
      return scale if r.s.neg_lr is None else lax.mul(lax.neg(r.s.neg_lr), scale)
    nu = load(nu, _real_dtype(_compute_dtype(_stored_dtype(nu))))
    r = consts(nu.dtype)
    mu_hat = None
    if mu is not None:
      cdt = _compute_dtype(_stored_dtype(mu))
      mu_hat = _debias(load(mu, cdt), consts(cdt))
    scale = _rms_scale(_debias(nu, r), mu_hat, r, cfg)
    return scale if r.s.neg_lr is None else lax.mul(lax.neg(r.s.neg_lr), scale)

  treedef = jax.tree.structure(state.nu, is_leaf=_is_stored_leaf)
  nus, mus = treedef.flatten_up_to(state.nu), _leaves_or_none(treedef, state.mu)
  return jax.tree.unflatten(treedef, [one(n, m) for n, m in zip(nus, mus)])


def is_centered_variance(nu: Any, mu: Any) -> bool:
  """Whether a leaf's stored ``nu`` holds ``nu - mu**2`` (centered, 8-bit codes).

  See :func:`_centered_quantized`; ``nu = dequantize(nu) + dequantize(mu)**2``.
  """
  return isinstance(nu, QuantizedArray) and mu is not None


def _stored_dtype(x: Any) -> Any:
  """The dtype a stored moment is computed in from: float32 for 8-bit codes."""
  return jnp.float32 if isinstance(x, QuantizedArray) else x.dtype


def _full_like(p: Any, value: Any, dtype: Any) -> jax.Array:
  """An array of ``value`` shaped and placed like ``p``.

  ``p`` may be a ``jax.ShapeDtypeStruct`` (with or without a sharding). For an
  array, a plain ``jnp.full_like`` has no data dependence on ``p`` under
  ``jit``, so XLA would place it on one device; selecting from ``p`` lets
  sharding propagate from ``p``.
  """
  if isinstance(p, jax.ShapeDtypeStruct):
    return jnp.full(p.shape, value, dtype, device=p.sharding)
  src = p.real if jnp.iscomplexobj(p) and not jnp.issubdtype(dtype, jnp.complexfloating) else p
  keep = jnp.zeros(p.shape, dtype=bool)
  return jnp.where(keep, src.astype(dtype), jnp.asarray(value, dtype=dtype))


def _init_tree(params: optax.Params, initial_scale: Any, cfg: Config) -> RMSPropState:
  leaves, treedef = jax.tree.flatten(params)

  def init(moment: str, value: Any) -> Any:
    out = []
    for i, p in enumerate(leaves):
      dtype = jnp.result_type(p)
      st = _store_for(moment, tuple(p.shape), dtype, i, cfg)
      if st.quantized:  # a constant: exact, no random bits needed
        out.append(quantize.quantize(_full_like(p, value, jnp.float32), signed=st.signed))
      else:
        out.append(_full_like(p, value, st.dtype))
    return jax.tree.unflatten(treedef, out)

  return RMSPropState(
    count=jnp.zeros([], jnp.int32),
    nu=init("nu", initial_scale),
    mu=init("mu", 0) if cfg.centered else None,
    trace=init("trace", 0) if cfg.momentum else None,
  )


# One cached compiled program when called eagerly (also batched under an
# un-jitted vmap, differentiated under grad); inlined into the caller's
# program inside jit/scan, so XLA compiles one computation, not a nested one.
_update_jit = jax.jit(_update_tree, static_argnames=("cfg",), inline=True)
_init_jit = jax.jit(_init_tree, static_argnames=("cfg",), inline=True)

# Settings of the optimizers built here, for effective_learning_rate(state, opt).
_SETTINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_settings(opt: optax.GradientTransformation, settings: tuple[Config, Hyperparams]) -> None:
  """Records ``opt``'s settings (kept as long as ``opt.update`` lives)."""
  _SETTINGS[opt.update] = settings


def settings_of(opt: Any) -> tuple[Config, Hyperparams] | None:
  """The ``(Config, Hyperparams)`` of an optimizer built here, else None."""
  update = getattr(opt, "update", None)
  try:
    return _SETTINGS.get(update)
  except TypeError:  # not weak-referenceable: not ours
    return None


def _checked_storage(cfg: Config) -> Config:
  """Validates and normalises the storage options of ``cfg``."""
  if cfg.nu_dtype is not None:
    nu_dtype = jnp.dtype(cfg.nu_dtype)
    if not jnp.issubdtype(nu_dtype, jnp.floating):
      raise TypeError(f"nu_dtype must be a real floating dtype, got {nu_dtype}")
    cfg = cfg._replace(nu_dtype=nu_dtype)
  _checks.check_choice("rounding", cfg.rounding, ROUNDINGS)
  state_bits = _checks.static_int("state_bits", cfg.state_bits, allow_none=True)
  _checks.check_choice("state_bits", state_bits, (None, 8))
  min_size = cfg.min_quantize_size
  min_size = (
    quantize.MIN_QUANTIZE_SIZE if min_size is None else _checks.static_int("min_quantize_size", min_size)
  )
  if min_size < 1:
    raise ValueError(f"min_quantize_size must be >= 1, got {min_size}")
  if state_bits is not None and cfg.nu_dtype is not None:
    raise ValueError(
      f"state_bits={state_bits} and nu_dtype={cfg.nu_dtype} both set the storage of nu; pass one of them"
    )
  return cfg._replace(state_bits=state_bits, min_quantize_size=min_size)


def fused_rmsprop(cfg: Config, hp: Hyperparams) -> optax.GradientTransformationExtraArgs:
  """Builds the transformation for a validated ``cfg`` and ``hp``.

  This is the one implementation behind :func:`scale_by_rms`,
  :func:`rmsprop_jax.rmsprop` and every preset; beyond the tree checks in
  ``init`` and ``update`` it only refuses what the core cannot compute.
  """
  cfg = _checked_storage(cfg)
  _checks.check_seed("seed", hp.seed)
  if cfg.bias_correction and callable(hp.decay):
    raise ValueError(
      "bias_correction=True needs a constant decay, got the schedule"
      f" {hp.decay!r}; use a constant decay, or bias_correction=False"
    )
  eps_may_be_zero = not _checks.is_concrete(hp.eps) or np.min(np.asarray(hp.eps)) == 0.0
  if eps_may_be_zero:
    cfg = cfg._replace(safe_divide=True)

  def init_fn(params: optax.Params) -> RMSPropState:
    _checks.check_float_params(params)
    if _checks.has_abstract_leaves(params):  # ShapeDtypeStructs: build eagerly
      return _init_tree(params, hp.initial_scale, cfg)
    return _init_jit(params, hp.initial_scale, cfg)

  def update_fn(
    updates: optax.Updates,
    state: RMSPropState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, RMSPropState]:
    del extra_args
    if cfg.weight_decay is None:
      params = None  # unused: not worth passing to the compiled update
    return _update_jit(updates, state, params, step_scalars(hp, state.count, cfg), cfg)

  opt = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  register_settings(opt, (cfg, hp))
  return opt


def scale_by_rms(
  decay: optax.ScalarOrSchedule = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  eps_in_sqrt: bool = True,
  initial_scale: jax.typing.ArrayLike = 0.0,
  centered: bool = False,
  bias_correction: bool = False,
  nu_dtype: Any = None,
  state_bits: int | None = None,
  rounding: str = "stochastic",
  seed: jax.typing.ArrayLike = 0,
  min_quantize_size: int | None = None,
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
      and optax. May be a schedule ``count -> decay``, called with the number
      of steps taken before this one (as a learning-rate schedule is).
    eps: :math:`\epsilon` >= 0, keeps the denominator away from zero. With
      ``eps=0`` a zero denominator gives a zero update instead of NaN.
    eps_in_sqrt: add ``eps`` inside the root (optax, Keras, TF1) rather than
      outside it (PyTorch).
    initial_scale: initial value of ``nu``; 0 (PyTorch, optax) or 1 (TF1).
    centered: divide by the root of the variance estimate ``nu - mu**2``
      (Graves, 2013) instead of the second moment.
    bias_correction: divide ``nu`` (and ``mu``) by ``1 - decay**t``. Needs a
      constant ``decay``: with a decay schedule it is refused with a
      ``ValueError`` (the exact factor ``1 - prod(decay_i)`` would need one
      more number in the state).
    nu_dtype: dtype in which ``nu`` is stored (e.g. ``jnp.bfloat16`` halves
      its memory); the arithmetic is done in float32 or wider regardless, and
      the step divides by the stored (rounded) ``nu``. None keeps the
      parameters' (real) dtype.
    state_bits: 8 stores ``nu`` (and ``mu``) as 8-bit codes with a float32
      scale per block of 256 values; see :func:`rmsprop_jax.rmsprop`.
    rounding: ``"stochastic"`` (unbiased) or ``"nearest"`` rounding of state
      stored narrower than it is computed; see :func:`rmsprop_jax.rmsprop`.
    seed: integer >= 0 of the stochastic rounding's random bits.
    min_quantize_size: with ``state_bits=8``, leaves with fewer entries stay
      unquantized; None means 4096.

  Returns:
    An :class:`optax.GradientTransformation` whose state is an
    :class:`RMSPropState`.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import scale_by_rms
    >>> tx = scale_by_rms(decay=0.9, eps=0.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> u, state = tx.update(jnp.array([2.0, -0.5]), state)
    >>> print(u.round(5))  # g / sqrt(0.1 g**2) = sign(g) * sqrt(10)
    [ 3.16228 -3.16228]

  References:
    Hinton, Lecture 6e of "Neural Networks for Machine Learning", 2012.
    Graves, "Generating Sequences With Recurrent Neural Networks", 2013.
  """
  _checks.check_scalar_or_schedule("decay", decay, 0.0, 1.0)
  _checks.check_scalar("eps", eps, 0.0)
  _checks.check_scalar("initial_scale", initial_scale, 0.0)
  cfg = Config(
    eps_in_sqrt=eps_in_sqrt,
    centered=centered,
    bias_correction=bias_correction,
    nu_dtype=nu_dtype,
    scale_by_learning_rate=False,
    rounding=rounding,
    state_bits=state_bits,
    min_quantize_size=min_quantize_size,
  )
  hp = Hyperparams(decay=decay, eps=eps, initial_scale=initial_scale, seed=seed)
  return fused_rmsprop(cfg, hp)
