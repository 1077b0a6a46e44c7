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

import contextvars
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias

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
  nu_dtype: jax.typing.DTypeLike | None = None  # as given; _checked_storage makes it a jnp.dtype
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


@functools.partial(jax.jit, inline=True)
def _bias_correction(decay: Any, count: chex.Array) -> jax.Array:
  """``1 - decay**count``, traced as optax's ``tree_bias_correction`` traces it.

  Traced, ``decay**count`` of an int32 count is XLA's ``pow`` in float32; eagerly, ``jnp.power``
  of a concrete integer multiplies ``decay`` out by binary exponentiation instead, whose rounding
  ``1 - x`` magnifies (2e-5 relative at decay 0.999 and count 3). Jitted, as optax's is, the
  factor is optax's whether the update runs eagerly or inside the caller's ``jit``.
  """
  return 1 - decay**count


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
    bias_corr=_bias_correction(decay, optax.safe_increment(count)) if cfg.bias_correction else None,
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


def _consts_factory(scalars: StepScalars) -> Callable[[jnp.dtype], _Consts]:
  """``dtype -> _Consts``, converting each scalar once per dtype."""

  @functools.cache
  def consts(dtype: jnp.dtype) -> _Consts:
    conv = lambda v: None if v is None else lax.convert_element_type(v, dtype)
    floats = scalars._replace(seed=None, count=None)
    converted = StepScalars(*map(conv, floats))._replace(seed=scalars.seed, count=scalars.count)
    return _Consts(converted, lax.convert_element_type(0.0, dtype), lax.convert_element_type(1.0, dtype))

  return consts


def _compute_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
  """float32 for low-precision floats, else the dtype itself (complex kept)."""
  return jnp.promote_types(dtype, jnp.float32)


def _real_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
  return jnp.finfo(dtype).dtype


def _cast(x: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
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
    assert p is not None  # _update_tree refuses params=None with weight decay
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

Stored: TypeAlias = jax.Array | QuantizedArray
"""One stored moment of one leaf: an array, or 8-bit codes and their block scales."""

_Known: TypeAlias = dict[str, jax.Array]  # new moments computed and stored exactly, by name


class _Store(NamedTuple):
  """How one moment of one leaf is stored (static, decided from its shape)."""

  dtype: jnp.dtype  # storage dtype of a plain array (unused when quantized)
  quantized: bool  # 8-bit codes and block scales
  signed: bool  # signed codes (first moments) or not (nu)
  narrow: bool  # stored narrower than computed: the stored value is a rounding


def _quantizable(shape: tuple[int, ...], dtype: jax.typing.DTypeLike, cfg: Config) -> bool:
  """8-bit storage for real leaves of rank >= 1 with >= min_quantize_size entries."""
  return (
    cfg.state_bits == 8
    and len(shape) >= 1
    and int(np.prod(shape)) >= cfg.min_quantize_size
    and not jnp.issubdtype(dtype, jnp.complexfloating)
  )


def _store_for(moment: str, p_shape: tuple[int, ...], p_dtype: jax.typing.DTypeLike, cfg: Config) -> _Store:
  real = _real_dtype(p_dtype)
  dtype = jnp.dtype((cfg.nu_dtype or real) if moment == "nu" else p_dtype)
  quantized = _quantizable(p_shape, p_dtype, cfg)
  compute = _real_dtype(_compute_dtype(p_dtype)) if moment == "nu" else _compute_dtype(p_dtype)
  narrow = quantized or (
    not jnp.issubdtype(dtype, jnp.complexfloating) and jnp.finfo(dtype).bits < jnp.finfo(compute).bits
  )
  return _Store(dtype, quantized, moment != "nu", narrow)


def load(x: Stored, dtype: jax.typing.DTypeLike) -> jax.Array:
  """A stored moment in compute dtype ``dtype`` (dequantized if 8-bit)."""
  if isinstance(x, QuantizedArray):
    return _cast(quantize.dequantize(x), dtype)
  return _cast(x, dtype)


def _stochastic(st: _Store, cfg: Config) -> bool:
  """Whether this moment's storage draws random bits (its rounding is stochastic)."""
  return st.narrow and cfg.rounding == "stochastic" and (st.quantized or jnp.finfo(st.dtype).bits < 32)


def _bits(x: jax.Array, key: jax.Array | None) -> jax.Array | None:
  if key is None:
    return None
  return quantize.bits_from_key(key, x.shape, out_sharding=quantize._explicit_sharding(x))


def _round(x: jax.Array, st: _Store, key: jax.Array | None) -> jax.Array:
  """A computed moment rounded to a plain storage dtype (unbiased unless nearest)."""
  if not st.narrow or jnp.iscomplexobj(x) or jnp.finfo(st.dtype).bits >= 32:
    return _cast(x, st.dtype)
  return quantize.round_to(x, st.dtype, _bits(x, key))


def _centered_variance(v: jax.Array, mu: jax.Array, r: _Consts) -> jax.Array:
  """``nu_hat - mu_hat**2`` from ``v = nu - mu**2``, debiased as the float path does."""
  if r.s.bias_corr is None:
    return v
  # nu / bc - mu**2 / bc**2 = v / bc - mu**2 (1 - bc) / bc**2, clamped as rounding may cross 0.
  bc = r.s.bias_corr
  var = lax.sub(lax.div(v, bc), lax.div(lax.mul(_abs_sq(mu), lax.sub(r.one, bc)), lax.mul(bc, bc)))
  return lax.max(var, r.zero)


class _Plan(NamedTuple):
  """How one leaf's moments are stored (None where unused)."""

  nu: _Store
  mu: _Store | None
  trace: _Store | None

  @property
  def variance(self) -> bool:
    """Centered with 8-bit moments: nu's slot keeps ``v = nu - mu**2`` (see ``_Step.nu``)."""
    return self.mu is not None and self.nu.quantized

  @property
  def narrow(self) -> bool:
    return any(st is not None and st.narrow for st in self)


class _Ins(NamedTuple):
  """One leaf's inputs, as stored (None where unused)."""

  g: jax.Array
  p: jax.Array | None
  nu: Stored
  mu: Stored | None
  trace: Stored | None


class _Step:
  r"""One leaf's exact step, in float32 (or wider), from its stored inputs.

  Every value is computed when first asked for: the new moments from the
  decoded stored ones and this gradient, the preconditioner and the update.
  ``known`` holds new moments already computed and stored exactly (moments
  stored at compute precision), which are read instead of recomputed.

  Centered RMSProp with 8-bit moments keeps the variance
  :math:`v = \nu - \mu^2` in ``nu``'s slot: ``nu - mu**2`` of two 8-bit
  moments (codes 6-12% apart) cancels where the variance is small next to
  ``nu``, rounding to 0 (a step of ``g / sqrt(eps)``). It is updated by the
  exact identity (Welford's, with exponential weights)

  .. math::

    v_t = \gamma\,\big(v_{t-1} + (1 - \gamma)\,(g_t - \mu_{t-1})^2\big)

  which subtracts nothing that can cancel; ``dequantize_state`` returns
  :math:`\nu = v + \mu^2`.
  """

  def __init__(self, ins: _Ins, known: _Known, c: _Consts, r: _Consts, cfg: Config, plan: _Plan):
    self.ins, self.known, self.c, self.r, self.cfg, self.plan = ins, known, c, r, cfg, plan

  @functools.cached_property
  def g(self) -> jax.Array:
    """The gradient the moments see (maximize, coupled weight decay)."""
    return _direction(_cast(self.ins.g, self.c.one.dtype), self.ins.p, self.c, self.cfg)

  @functools.cached_property
  def x_nu(self) -> jax.Array:
    """What ``nu``'s EMA averages: ``|g|**2``, or ``decay |g - mu|**2`` for the variance."""
    if self.plan.variance:
      assert self.ins.mu is not None  # plan.variance: centered
      dev = lax.sub(self.g, load(self.ins.mu, self.r.one.dtype))
      return lax.mul(self.r.s.decay, lax.mul(dev, dev))
    return _abs_sq(self.g)

  @functools.cached_property
  def nu(self) -> jax.Array:
    if "nu" in self.known:
      return self.known["nu"]
    return _ema(load(self.ins.nu, self.r.one.dtype), self.x_nu, self.r)

  @functools.cached_property
  def mu(self) -> jax.Array:
    if "mu" in self.known:
      return self.known["mu"]
    assert self.ins.mu is not None  # asked for only when centered
    return _ema(load(self.ins.mu, self.c.one.dtype), self.g, self.c)

  @functools.cached_property
  def u(self) -> jax.Array:
    """The preconditioned gradient ``g / sqrt(nu - |mu|**2 + eps)``."""
    r, c, cfg = self.r, self.c, self.cfg
    if self.plan.variance:
      scale = _inv_rms(_centered_variance(self.nu, self.mu, r), r, cfg)
    else:
      mu_hat = _debias(self.mu, c) if cfg.centered else None
      scale = _rms_scale(_debias(self.nu, r), mu_hat, r, cfg)
    return lax.mul(_cast(scale, c.one.dtype), self.g)

  @functools.cached_property
  def _momentum(self) -> tuple[jax.Array, jax.Array]:
    """(update before decoupled weight decay, new momentum buffer)."""
    c, cfg = self.c, self.cfg
    scaled = lambda u: lax.mul(c.s.neg_lr, u) if cfg.lr_inside_momentum else u  # optax, Keras, TF1
    if "trace" in self.known:
      trace = self.known["trace"]
      out = lax.add(scaled(self.u), lax.mul(c.s.momentum, trace)) if cfg.nesterov else trace
    else:
      assert self.ins.trace is not None  # asked for only with momentum
      out, trace = _momentum(scaled(self.u), load(self.ins.trace, c.one.dtype), c, cfg)
    if not cfg.lr_inside_momentum:  # PyTorch: the buffer holds unscaled steps
      out = lax.mul(c.s.neg_lr, out)
    return out, trace

  @property
  def trace(self) -> jax.Array:
    return self._momentum[1]

  @functools.cached_property
  def update(self) -> jax.Array:
    c, cfg = self.c, self.cfg
    if not cfg.scale_by_learning_rate:
      return self.u
    u = self._momentum[0] if cfg.momentum else lax.mul(c.s.neg_lr, self.u)
    if cfg.weight_decay == "decoupled":
      assert self.ins.p is not None  # _update_tree refuses params=None with weight decay
      u = lax.sub(u, lax.mul(c.s.decoupled_wd, _cast(self.ins.p, c.one.dtype)))
    return u


class _Leaf(NamedTuple):
  """One leaf's update and new moments, as stored (None if unused)."""

  update: jax.Array
  nu: Stored | None
  mu: Stored | None
  trace: Stored | None


def _leaf_plan(shape: tuple[int, ...], dtype: jax.typing.DTypeLike, cfg: Config) -> _Plan:
  store = functools.partial(_store_for, p_shape=shape, p_dtype=dtype, cfg=cfg)
  return _Plan(
    store("nu"),
    store("mu") if cfg.centered else None,
    store("trace") if cfg.momentum and cfg.scale_by_learning_rate else None,
  )


def _zero_from(x: jax.Array) -> jax.Array:
  """int32 0, computed from ``x``'s first entries (whatever they hold, NaN included).

  The first entry; along dimensions an explicit mesh shards, all of them (a
  slice of a sharded dimension must keep it whole), reduced with ``min``.
  """
  spec = tuple(quantize._explicit_spec(x) or ())
  limits = tuple(n if d < len(spec) and spec[d] is not None else 1 for d, n in enumerate(x.shape))
  part = lax.slice(x, (0,) * x.ndim, limits)
  if jnp.issubdtype(part.dtype, jnp.floating):
    part = lax.bitcast_convert_type(part, jnp.dtype(f"int{8 * part.dtype.itemsize}"))
  nonnegative = lax.shift_right_logical(lax.convert_element_type(part, jnp.int32), np.int32(1))
  return jnp.min(lax.min(nonnegative, np.int32(0)))


def _private_copies(ins: _Ins, cfg: Config, plan: _Plan) -> Callable[[_Known], tuple[_Ins, _Known]]:
  """``fresh(known)``: the inputs again, for one more consumer that recomputes from them.

  XLA:CPU has no multi-output fusion: each stored output (the update, each new
  moment, each block scale) is a loop of its own. A value several of them
  need, such as the new ``nu`` of a moment stored in 8 bits or bfloat16, or
  ``1 / sqrt(nu + eps)`` for Nesterov momentum, would be computed once and
  kept in a temporary array the size of the leaf. Instead each consumer
  recomputes what it needs from the stored inputs, behind an optimization
  barrier that keeps XLA from merging the copies back (common-subexpression
  elimination); the barrier itself costs nothing.
  """
  if not (plan.narrow or cfg.nesterov or cfg.weight_decay == "coupled"):
    return lambda known: (ins, known)
  tags = iter(range(1 << 30))

  def fresh(known: _Known) -> tuple[_Ins, _Known]:
    # The tag tells the barriers apart. XLA drops a barrier's unused operands, so the
    # consumer uses it: g * (1 + min(tag, 0)), a multiplication by 1 that XLA cannot
    # see through until the barrier is gone (then it folds it away). The params are
    # read as they are, not through the barrier: the caller's p + u rewrites them in
    # place, and XLA copies a buffer that a barrier passes on.
    ins_b, known_b, tag = lax.optimization_barrier((ins._replace(p=None), known, np.int32(next(tags))))
    one = lax.convert_element_type(lax.add(np.int32(1), lax.min(tag, np.int32(0))), ins.g.dtype)
    return ins_b._replace(g=lax.mul(ins_b.g, one), p=ins.p), known_b

  return fresh


def _leaf_update(
  ins: _Ins,
  keys: dict[str, jax.Array],
  scalars: StepScalars,
  plan: _Plan,
  cfg: Config,
  consts: Callable[[jnp.dtype], _Consts] | None = None,
) -> _Leaf:
  """One leaf of the update, from stored moments to stored moments.

  The step is float32 RMSProp's from the decoded state (it divides by the
  exact new moments); only what is stored is rounded, unbiased unless
  ``rounding="nearest"``. Moments stored at compute precision are computed
  once and read by the later consumers; each value derived from a narrower
  moment is recomputed by each consumer (see :func:`_private_copies`).
  ``consts``: the scalars already converted, one factory shared by the leaves
  traced in the caller's trace; None to convert them here.
  """
  out_dtype = ins.g.dtype
  cdt = _compute_dtype(out_dtype)
  consts = _consts_factory(scalars) if consts is None else consts
  c, r = consts(cdt), consts(_real_dtype(cdt))
  fresh = _private_copies(ins, cfg, plan)
  step = lambda known: _Step(*fresh(known), c, r, cfg, plan)
  known: _Known = {}
  stored: dict[str, Stored | None] = {"nu": None, "mu": None, "trace": None}
  # Moments stored exactly, in dependency order; later consumers read them.
  for m in ("mu", "nu", "trace"):
    st = getattr(plan, m)
    if st is not None and not st.narrow:
      value = getattr(step(known), m)
      known[m] = value
      stored[m] = _cast(value, st.dtype)
  # Moments stored narrower than computed: each rounded from its own recomputation.
  for m in ("trace", "nu", "mu"):
    st = getattr(plan, m)
    if st is None or not st.narrow:
      continue
    key = keys.get(m)
    old = getattr(ins, m)
    if not st.quantized:
      stored[m] = _round(getattr(step(known), m), st, key)
    elif m == "nu" and cfg.rounding == "stochastic":
      # One pass over the codes: the block scale is the bound decay * scale +
      # (1 - decay) * max(x), from x alone (quantize.ema_update).
      x = step(known).x_nu
      stored[m] = quantize.ema_update(old, x, r.s.decay, r.s.one_minus_decay, bits=_bits(x, key))
    else:
      # The exact block maximum of the new values, then their codes. Rounding to
      # nearest uses it for nu too: under the slowly moving bound above, nearest
      # rounding would drop more increments (notebook 06: +4.9% vs +58%).
      scale = quantize.block_absmax(getattr(step(known), m))
      value = getattr(step(known), m)
      stored[m] = quantize.quantize(value, signed=st.signed, bits=_bits(value, key), scale=scale)
  update = step(known).update
  if cfg.weight_decay == "coupled":
    # The loops that rewrite the narrow moments read the params, which the caller's
    # p + u (fused with the update) rewrites in place: the update comes after those
    # loops (it uses their outputs, multiplying by 1), so that XLA copies only the old
    # moments, not the params.
    after = [
      stored[m] for m in ("nu", "mu", "trace") if getattr(plan, m) is not None and getattr(plan, m).narrow
    ]
    if after:
      (after,) = lax.optimization_barrier((after,))
      zero = functools.reduce(lax.add, [_zero_from(x) for x in jax.tree.leaves(after)])
      update = lax.mul(update, lax.convert_element_type(lax.add(np.int32(1), zero), update.dtype))
  return _Leaf(_cast(update, out_dtype), stored["nu"], stored["mu"], stored["trace"])


# ---------------------------------------------------------------------------
# Tree level: checks, one map over the leaves, and the new state.
# ---------------------------------------------------------------------------


def _is_code_mapping(x: object) -> bool:
  return isinstance(x, Mapping) and set(x.keys()) == {"codes", "scale"}


def is_stored_leaf(x: object) -> bool:
  """Whether ``x`` is one stored moment that pytrees would split (8-bit codes)."""
  return isinstance(x, QuantizedArray) or _is_code_mapping(x)


def as_stored(x: Any) -> Any:
  """A stored moment: an array or :class:`QuantizedArray`.

  A mapping of exactly ``codes`` and ``scale`` is taken for the
  :class:`QuantizedArray` it came from: Flax NNX's optimizer keeps the state
  as ``nnx.State`` and turns every pytree node inside it into one.
  """
  if _is_code_mapping(x):
    return QuantizedArray(x["codes"], x["scale"])
  return x


def _stored_leaves(name: str, tree: optax.Updates, treedef: jax.tree_util.PyTreeDef) -> list[Stored]:
  """``tree``'s moments in ``treedef``'s (the updates') order, one per parameter."""
  try:
    subtrees = treedef.flatten_up_to(tree)
  except (ValueError, TypeError):
    theirs = jax.tree.structure(tree, is_leaf=is_stored_leaf)
    raise ValueError(
      f"updates has tree structure {treedef}, but {name} has {theirs}; pass a tree"
      " with the same structure as the params given to init"
    ) from None
  out = [as_stored(x) for x in subtrees]
  for x in out:
    if not (isinstance(x, QuantizedArray) or hasattr(x, "shape")):
      theirs = jax.tree.structure(tree, is_leaf=is_stored_leaf)
      raise ValueError(
        f"updates has tree structure {treedef}, but {name} has {theirs}; pass a tree"
        " with the same structure as the params given to init"
      )
  return out


def _check_shapes(updates: optax.Updates, name: str, stored: list[Stored]) -> None:
  paths = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, u), x in zip(paths, stored):
    shape = _checks._shape(x)
    if tuple(jnp.shape(u)) != tuple(shape):
      raise ValueError(
        f"updates{_checks._path(path)} has shape {jnp.shape(u)}, but {name}{_checks._path(path)}"
        f" has shape {shape}; shapes must match exactly (no broadcasting)"
      )


def _leaves_or_none(
  treedef: jax.tree_util.PyTreeDef, tree: optax.Updates | None, name: str
) -> Sequence[Stored | None]:
  """``tree``'s moments in ``treedef``'s order, or Nones if ``tree`` is None."""
  return [None] * treedef.num_leaves if tree is None else _stored_leaves(name, tree, treedef)


def _update_tree(
  updates: optax.Updates,
  state: RMSPropState,
  params: optax.Params | None,
  scalars: StepScalars,
  cfg: Config,
) -> tuple[optax.Updates, RMSPropState]:
  """The whole update: :func:`_leaf_update` on every leaf, then the state."""
  _checks.check_float_updates(updates)
  treedef: jax.tree_util.PyTreeDef
  g_leaves, treedef = jax.tree.flatten(updates)
  nus = _stored_leaves("state.nu", state.nu, treedef)
  _check_shapes(updates, "state.nu", nus)
  if cfg.weight_decay is not None:
    if params is None:
      raise ValueError("params must be passed to update(updates, state, params) when weight_decay is used")
    _checks.check_same_tree("params", params, updates, "updates")
  ps = [None] * treedef.num_leaves if params is None else treedef.flatten_up_to(params)
  mus = _leaves_or_none(treedef, state.mu, "state.mu")
  traces = _leaves_or_none(treedef, state.trace, "state.trace")
  plans = [_leaf_plan(tuple(g.shape), g.dtype, cfg) for g in g_leaves]
  # One stream of random bits per stochastically rounded moment: 3 * leaf + moment.
  streams = [
    (i, m)
    for i, plan in enumerate(plans)
    for m, st in plan._asdict().items()
    if st is not None and _stochastic(st, cfg)
  ]
  keys = quantize.stream_keys(scalars.seed, scalars.count, [3 * i + _STREAMS[m] for i, m in streams])
  leaf_keys: list[dict[str, jax.Array]] = [{} for _ in plans]
  for (i, m), k in zip(streams, keys):
    leaf_keys[i][m] = k
  leaf_scalars = scalars._replace(seed=None, count=None)  # the keys carry seed and count
  # Leaves traced here share one conversion of the scalars per dtype (ten scalar
  # converts per leaf were a third of a 600-leaf float32 trace); each narrow leaf's
  # nested jit converts its own.
  shared = _consts_factory(leaf_scalars)
  leaves = [
    _leaf_jit(_Ins(*args), k, leaf_scalars, plan=plan, cfg=cfg)
    if plan.narrow
    else _leaf_update(_Ins(*args), k, leaf_scalars, plan=plan, cfg=cfg, consts=shared)
    for args, k, plan in zip(zip(g_leaves, ps, nus, mus, traces), leaf_keys, plans)
  ]
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

  def one(nu: Stored, mu: Stored | None) -> jax.Array:
    if mu is not None and is_centered_variance(nu, mu):
      r = consts(jnp.dtype(jnp.float32))
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

  treedef: jax.tree_util.PyTreeDef = jax.tree.structure(state.nu, is_leaf=is_stored_leaf)
  nus = [as_stored(x) for x in treedef.flatten_up_to(state.nu)]
  mus = [None] * len(nus) if state.mu is None else [as_stored(x) for x in treedef.flatten_up_to(state.mu)]
  return jax.tree.unflatten(treedef, [one(n, m) for n, m in zip(nus, mus)])


def is_centered_variance(nu: Stored, mu: Stored | None) -> bool:
  """Whether a leaf's stored ``nu`` holds ``nu - mu**2`` (centered, 8-bit codes).

  See :func:`_centered_quantized`; ``nu = dequantize(nu) + dequantize(mu)**2``.
  """
  return isinstance(nu, QuantizedArray) and mu is not None


def _stored_dtype(x: Stored) -> jax.typing.DTypeLike:
  """The dtype a stored moment is computed in from: float32 for 8-bit codes."""
  return jnp.float32 if isinstance(x, QuantizedArray) else x.dtype


def _full_like(
  p: jax.Array | np.ndarray | jax.ShapeDtypeStruct, value: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike
) -> jax.Array:
  """An array of ``value`` shaped and placed like ``p`` (an array or a ``jax.ShapeDtypeStruct``).

  For an array, a plain ``jnp.full_like`` has no data dependence on ``p``
  under ``jit``, so XLA would place it on one device; a select from ``p``
  (always false, folded away) lets sharding propagate from ``p``.
  """
  return quantize._filled(tuple(p.shape), lax.convert_element_type(value, dtype), p)


def _init_tree(params: optax.Params, initial_scale: jax.typing.ArrayLike, cfg: Config) -> RMSPropState:
  leaves, treedef = jax.tree.flatten(params)

  def init(moment: str, value: jax.typing.ArrayLike) -> optax.Updates:
    out: list[Stored] = []
    for p in leaves:
      dtype = jnp.result_type(p)
      st = _store_for(moment, tuple(p.shape), dtype, cfg)
      if st.quantized:  # a constant: its codes and scales are written down, not computed
        out.append(quantize.full(p.shape, value, signed=st.signed, like=p))
      else:
        out.append(_full_like(p, value, st.dtype))
    return jax.tree.unflatten(treedef, out)

  return RMSPropState(
    count=jnp.zeros([], jnp.int32),
    nu=init("nu", initial_scale),
    mu=init("mu", 0) if cfg.centered else None,
    trace=init("trace", 0) if cfg.momentum else None,
  )


# One leaf's update with low-precision state, traced and lowered once per
# distinct leaf (shape, dtype, storage): a tree of many same-shaped leaves traces
# like a tree of one. XLA inlines the calls, so the update still fuses with the
# caller's code. (Float32 state is traced in line: a handful of operations, and
# XLA then simplifies it exactly as it does optax's.)
_leaf_jit = jax.jit(_leaf_update, static_argnames=("plan", "cfg"))

# One cached compiled program when called eagerly (also batched under an
# un-jitted vmap, differentiated under grad); inlined into the caller's
# program inside jit/scan, so XLA compiles one computation, not a nested one.
_update_jit = jax.jit(_update_tree, static_argnames=("cfg",), inline=True)
_init_jit = jax.jit(_init_tree, static_argnames=("cfg",), inline=True)


# Each Hyperparams field named as the argument it came from: rmsprop's and scale_by_rms's own names.
_SAME_NAMES: tuple[tuple[str, str], ...] = tuple((f, f) for f in Hyperparams._fields)


class Settings(NamedTuple):
  """What a transformation built here computes with, as it carries it.

  Attributes:
    config: the static :class:`Config`.
    hyperparams: the :class:`Hyperparams` it was built with (numbers,
      schedules; tracers when a wrapper such as ``optax.inject_hyperparams``
      built it inside its own ``init`` or ``update``).
    names: ``(field, argument)`` pairs: the public factory's argument that
      each :class:`Hyperparams` field came from unchanged (what
      ``optax.inject_hyperparams`` keys its state by).
  """

  config: Config
  hyperparams: Hyperparams
  names: tuple[tuple[str, str], ...] = _SAME_NAMES


# The attribute of a transformation's ``update`` function that carries its
# Settings: the transformation itself is optax's two-function NamedTuple.
_SETTINGS_ATTR = "rmsprop_settings"

# While :func:`recorded_settings` runs a wrapper's ``init``, each of our
# ``init`` functions it reaches appends its Settings here.
_RECORDER: contextvars.ContextVar[list[Settings] | None] = contextvars.ContextVar("_RECORDER", default=None)


def register_settings(
  opt: optax.GradientTransformation, settings: Settings | tuple[Config, Hyperparams]
) -> None:
  """Sets the Settings that ``opt`` (a transformation built here) carries."""
  if not isinstance(settings, Settings):
    settings = Settings(*settings)
  setattr(opt.update, _SETTINGS_ATTR, settings)


def settings_of(opt: object) -> Settings | None:
  """The Settings ``opt`` carries if it is a transformation built here, else None.

  Wrappers (``optax.chain``, ``inject_hyperparams``, ...) make new functions,
  which carry nothing: :func:`recorded_settings` finds ours inside them.
  """
  return getattr(getattr(opt, "update", None), _SETTINGS_ATTR, None)


def recorded_settings(
  opt: optax.GradientTransformation, params: optax.Params
) -> tuple[list[Settings], Exception | None]:
  """The Settings of each transformation built here that ``opt.init`` reaches.

  Runs ``opt.init`` on ``params`` (a tree of ``jax.ShapeDtypeStruct``) under
  ``jax.eval_shape``: no array is allocated and nothing is compiled. Returns
  the Settings in the order reached, and the exception ``opt.init`` raised if
  it did not finish (those reached before it still count).
  """
  found: list[Settings] = []
  token = _RECORDER.set(found)
  error = None
  try:
    jax.eval_shape(lambda p: opt.init(p), params)  # a new function: never a cached trace
  except Exception as e:  # a wrapper that cannot init on the stand-in params
    error = e
  finally:
    _RECORDER.reset(token)
  return found, error


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
  min_size = _checks.static_int("min_quantize_size", cfg.min_quantize_size, allow_none=True)
  if min_size is None:
    min_size = quantize.MIN_QUANTIZE_SIZE
  if min_size < 1:
    raise ValueError(f"min_quantize_size must be >= 1, got {min_size}")
  if state_bits is not None and cfg.nu_dtype is not None:
    raise ValueError(
      f"state_bits={state_bits} and nu_dtype={cfg.nu_dtype} both set the storage of nu; pass one of them"
    )
  return cfg._replace(state_bits=state_bits, min_quantize_size=min_size)


def fused_rmsprop(
  cfg: Config, hp: Hyperparams, names: Mapping[str, str] | None = None
) -> optax.GradientTransformationExtraArgs:
  """Builds the transformation for a validated ``cfg`` and ``hp``.

  This is the one implementation behind :func:`scale_by_rms`,
  :func:`rmsprop_jax.rmsprop` and every preset; beyond the tree checks in
  ``init`` and ``update`` it only refuses what the core cannot compute.
  ``names`` maps :class:`Hyperparams` fields to the public factory's argument
  names where they differ (presets: ``{"decay": "rho", ...}``), so that the
  diagnostics can read a hyperparameter that ``optax.inject_hyperparams``
  injected by its argument name.
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
    recorder = _RECORDER.get()
    settings = settings_of(opt)  # read now: a preset renames the arguments after building opt
    if recorder is not None and settings is not None:
      recorder.append(settings)
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
  field_names = _SAME_NAMES if names is None else tuple({**dict(_SAME_NAMES), **names}.items())
  register_settings(opt, Settings(cfg, hp, field_names))
  return opt


def scale_by_rms(
  decay: optax.ScalarOrSchedule = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  eps_in_sqrt: bool = True,
  initial_scale: jax.typing.ArrayLike = 0.0,
  centered: bool = False,
  bias_correction: bool = False,
  nu_dtype: jax.typing.DTypeLike | None = None,
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
      its memory); the step decodes it, updates it in float32 or wider and
      divides by that exact value, rounding only what it stores. None keeps the
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
    min_quantize_size=quantize.MIN_QUANTIZE_SIZE if min_quantize_size is None else min_quantize_size,
  )
  hp = Hyperparams(decay=decay, eps=eps, initial_scale=initial_scale, seed=seed)
  return fused_rmsprop(cfg, hp)
