"""How each moment of a leaf is stored: its dtype or 8-bit codes, decoded and encoded.

A moment (``nu``, ``mu`` or ``trace``) is kept in its parameter's dtype, in
``nu_dtype``, or as 8-bit block codes (:class:`~rmsprop_jax.quantize.QuantizedArray`).
It is always computed in float32 (or wider): :func:`load` decodes it,
:func:`store` rounds a computed value to its storage, stochastically unless
``rounding="nearest"``. Which storage a leaf's moment gets is decided
statically from the leaf's shape and dtype (:func:`plan_for`). The user's
options for it are the keywords of :class:`StorageOptions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, NamedTuple, TypeAlias, TypedDict, TypeGuard, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rmsprop_jax import quantize
from rmsprop_jax.quantize import QuantizedArray

if TYPE_CHECKING:
  from rmsprop_jax.transform import Config

Stored: TypeAlias = jax.Array | QuantizedArray
"""One stored moment of one leaf: an array, or 8-bit codes and their block scales."""

_T = TypeVar("_T")

Rounding: TypeAlias = Literal["stochastic", "nearest"]
"""How a moment stored narrower than it is computed is rounded (see :class:`StorageOptions`)."""

StateBits: TypeAlias = Literal[8] | None
"""The moments' code width: 8 for 8-bit block codes, None for arrays (see :class:`StorageOptions`)."""

ROUNDINGS: tuple[Rounding, ...] = ("stochastic", "nearest")


class StorageOptions(TypedDict, total=False):
  r"""How the optimizer state is stored: keywords of every optimizer built here.

  :func:`rmsprop_jax.rmsprop`, :func:`rmsprop_jax.scale_by_rms`, the
  :mod:`~rmsprop_jax.presets` and :mod:`~rmsprop_jax.interop`'s ``from_torch``
  and ``from_keras`` take these keywords (``rmsprop(0.1, state_bits=8)``); a
  ``StorageOptions`` dict passes them on, ``presets.keras(**options)``. Each
  left out keeps its default. Whatever the storage, the step is float32 RMSProp's
  (or wider) from the decoded state: it divides by the exact new moments and
  only what is stored is rounded.

  Attributes:
    nu_dtype: storage dtype of :math:`\nu`, e.g. ``jnp.bfloat16`` to halve its
      memory and traffic. Each step decodes the stored :math:`\nu`, updates it
      with this gradient in float32 and divides by that exact value; only the
      new value stored is rounded. None (default): the params' (real) dtype.
    state_bits: 8 stores :math:`\nu` (and :math:`\mu`, the momentum buffer)
      as 8-bit codes with one float32 scale per block of 256 values, about a
      quarter of the float32 state's memory. None (default) keeps them as
      arrays. Leaves with fewer than ``min_quantize_size`` entries (biases,
      norm scales) and complex leaves stay unquantized. Not with
      ``nu_dtype``. Needs ``static_args=("state_bits",)`` under
      ``optax.inject_hyperparams``.
    rounding: ``"stochastic"`` (default) rounds every state value stored
      narrower than it is computed (``nu_dtype=bfloat16``, low-precision
      params, 8-bit state) up or down at random, so that the stored value is
      unbiased and small EMA increments are kept on average; ``"nearest"``
      rounds to nearest, which at decays near 1 loses increments smaller
      than half a code step: a bfloat16 :math:`\nu` then stops following
      its float32 value (it freezes below it while it should grow, above it
      while it should shrink; see notebook 06).
    seed: integer >= 0 (default 0) from which the rounding's random bits are
      derived, with the step count, the leaf and each element's index: no
      random key in the state, the same numbers eager, under ``jit`` or
      ``vmap`` and however the state is sharded.
    min_quantize_size: with ``state_bits=8``, leaves with fewer entries stay
      unquantized; None (default) means
      ``quantize.MIN_QUANTIZE_SIZE`` (4096).
  """

  nu_dtype: jax.typing.DTypeLike | None
  state_bits: StateBits
  rounding: Rounding
  seed: jax.typing.ArrayLike
  min_quantize_size: int | None


STORAGE_KEYS: tuple[str, ...] = tuple(StorageOptions.__annotations__)
"""The keywords of :class:`StorageOptions`, in order."""

MOMENTS = ("nu", "mu", "trace")
STREAMS = {"nu": 0, "mu": 1, "trace": 2}  # one stream of random bits per moment


def compute_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
  """float32 for low-precision floats, else the dtype itself (complex kept)."""
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
  return jnp.finfo(dtype).dtype


def cast(x: jax.Array, dtype: jax.typing.DTypeLike) -> jax.Array:
  """``x.astype(dtype)``, skipped (no trace work) when it is already that."""
  return x if x.dtype == dtype else lax.convert_element_type(x, dtype)


class Store(NamedTuple):
  """How one moment of one leaf is stored (static, decided from its shape)."""

  dtype: jnp.dtype  # storage dtype of a plain array (unused when quantized)
  quantized: bool  # 8-bit codes and block scales
  signed: bool  # signed codes (first moments) or not (nu)
  narrow: bool  # stored narrower than computed: the stored value is a rounding
  stochastic: bool  # rounded with random bits (narrow, rounding="stochastic")


class Plan(NamedTuple):
  """How one leaf's moments are stored (None where unused)."""

  nu: Store
  mu: Store | None
  trace: Store | None

  @property
  def variance(self) -> bool:
    r"""Centered with 8-bit moments: ``nu``'s slot keeps :math:`v = \nu - \mu^2`.

    ``nu - mu**2`` of two 8-bit moments (codes 6-12% apart) cancels where the
    variance is small next to ``nu``, rounding to 0 (a step of
    ``g / sqrt(eps)``). The variance is updated instead by the exact identity
    (Welford's, with exponential weights)
    :math:`v_t = \gamma\,(v_{t-1} + (1 - \gamma)\,(g_t - \mu_{t-1})^2)`,
    which subtracts nothing that can cancel; ``dequantize_state`` returns
    :math:`\nu = v + \mu^2`.
    """
    return self.mu is not None and self.nu.quantized

  @property
  def narrow(self) -> bool:
    return any(st is not None and st.narrow for st in self)


def _quantizable(shape: tuple[int, ...], dtype: jax.typing.DTypeLike, cfg: Config) -> bool:
  """8-bit storage for real leaves of rank >= 1 with >= min_quantize_size entries."""
  return (
    cfg.state_bits == 8
    and len(shape) >= 1
    and int(np.prod(shape)) >= cfg.quantize_from
    and not jnp.issubdtype(dtype, jnp.complexfloating)
  )


def store_for(moment: str, p_shape: tuple[int, ...], p_dtype: jax.typing.DTypeLike, cfg: Config) -> Store:
  """The storage of one moment of a parameter of ``p_shape`` and ``p_dtype``."""
  real = real_dtype(p_dtype)
  dtype = jnp.dtype((cfg.nu_dtype or real) if moment == "nu" else p_dtype)
  quantized = _quantizable(p_shape, p_dtype, cfg)
  compute = real_dtype(compute_dtype(p_dtype)) if moment == "nu" else compute_dtype(p_dtype)
  complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
  narrow = quantized or (not complex_ and jnp.finfo(dtype).bits < jnp.finfo(compute).bits)
  stochastic = narrow and cfg.rounding == "stochastic" and (quantized or jnp.finfo(dtype).bits < 32)
  return Store(dtype, quantized, moment != "nu", narrow, stochastic)


def plan_for(shape: tuple[int, ...], dtype: jax.typing.DTypeLike, cfg: Config) -> Plan:
  """How each moment of a leaf of ``shape`` and ``dtype`` is stored under ``cfg``."""
  return Plan(
    store_for("nu", shape, dtype, cfg),
    store_for("mu", shape, dtype, cfg) if cfg.centered else None,
    store_for("trace", shape, dtype, cfg) if cfg.momentum and cfg.scale_by_learning_rate else None,
  )


def load(x: Stored, dtype: jax.typing.DTypeLike) -> jax.Array:
  """A stored moment in compute dtype ``dtype`` (dequantized if 8-bit)."""
  if isinstance(x, QuantizedArray):
    return cast(quantize.dequantize(x), dtype)
  return cast(x, dtype)


def bits_for(x: jax.Array, key: jax.Array | None) -> jax.Array | None:
  """The random bits of one moment of one leaf, from its stream key (None: nearest)."""
  if key is None:
    return None
  return quantize.bits_from_key(key, x.shape, out_sharding=explicit_sharding(x))


def store(x: jax.Array, st: Store, key: jax.Array | None, scale: jax.Array | None = None) -> Stored:
  """A computed moment as stored: cast, rounded to a narrow dtype, or quantized.

  ``key``: the moment's stream key when its rounding is stochastic. ``scale``:
  the per-block scale of 8-bit codes (default: the exact block maximum).
  """
  if st.quantized:
    return quantize.quantize(x, signed=st.signed, bits=bits_for(x, key), scale=scale)
  if not st.narrow or jnp.iscomplexobj(x) or jnp.finfo(st.dtype).bits >= 32:
    return cast(x, st.dtype)
  return quantize.round_to(x, st.dtype, bits_for(x, key))


def stored_dtype(x: Stored) -> jax.typing.DTypeLike:
  """The dtype a stored moment is computed in from: float32 for 8-bit codes."""
  return jnp.float32 if isinstance(x, QuantizedArray) else x.dtype


def is_centered_variance(nu: Stored, mu: Stored | None) -> bool:
  """Whether a leaf's stored ``nu`` holds ``nu - mu**2`` (centered, 8-bit codes).

  See :attr:`Plan.variance`; ``nu = dequantize(nu) + dequantize(mu)**2``.
  """
  return isinstance(nu, QuantizedArray) and mu is not None


def _is_code_mapping(x: object) -> TypeGuard[Mapping[str, jax.Array]]:
  return isinstance(x, Mapping) and set(x.keys()) == {"codes", "scale"}


def is_stored_leaf(x: object) -> bool:
  """Whether ``x`` is one stored moment that pytrees would split (8-bit codes)."""
  return isinstance(x, QuantizedArray) or _is_code_mapping(x)


def as_stored(x: _T) -> _T | QuantizedArray:
  """A stored moment: an array or :class:`QuantizedArray`.

  A mapping of exactly ``codes`` and ``scale`` is taken for the
  :class:`QuantizedArray` it came from: Flax NNX's optimizer keeps the state
  as ``nnx.State`` and turns every pytree node inside it into one.
  """
  if _is_code_mapping(x):
    return QuantizedArray(x["codes"], x["scale"])
  return x


def explicit_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
  """``x``'s sharding where a mesh with explicit axes types it, else None."""
  return quantize._explicit_sharding(x)


def initial(
  moment: str,
  p: jax.Array | np.ndarray | jax.ShapeDtypeStruct,
  value: jax.typing.ArrayLike,
  cfg: Config,
) -> Stored:
  """One moment of parameter ``p`` filled with ``value``, stored and placed like ``p``.

  8-bit codes of a constant are written down (:func:`quantize.full`), never
  computed. For an array, a plain ``jnp.full_like`` has no data dependence on
  ``p`` under ``jit``, so XLA would place it on one device; a select from
  ``p`` (always false, folded away) lets sharding propagate from ``p``.
  """
  st = store_for(moment, tuple(p.shape), jnp.result_type(p), cfg)
  if st.quantized:
    return quantize.full(p.shape, value, signed=st.signed, like=p)
  return quantize._filled(tuple(p.shape), lax.convert_element_type(value, st.dtype), p)
