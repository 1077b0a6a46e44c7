"""RMSProp's state, its settings, the tree update and the transformations built on it.

Everything RMSProp-like in this package is one transformation, built here by
:func:`fused_rmsprop` from a static :class:`Config` (hashable flags: which
steps run, how the state is stored) and :class:`Hyperparams` (the user's
numbers, which may be floats, arrays, tracers or schedules). Each update
first evaluates this step's numbers (:func:`step_scalars`: the schedules,
``1 - decay``, the bias correction), then runs one leaf's step
(:func:`rmsprop_jax.leaf.leaf_step`) on every leaf, each moment stored as
:mod:`rmsprop_jax.storage` decides. On CPU the leaves are lowered by
:mod:`rmsprop_jax.cpu_recompute`; every other backend gets the step as written.

The tree update runs as ``jax.jit(..., inline=True)``: called eagerly, and
under an un-jitted ``vmap`` or ``grad``, it is one cached XLA program (the
numbers are its arguments, so new values and new schedule objects reuse it);
inside a user's ``jit`` or ``scan`` it is inlined into the caller's program.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple, TypeAlias

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from rmsprop_jax import _checks, cpu_recompute, leaf, quantize, storage
from rmsprop_jax.leaf import Consts, Given, Inputs, StoredMoments, consts_factory, leaf_step
from rmsprop_jax.quantize import QuantizedArray
from rmsprop_jax.storage import ROUNDINGS, Plan, Rounding, StateBits, Stored, as_stored, is_stored_leaf

WeightDecayMode: TypeAlias = Literal["coupled", "decoupled"]
WEIGHT_DECAY_MODES: tuple[WeightDecayMode, ...] = ("coupled", "decoupled")


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
  weight_decay: WeightDecayMode | None = None
  maximize: bool = False
  safe_divide: bool = False
  rounding: Rounding = "stochastic"
  state_bits: StateBits = None
  min_quantize_size: int | None = None  # None: quantize.MIN_QUANTIZE_SIZE (quantize_from)
  cpu_recompute: bool = True  # lower for CPU with rmsprop_jax.cpu_recompute

  @property
  def quantize_from(self) -> int:
    """The fewest entries a leaf stored in 8-bit codes has: ``min_quantize_size`` or its default."""
    return quantize.MIN_QUANTIZE_SIZE if self.min_quantize_size is None else self.min_quantize_size


class Hyperparams(NamedTuple):
  """The user's numbers: floats, arrays or tracers.

  ``learning_rate`` and ``decay`` may also be schedules ``count -> value``.
  None where the configuration does not use them.
  """

  learning_rate: optax.ScalarOrSchedule | None = None
  decay: optax.ScalarOrSchedule = 0.9
  eps: jax.typing.ArrayLike = 1e-8
  momentum: jax.typing.ArrayLike | None = None
  weight_decay: jax.typing.ArrayLike | None = None
  initial_scale: jax.typing.ArrayLike = 0.0
  seed: jax.typing.ArrayLike = 0


class StepScalars(NamedTuple):
  """One step's numbers: arguments, not constants, of the compiled update.

  None where the configuration does not use them.
  """

  decay: jax.typing.ArrayLike | None
  one_minus_decay: jax.typing.ArrayLike | None
  eps: jax.typing.ArrayLike | None
  momentum: jax.typing.ArrayLike | None
  weight_decay: jax.typing.ArrayLike | None
  neg_lr: jax.typing.ArrayLike | None
  decoupled_wd: jax.typing.ArrayLike | None
  bias_corr: chex.Array | None
  seed: jax.typing.ArrayLike | None  # of the random bits for stochastic rounding (not converted)
  count: chex.Array  # steps taken before this one (not converted); None in the leaves' copy


def _value_at(value: optax.ScalarOrSchedule, count: chex.Array) -> chex.Numeric:
  """``value(count)`` for a schedule, else ``value``."""
  return value(count) if callable(value) else value


@functools.partial(jax.jit, inline=True)
def _bias_correction(decay: jax.typing.ArrayLike, count: chex.Array) -> jax.Array:
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
# Tree level: checks, one map over the leaves, and the new state.
# ---------------------------------------------------------------------------


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


def _leaf_update(
  ins: Inputs,
  keys: dict[str, jax.Array],
  scalars: StepScalars,
  plan: Plan,
  cfg: Config,
  recompute: bool = False,
  consts: Callable[[jnp.dtype], Consts] | None = None,
) -> tuple[jax.Array, StoredMoments]:
  """One leaf's update and stored new moments (:func:`rmsprop_jax.leaf.leaf_step`).

  ``recompute``: each output computed on its own (:mod:`rmsprop_jax.cpu_recompute`,
  the CPU lowering). ``consts``: the scalars already converted, one factory
  shared by the leaves traced in the caller's trace; None to convert them here.
  """
  cdt = storage.compute_dtype(ins.g.dtype)
  consts = consts_factory(scalars) if consts is None else consts
  c, r = consts(cdt), consts(storage.real_dtype(cdt))
  step = lambda ins, given: leaf_step(ins, keys, c, r, cfg, plan, given)
  if recompute:
    update, stored = cpu_recompute.per_output(step, ins, plan, cfg.weight_decay == "coupled")
  else:
    out = step(ins, Given())
    update, stored = out.update, out.stored
  return storage.cast(update, ins.g.dtype), stored


# One leaf's update with narrow state, traced and lowered once per distinct leaf
# (shape, dtype, storage): a tree of many same-shaped leaves traces like a tree of
# one. XLA inlines the calls, so the update still fuses with the caller's code.
# (Float32 state is traced in line: a handful of operations, and XLA then
# simplifies it exactly as it does optax's.)
_leaf_jit = jax.jit(_leaf_update, static_argnames=("plan", "cfg", "recompute"))


def _tree_leaves(
  leaf_ins: list[Inputs],
  leaf_keys: list[dict[str, jax.Array]],
  scalars: StepScalars,
  plans: list[Plan],
  cfg: Config,
  recompute: bool,
) -> list[tuple[jax.Array, StoredMoments]]:
  """:func:`_leaf_update` of every leaf."""
  # Leaves traced here share one conversion of the scalars per dtype; each narrow
  # leaf's nested jit converts its own.
  shared = consts_factory(scalars)
  out = []
  for ins, keys, plan in zip(leaf_ins, leaf_keys, plans):
    again = recompute and cpu_recompute.needed(plan, cfg.nesterov, cfg.weight_decay == "coupled")
    if plan.narrow:
      out.append(_leaf_jit(ins, keys, scalars, plan=plan, cfg=cfg, recompute=again))
    else:
      out.append(_leaf_update(ins, keys, scalars, plan, cfg, again, consts=shared))
  return out


def _update_tree(
  updates: optax.Updates,
  state: RMSPropState,
  params: optax.Params | None,
  scalars: StepScalars,
  cfg: Config,
) -> tuple[optax.Updates, RMSPropState]:
  """The whole update: :func:`_leaf_update` on every leaf, then the state.

  On CPU each leaf that needs it is lowered by :mod:`rmsprop_jax.cpu_recompute`
  (``jax.lax.platform_dependent``); every other backend gets the portable step.
  """
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
  plans = [storage.plan_for(tuple(g.shape), g.dtype, cfg) for g in g_leaves]
  # One stream of random bits per stochastically rounded moment: 3 * leaf + moment.
  streams = [
    (i, m)
    for i, plan in enumerate(plans)
    for m, st in zip(storage.MOMENTS, plan)
    if st is not None and st.stochastic
  ]
  keys = quantize.stream_keys(
    leaf.used(scalars.seed), scalars.count, [3 * i + storage.STREAMS[m] for i, m in streams]
  )
  leaf_keys: list[dict[str, jax.Array]] = [{} for _ in plans]
  for (i, m), k in zip(streams, keys):
    leaf_keys[i][m] = k
  leaf_scalars = scalars._replace(seed=None, count=None)  # the keys carry seed and count
  leaf_ins = [Inputs(*args) for args in zip(g_leaves, ps, nus, mus, traces)]
  tree = functools.partial(_tree_leaves, scalars=leaf_scalars, plans=plans, cfg=cfg)
  cpu = cfg.cpu_recompute and any(
    cpu_recompute.needed(plan, cfg.nesterov, cfg.weight_decay == "coupled") for plan in plans
  )
  if cpu:
    leaves = lax.platform_dependent(
      leaf_ins,
      leaf_keys,
      cpu=functools.partial(tree, recompute=True),
      default=functools.partial(tree, recompute=False),
    )
  else:
    leaves = tree(leaf_ins, leaf_keys, recompute=False)
  unflat = lambda xs: jax.tree.unflatten(treedef, xs)
  new_state = RMSPropState(
    count=optax.safe_increment(state.count),
    nu=unflat([x[1].nu for x in leaves]),
    mu=unflat([x[1].mu for x in leaves]) if cfg.centered else None,
    trace=unflat([x[1].trace for x in leaves]) if cfg.momentum else None,
  )
  return unflat([x[0] for x in leaves]), new_state


def last_step_size(state: RMSPropState, cfg: Config, hp: Hyperparams) -> optax.Updates:
  """Per parameter, the factor the last step multiplied the gradient by.

  ``lr_t * rms_scale(...)`` of the step that produced ``state``, computed by
  the update's own functions (same storage, eps placement, bias correction,
  centering and zero-denominator rule), so it cannot disagree with the update.
  """
  scalars = step_scalars(hp, jnp.maximum(state.count - 1, 0), cfg)
  consts = consts_factory(scalars)

  def one(nu: Stored, mu: Stored | None) -> jax.Array:
    if mu is not None and storage.is_centered_variance(nu, mu):
      r = consts(jnp.dtype(jnp.float32))
      scale = leaf.variance_scale(storage.load(nu, jnp.float32), storage.load(mu, jnp.float32), r, cfg)
    else:
      nu_arr = storage.load(nu, storage.real_dtype(storage.compute_dtype(storage.stored_dtype(nu))))
      r = consts(nu_arr.dtype)
      mu_arr = None
      c = r
      if mu is not None:
        c = consts(storage.compute_dtype(storage.stored_dtype(mu)))
        mu_arr = storage.load(mu, c.one.dtype)
      scale = leaf.rms_scale(nu_arr, mu_arr, c, r, cfg)
    return scale if r.s.neg_lr is None else lax.mul(lax.neg(r.s.neg_lr), scale)

  treedef: jax.tree_util.PyTreeDef = jax.tree.structure(state.nu, is_leaf=storage.is_stored_leaf)
  nus = [storage.as_stored(x) for x in treedef.flatten_up_to(state.nu)]
  mus = (
    [None] * len(nus) if state.mu is None else [storage.as_stored(x) for x in treedef.flatten_up_to(state.mu)]
  )
  return jax.tree.unflatten(treedef, [one(n, m) for n, m in zip(nus, mus)])


def _init_tree(params: optax.Params, initial_scale: jax.typing.ArrayLike, cfg: Config) -> RMSPropState:
  leaves, treedef = jax.tree.flatten(params)
  init = lambda moment, value: jax.tree.unflatten(
    treedef, [storage.initial(moment, p, value, cfg) for p in leaves]
  )
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
  if min_size is not None and min_size < 1:
    raise ValueError(f"min_quantize_size must be >= 1, got {min_size}")
  if state_bits is not None and cfg.nu_dtype is not None:
    raise ValueError(
      f"state_bits={state_bits} and nu_dtype={cfg.nu_dtype} both set the storage of nu; pass one of them"
    )
  cfg = cfg._replace(state_bits=8 if state_bits == 8 else None, min_quantize_size=min_size)
  return cfg._replace(min_quantize_size=cfg.quantize_from)  # equal options, one cache key


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
  cfg = _checked_storage(cfg)._replace(cpu_recompute=cpu_recompute.enabled())
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
    **extra_args: object,
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
  state_bits: StateBits = None,
  rounding: Rounding = "stochastic",
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
    nu_dtype, state_bits, rounding, seed, min_quantize_size: how the state is
      stored (``nu`` and ``mu``), each documented in
      :class:`~rmsprop_jax.StorageOptions`.

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
