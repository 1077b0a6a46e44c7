r"""One leaf's RMSProp step, written once: decode, float32 RMSProp, store.

:func:`leaf_step` is the whole step of one parameter, straight-line: it
decodes the stored moments, takes float32 (or wider) RMSProp's step with this
gradient, in the order of optax's ``chain(scale_by_rms | scale_by_stddev,
scale_by_learning_rate, trace)``,

1. the gradient the moments see (maximize, coupled weight decay);
2. the moments: :math:`\mu` (centered), then :math:`\nu`;
3. the preconditioner :math:`1 / \sqrt{\nu - |\mu|^2 + \epsilon}` (or
   :math:`\epsilon` outside the root);
4. momentum and the learning rate, in either order;
5. decoupled weight decay;

and rounds only what is stored (:func:`rmsprop_jax.storage.store`). Every
value is computed once. The steps use ``lax`` primitives on arrays of one
dtype with scalar constants of that dtype (:class:`Consts`): tracing a
600-leaf update then costs a fraction of what ``jnp`` operators (each a small
jit of its own) cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rmsprop_jax import quantize, storage
from rmsprop_jax.storage import Plan, Stored, cast

if TYPE_CHECKING:
  from rmsprop_jax.transform import Config, StepScalars


class Consts(NamedTuple):
  """A step's scalars as 0-d arrays of one dtype (None where unused)."""

  s: StepScalars
  zero: jax.Array
  one: jax.Array


def consts_factory(scalars: StepScalars) -> Callable[[jnp.dtype], Consts]:
  """``dtype -> Consts``, converting each scalar once per dtype."""

  @functools.cache
  def consts(dtype: jnp.dtype) -> Consts:
    conv = lambda v: None if v is None else lax.convert_element_type(v, dtype)
    floats = scalars._replace(seed=None, count=None)
    converted = type(scalars)(*map(conv, floats))._replace(seed=scalars.seed, count=scalars.count)
    return Consts(converted, lax.convert_element_type(0.0, dtype), lax.convert_element_type(1.0, dtype))

  return consts


def used(x: jax.typing.ArrayLike | None) -> jax.typing.ArrayLike:
  """A step's scalar that the configuration uses (so not None)."""
  assert x is not None
  return x


def abs_sq(x: jax.Array) -> jax.Array:
  """``|x|**2``, real for complex ``x`` (as optax's ``numerics.abs_sq``)."""
  if jnp.iscomplexobj(x):
    return lax.real(lax.mul(lax.conj(x), x))
  return lax.mul(x, x)


def direction(g: jax.Array, p: jax.Array | None, c: Consts, cfg: Config) -> jax.Array:
  """The gradient the moments see: ``-g`` if maximizing, plus ``wd * p``."""
  if cfg.maximize:
    g = lax.neg(g)
  if cfg.weight_decay == "coupled":
    assert p is not None  # the tree update refuses params=None with weight decay
    g = lax.add(g, lax.mul(used(c.s.weight_decay), cast(p, g.dtype)))
  return g


def ema(moment: jax.Array, x: jax.Array, c: Consts) -> jax.Array:
  """``decay * moment + (1 - decay) * x``, in optax's operand order."""
  return lax.add(lax.mul(used(c.s.one_minus_decay), x), lax.mul(used(c.s.decay), moment))


def debias(moment: jax.Array, c: Consts) -> jax.Array:
  return moment if c.s.bias_corr is None else lax.div(moment, c.s.bias_corr)


def inv_rms(var: jax.Array, r: Consts, cfg: Config) -> jax.Array:
  """``1 / sqrt(var + eps)``, or ``1 / (sqrt(var) + eps)``, for ``var >= 0``."""
  if cfg.eps_in_sqrt:
    denom = lax.add(var, used(r.s.eps))
    scale = lax.rsqrt(denom)
  else:
    denom = lax.add(lax.sqrt(var), used(r.s.eps))
    scale = lax.div(r.one, denom)
  if cfg.safe_divide:  # eps may be 0: a zero denominator scales by 0, not inf
    scale = lax.select(lax.gt(denom, lax.full_like(denom, 0)), scale, lax.full_like(scale, 0))
  return scale


def rms_scale(nu: jax.Array, mu: jax.Array | None, c: Consts, r: Consts, cfg: Config) -> jax.Array:
  """The preconditioner ``1 / sqrt(nu_hat - |mu_hat|^2 + eps)`` (or eps outside)."""
  var = debias(nu, r)
  if mu is not None:
    # The variance is >= 0 in exact arithmetic; rounding may push it below.
    var = lax.max(lax.sub(var, abs_sq(debias(mu, c))), r.zero)
  return inv_rms(var, r, cfg)


def variance_scale(v: jax.Array, mu: jax.Array, r: Consts, cfg: Config) -> jax.Array:
  """The preconditioner from the variance ``v = nu - mu**2`` (see :attr:`Plan.variance`)."""
  if r.s.bias_corr is not None:
    # nu / bc - mu**2 / bc**2 = v / bc - mu**2 (1 - bc) / bc**2, clamped as rounding may cross 0.
    bc = r.s.bias_corr
    v = lax.sub(lax.div(v, bc), lax.div(lax.mul(abs_sq(mu), lax.sub(r.one, bc)), lax.mul(bc, bc)))
    v = lax.max(v, r.zero)
  return inv_rms(v, r, cfg)


def momentum_step(u: jax.Array, trace: jax.Array, c: Consts, cfg: Config) -> jax.Array:
  """Heavy-ball momentum's new buffer, ``u + momentum * trace``."""
  return lax.add(u, lax.mul(used(c.s.momentum), trace))


def nu_scale_bound(scale: jax.Array, x: jax.Array, r: Consts) -> jax.Array:
  """``decay * scale + (1 - decay) * block_absmax(x)``: a bound on each block of the new ``nu``."""
  f32 = lambda v: cast(v, jnp.float32)
  return lax.add(lax.mul(f32(r.s.decay), scale), lax.mul(f32(r.s.one_minus_decay), quantize.block_absmax(x)))


class Moments(NamedTuple):
  """One leaf's new moments, computed (float32 or wider); None where unused."""

  nu: jax.Array | None = None
  mu: jax.Array | None = None
  trace: jax.Array | None = None


class StoredMoments(NamedTuple):
  """One leaf's new moments as stored: arrays or 8-bit codes; None where unused."""

  nu: Stored | None = None
  mu: Stored | None = None
  trace: Stored | None = None


class Given(NamedTuple):
  """Values a caller computed already, used instead of computing them again.

  The portable step passes none. A lowering that computes each stored output
  on its own (:mod:`rmsprop_jax.cpu_recompute`) hands the later outputs the
  moments stored exactly and the block scales already computed.
  """

  moments: Moments = Moments()
  scales: Moments = Moments()


class Inputs(NamedTuple):
  """One leaf's inputs, as stored (None where unused)."""

  g: jax.Array
  p: jax.Array | None
  nu: Stored
  mu: Stored | None
  trace: Stored | None


class Outputs(NamedTuple):
  """One leaf's update and new moments, as computed and as stored (None if unused)."""

  update: jax.Array
  new: Moments  # float32 (or wider) new moments
  stored: StoredMoments


def leaf_step(
  ins: Inputs,
  keys: dict[str, jax.Array],
  c: Consts,
  r: Consts,
  cfg: Config,
  plan: Plan,
  given: Given | None = None,
) -> Outputs:
  """One leaf's step, from its stored moments to its stored new moments.

  ``c``: the scalars in the compute dtype, ``r`` in its real dtype; ``keys``:
  the stream key of each stochastically rounded moment. The update divides
  by the exact new moments (float32 or wider), whatever their storage.
  """
  given = Given() if given is None else given
  cdt, rdt = c.one.dtype, r.one.dtype
  g = direction(cast(ins.g, cdt), ins.p, c, cfg)
  mu = mu_old = None
  if plan.mu is not None:
    assert ins.mu is not None
    mu_old = storage.load(ins.mu, cdt)
    mu = given.moments.mu if given.moments.mu is not None else ema(mu_old, g, c)
  if plan.variance:  # nu's slot keeps the variance, updated from g - mu_old
    assert mu_old is not None
    dev = lax.sub(g, mu_old)
    x_nu = lax.mul(used(r.s.decay), lax.mul(dev, dev))
  else:
    x_nu = abs_sq(g)
  nu = given.moments.nu if given.moments.nu is not None else ema(storage.load(ins.nu, rdt), x_nu, r)
  if plan.variance:
    assert mu is not None
    scale = variance_scale(nu, mu, r, cfg)
  else:
    scale = rms_scale(nu, mu, c, r, cfg)
  u = lax.mul(cast(scale, cdt), g)

  trace = None
  if not cfg.scale_by_learning_rate:
    update = u
  else:
    scaled = lax.mul(used(c.s.neg_lr), u) if cfg.lr_inside_momentum else u  # optax, Keras, TF1
    if plan.trace is None:
      update = lax.mul(used(c.s.neg_lr), u)
    else:
      assert ins.trace is not None
      trace = given.moments.trace
      if trace is None:
        trace = momentum_step(scaled, storage.load(ins.trace, cdt), c, cfg)
      update = momentum_step(scaled, trace, c, cfg) if cfg.nesterov else trace
      if not cfg.lr_inside_momentum:  # PyTorch: the buffer holds unscaled steps
        update = lax.mul(used(c.s.neg_lr), update)
    if cfg.weight_decay == "decoupled":
      assert ins.p is not None  # the tree update refuses params=None with weight decay
      update = lax.sub(update, lax.mul(used(c.s.decoupled_wd), cast(ins.p, cdt)))

  new = Moments(nu, mu, trace)
  scales = given.scales
  if plan.nu.quantized and plan.nu.stochastic and scales.nu is None:
    # The block scale of the new nu as the bound decay * scale + (1 - decay) * max(x),
    # from x alone: the scale does not wait for the new nu. Rounding to nearest takes
    # the exact block maximum: under that looser bound it would drop more increments.
    assert isinstance(ins.nu, quantize.QuantizedArray)
    scales = scales._replace(nu=nu_scale_bound(ins.nu.scale, x_nu, r))
  put = lambda m, st, value, scale: (
    None if st is None or value is None else storage.store(value, st, keys.get(m), scale)
  )
  stored = StoredMoments(*map(put, storage.MOMENTS, plan, new, scales))
  return Outputs(update, new, stored)
