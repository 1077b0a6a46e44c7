"""Low-precision optimizer state: stochastic rounding and 8-bit block codes.

Building blocks for storing an optimizer's state narrower than it is computed,
written to be traced inside a fused per-leaf update (``lax`` primitives,
static Python ints for leaf indices, no PRNG key in the state):

* :func:`random_bits`: counter-based random bits, a hash of ``(seed, count,
  leaf_index, element index)``. The same bits eager, under ``jit``, under
  ``vmap`` and however the array is sharded.
* :func:`round_to`: float32 to bfloat16/float16, to nearest or stochastically
  (unbiased: the expected stored value is the float32 value).
* :func:`quantize` / :func:`dequantize`: 8-bit codes with one float32 scale
  per block of :data:`BLOCK_SIZE` values, for the code maps in :data:`CODES`,
  rounded to nearest or stochastically (unbiased in the value domain).
* :func:`block_absmax`, :func:`expand_blocks`, :func:`scale_shape`: the block
  layout, for updates that compute their own scale (e.g. an upper bound).

Block layout. For an array of shape ``(d0, d1, ..., dn)`` with
``T = d1 * ... * dn >= 256`` elements per leading index ("row"), each row is
cut into ``ceil(T / 256)`` blocks of 256 consecutive (row-major) elements, the
last one shorter when ``T`` is not a multiple of 256; the scale has shape
``(d0, ceil(T / 256))``. Blocks never straddle rows, so an array sharded over
its first dimension quantizes without communication, and its scale shards the
same way. 1-D arrays, and arrays with fewer than 256 elements per row, are
cut into blocks of 256 consecutive elements of the flattened array (the last
one shorter); the scale has shape ``(ceil(size / 256),)``. Codes always keep
the array's shape (and sharding). Scalars are not quantized. Under a mesh with
explicit axes, an array whose blocks cross its shards (sharded over a
dimension other than the first, or a flat layout over several shards) is
gathered over those dimensions to compute its blocks: the same numbers as
unsharded, at the cost of the gather.

In an RMSProp update (per leaf, ``g`` the float32 gradient, ``q`` the stored
second moment, ``i`` a static index per state leaf)::

  g2 = g * g
  # The step divides by the exact new nu, from the stored codes and this gradient:
  nu = decay * dequantize(q) + (1 - decay) * g2
  u = g * lax.rsqrt(nu + eps)
  # Only the stored value is rounded, with the block scale decay * q.scale +
  # (1 - decay) * block_absmax(g2), an upper bound on the new nu of a block from
  # the gradient alone: one pass over the codes.
  q = ema_update(q, g2, decay, bits=random_bits(seed, count, i, g.shape))

``quantize(nu, signed=False, bits=..., scale=None)`` of the float32 ``nu``
quantizes with the exact block maximum instead: the same accuracy, one more
byte per parameter read (``benchmarks/quant_codes.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BLOCK_SIZE = 256
"""Values per block, each block sharing one float32 scale (as bitsandbytes)."""

MIN_QUANTIZE_SIZE = 4096
"""Leaves with fewer elements are better left unquantized (the scale and the
extra work cost more than the bytes saved)."""

CODES = ("float_e5", "float_e4", "float_e3", "dynamic", "sqrt", "linear")
"""Code maps: ``"float_eK"`` (an 8-bit float of the block-relative value with
K exponent bits and a linear range below its smallest binade, as subnormals),
bitsandbytes' ``"dynamic"`` tree map, ``"sqrt"`` (the square root of the
magnitude, linearly) and ``"linear"``. See :func:`code_values`."""

NU_CODE = "float_e5"
"""The default unsigned map (second moments). Ten decades below the block's
maximum: RMSProp divides by ``sqrt(nu)``, and an element whose ``nu`` falls
below the smallest code of its block is stored as 0, its next step as large as
``g / sqrt(eps)``. Narrower maps (more precise near the maximum) lose such
elements when a block's ``nu`` spans more than ~5 decades
(``benchmarks/quant_codes.md``)."""

SIGNED_CODE = "sqrt"
"""The default signed map (first moments, momentum buffers): the most accurate
of the candidates for an EMA of ``g`` (``benchmarks/quant_codes.md``)."""

_LANES = 8  # width of the partial maxima in block_absmax (one AVX register)


# ---------------------------------------------------------------------------
# Counter-based random bits.
# ---------------------------------------------------------------------------


def _u32(v: int) -> np.uint32:
  return np.uint32(v & 0xFFFFFFFF)


def _mix32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit finalizer with full avalanche ("lowbias32", Wellons)."""
  x = lax.bitwise_xor(x, lax.shift_right_logical(x, _u32(16)))
  x = lax.mul(x, _u32(0x7FEB352D))
  x = lax.bitwise_xor(x, lax.shift_right_logical(x, _u32(15)))
  x = lax.mul(x, _u32(0x846CA68B))
  return lax.bitwise_xor(x, lax.shift_right_logical(x, _u32(16)))


def _as_u32(v: jax.typing.ArrayLike) -> jax.Array:
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return jnp.asarray(_u32(int(v)))
  v = jnp.asarray(v)
  if v.shape:
    raise ValueError(f"seed and count must be scalars, got shape {v.shape}")
  if not jnp.issubdtype(v.dtype, jnp.integer):
    raise TypeError(f"seed and count must be integers, got dtype {v.dtype}")
  return lax.convert_element_type(v, jnp.uint32)


def _global_index(shape: tuple[int, ...], sharding: jax.sharding.NamedSharding | None = None) -> jax.Array:
  """Each element's row-major index in the whole array (mod 2**32), as uint32.

  One ``iota`` of the flattened array, reshaped; under a mesh with explicit
  axes, the sum of a ``broadcasted_iota`` per dimension (each typed with the
  array's sharding), so that every shard computes its own elements' global
  indices. Both give the same numbers.
  """
  if not shape:
    return jnp.zeros((), jnp.uint32)
  if sharding is None:  # two ops, however many dimensions
    return lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  terms = []  # last dimension first: the sum is ((last + ...) + first)
  stride = 1
  for d in reversed(range(len(shape))):
    term = lax.broadcasted_iota(jnp.uint32, shape, d, out_sharding=sharding)
    if stride != 1:
      term = lax.mul(term, _u32(stride))
    terms.append(term)
    stride *= shape[d]
  return functools.reduce(lax.add, terms)


def stream_key(seed: jax.typing.ArrayLike, count: jax.typing.ArrayLike, leaf_index: int) -> jax.Array:
  """The uint32 key of one stream of :func:`random_bits` (a scalar)."""
  k = _mix32(lax.add(_as_u32(seed), _u32(0x9E3779B9)))
  k = _mix32(lax.bitwise_xor(k, _as_u32(count)))
  return _mix32(lax.add(k, _u32(0x85EBCA6B * (int(leaf_index) + 1))))


_KEY_GROUP = 32  # stream keys extracted per variadic reduce (see stream_keys)


def stream_keys(
  seed: jax.typing.ArrayLike, count: jax.typing.ArrayLike, leaf_indices: Sequence[int]
) -> list[jax.Array]:
  """:func:`stream_key` of many streams, as separate scalars computed at run time.

  The keys are computed as one vector and handed out by variadic reductions
  (one per group of 32), whose outputs XLA keeps as buffers: each consumer
  then takes its key as an operand instead of fusing its own constant. Two
  leaves of one shape thus compile to the same kernels, which XLA compiles
  once (a tree of 200 same-shaped leaves compiles like a tree of a few).
  """
  idx = [int(i) for i in leaf_indices]
  if not idx:
    return []
  k = _mix32(lax.add(_as_u32(seed), _u32(0x9E3779B9)))
  k = _mix32(lax.bitwise_xor(k, _as_u32(count)))
  salt = np.asarray([(0x85EBCA6B * (i + 1)) & 0xFFFFFFFF for i in idx], np.uint32)
  keys = _mix32(lax.add(lax.broadcast(k, (len(idx),)), jnp.asarray(salt)))
  pair = jnp.stack([keys, jnp.zeros_like(keys)], axis=1)  # (n, 2): each key reduced with a 0
  out: list[jax.Array] = []
  for start in range(0, len(idx), _KEY_GROUP):
    ops = tuple(
      lax.index_in_dim(pair, i, 0, keepdims=False) for i in range(start, min(start + _KEY_GROUP, len(idx)))
    )
    init = tuple(np.uint32(0) for _ in ops)
    out.extend(lax.reduce(ops, init, lambda a, b: tuple(map(lax.bitwise_or, a, b)), (0,)))
  return out


def bits_from_key(
  key: jax.Array, shape: Sequence[int], *, out_sharding: jax.sharding.NamedSharding | None = None
) -> jax.Array:
  """:func:`random_bits` of one stream from its :func:`stream_key`."""
  shape = tuple(int(d) for d in shape)
  idx = _global_index(shape, out_sharding)
  return _mix32(lax.bitwise_xor(idx, key))  # key: a scalar, broadcast like idx


def random_bits(
  seed: jax.typing.ArrayLike,
  count: jax.typing.ArrayLike,
  leaf_index: int,
  shape: Sequence[int],
  *,
  out_sharding: jax.sharding.NamedSharding | None = None,
) -> jax.Array:
  r"""Uniform random uint32 bits, a hash of step, leaf and element index.

  .. math::

    \text{bits}[i] = h\big(i \oplus k\big), \qquad
    k = h\big(h(h(\text{seed} + c_1) \oplus \text{count}) + c_2\,\text{leaf}\big)

  where :math:`i` is the element's row-major index in the whole array and
  :math:`h` a bijective 32-bit integer finalizer (two multiplies, three
  xor-shifts). Nothing is kept in the optimizer state: the bits are a pure
  function of their arguments, the same eager, under ``jit``, under ``vmap``
  (``seed`` or ``count`` may be batched) and however the array is sharded.

  Args:
    seed: integer scalar (a Python int, array or tracer), the stream's seed.
    count: integer scalar, e.g. the optimizer's step count.
    leaf_index: static Python int telling the state leaves apart; give each
      leaf (and each of ``nu``, ``mu``, ``trace`` of a parameter) its own.
    shape: the shape of the array to round.
    out_sharding: the sharding of that array where a mesh with explicit axes
      types it (``jax.typeof(x).sharding``); None otherwise.

  Returns:
    A uint32 array of ``shape``.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax.quantize import random_bits
    >>> a = random_bits(0, jnp.int32(3), 0, (2, 3))
    >>> a.dtype, a.shape
    (dtype('uint32'), (2, 3))
    >>> bool((a == random_bits(0, 3, 0, (2, 3))).all())
    True
    >>> bool((a == random_bits(0, 4, 0, (2, 3))).any())
    False
  """
  return bits_from_key(stream_key(seed, count, leaf_index), shape, out_sharding=out_sharding)


def _check_bits(bits: jax.Array, shape: tuple[int, ...]) -> None:
  if bits.shape != shape or bits.dtype != jnp.uint32:
    raise ValueError(
      f"bits must be a uint32 array of the value's shape {shape}, got {bits.dtype}{list(bits.shape)}"
    )


def _uniform24(bits: jax.Array) -> jax.Array:
  """The top 24 bits as a float32 in [0, 1) (exact: multiples of 2**-24)."""
  top = lax.convert_element_type(lax.shift_right_logical(bits, _u32(8)), jnp.float32)
  return lax.mul(top, np.float32(2.0**-24))


# ---------------------------------------------------------------------------
# Rounding float32 to a narrower float.
# ---------------------------------------------------------------------------


def round_to(x: jax.Array, dtype: jax.typing.DTypeLike, bits: jax.Array | None = None) -> jax.Array:
  r"""Rounds float32 ``x`` to ``dtype``: to nearest, or stochastically.

  Stochastic rounding returns one of the two ``dtype`` values that bracket
  ``x``, the upper one with probability proportional to the distance from the
  lower one, so the result is unbiased:

  .. math::

    \mathbb{E}[\operatorname{round}(x)] = x, \qquad
    P(\text{up}) = \frac{x - \lfloor x \rfloor}{\lceil x \rceil - \lfloor x \rfloor}

  This holds exactly for every finite ``x`` within ``dtype``'s range,
  subnormals and negative values included (for bfloat16: add random low 16
  bits to the float32 pattern and truncate; float16 drops as many bits as its
  exponent needs, and below its smallest subnormal compares 32 random bits,
  which leaves an error below :math:`2^{-56}`). Infinities and NaN stay what
  they are. Beyond the largest finite value, float16 rounds to nearest (as the
  cast does) and bfloat16 rounds up to infinity with the probability it would
  have if infinity were the next value (:math:`2^{128}`). An
  exponential moving average stored this way keeps every increment in
  expectation, where rounding to nearest throws away any increment smaller
  than half a unit in the last place of the stored value.

  Args:
    x: a float array (computed in float32).
    dtype: the storage dtype, e.g. ``jnp.bfloat16`` or ``jnp.float16``. A
      dtype at least as wide as float32 is a plain cast.
    bits: None to round to nearest (even), else uint32 random bits of ``x``'s
      shape, e.g. from :func:`random_bits`.

  Returns:
    ``x`` rounded to ``dtype``.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax.quantize import round_to
    >>> x = jnp.full((4096,), 1 + 2.0**-9, jnp.float32)  # a quarter ulp above 1
    >>> round_to(x, jnp.bfloat16)[0]  # nearest: the increment is lost
    Array(1, dtype=bfloat16)
    >>> bits = jnp.arange(4096, dtype=jnp.uint32) * 16  # evenly spread low bits
    >>> r = round_to(x, jnp.bfloat16, bits).astype(jnp.float32)
    >>> float(r.mean()) == 1 + 2.0**-9  # stochastic: exact on average
    True

  References:
    Forsythe, "Round-off errors in numerical integration on automatic
    machinery", 1950; Gupta et al., "Deep Learning with Limited Numerical
    Precision", 2015; Connolly, Higham and Mary, "Stochastic Rounding and Its
    Probabilistic Backward Error Analysis", 2021.
  """
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a real floating dtype, got {dtype}")
  if jnp.finfo(dtype).bits >= 32 or bits is None:
    return x.astype(dtype)
  x = x.astype(jnp.float32)
  _check_bits(bits, x.shape)
  info = jnp.finfo(dtype)
  nmant, minexp, fmax = int(info.nmant), int(info.minexp), float(info.max)
  if nmant >= 23:
    raise TypeError(f"cannot round float32 to {dtype}: it is not narrower")
  xb = lax.bitcast_convert_type(x, jnp.uint32)
  if minexp <= -126:
    # bfloat16-like (float32's exponent range): add random bits below the
    # kept ones and truncate. A carry past the largest finite value gives
    # infinity, as if it were the next value up; infinities stay; the NaNs
    # arithmetic makes (quiet, payload 0) stay NaN. Ending in the cast (which
    # XLA counts as expensive) keeps XLA from recomputing the rounding in
    # every consumer of the stored value.
    low = _u32((1 << (23 - nmant)) - 1)
    rb = lax.bitwise_and(lax.add(xb, lax.bitwise_and(bits, low)), lax.bitwise_not(low))
    return lax.convert_element_type(lax.bitcast_convert_type(rb, jnp.float32), dtype)
  stoch = _round_bits_variable(x, xb, bits, nmant, minexp)
  finite = lax.le(lax.abs(x), np.float32(fmax))  # False for inf and NaN
  return lax.convert_element_type(lax.select(finite, stoch, x), dtype)


def _round_bits_variable(x: jax.Array, xb: jax.Array, bits: jax.Array, nmant: int, minexp: int) -> jax.Array:
  """Stochastic rounding to a float whose subnormals start inside float32's range."""
  sign = lax.bitwise_and(xb, _u32(0x80000000))
  mag = lax.bitwise_and(xb, _u32(0x7FFFFFFF))
  biased = lax.max(lax.shift_right_logical(mag, _u32(23)), _u32(1))
  # Bits to drop: 23 - nmant in the normal range, one more per binade below
  # the target's smallest normal exponent (its subnormal grid is uniform).
  below = lax.sub(lax.max(biased, _u32(127 + minexp)), biased)
  drop = lax.min(lax.add(below, _u32(23 - nmant)), _u32(23))
  low = lax.sub(lax.shift_left(_full(1, mag), drop), _u32(1))
  rounded = lax.bitwise_and(lax.add(mag, lax.bitwise_and(bits, low)), lax.bitwise_not(low))
  # Below the smallest subnormal t = 2**(minexp - nmant): t with probability
  # |x| / t, else 0, from a 32-bit comparison.
  tiny_exp = minexp - nmant
  thresh = lax.convert_element_type(lax.mul(lax.abs(x), np.float32(2.0 ** (32 - tiny_exp))), jnp.uint32)
  tiny_val = lax.select(lax.lt(bits, thresh), _full(_u32((127 + tiny_exp) << 23), mag), _full(_u32(0), mag))
  is_tiny = lax.lt(mag, _u32((127 + tiny_exp) << 23))
  out = lax.bitwise_or(lax.select(is_tiny, tiny_val, rounded), sign)
  return lax.bitcast_convert_type(out, jnp.float32)


def _full(value: float | np.number, like: jax.Array) -> jax.Array:
  """``value`` in ``like``'s shape, dtype and sharding."""
  return lax.full_like(like, np.asarray(value, like.dtype))


# ---------------------------------------------------------------------------
# Block layout.
# ---------------------------------------------------------------------------


class _Layout(NamedTuple):
  rows: int  # leading groups: shape[0] (row layout) or 1 (flat layout)
  length: int  # elements per group
  blocks: int  # blocks per group
  flat: bool

  @property
  def padded(self) -> int:
    return self.blocks * BLOCK_SIZE


@functools.cache
def _layout(shape: tuple[int, ...]) -> _Layout:
  if not shape:
    raise ValueError("scalars are not quantized: give quantize an array of rank >= 1")
  size = math.prod(shape)
  if len(shape) >= 2 and shape[0] > 0:
    row = size // shape[0]
    if row >= BLOCK_SIZE:
      return _Layout(shape[0], row, -(-row // BLOCK_SIZE), False)
  return _Layout(1, size, -(-size // BLOCK_SIZE), True)


def scale_shape(shape: Sequence[int]) -> tuple[int, ...]:
  """Shape of the per-block scale of an array of ``shape`` (see the module doc).

  Example:
    >>> from rmsprop_jax.quantize import scale_shape
    >>> scale_shape((3, 3, 64, 128)), scale_shape((512, 1000)), scale_shape((1000,))
    ((3, 96), (512, 4), (4,))
  """
  lay = _layout(tuple(int(d) for d in shape))
  return (lay.blocks,) if lay.flat else (lay.rows, lay.blocks)


def _explicit_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
  """``x``'s sharding where a mesh with explicit axes types it, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  return sharding if getattr(mesh, "explicit_axes", ()) else None


def _explicit_spec(x: jax.Array) -> jax.sharding.PartitionSpec | None:
  sharding = _explicit_sharding(x)
  return None if sharding is None else sharding.spec


def _gathered_for_blocks(x: jax.Array, lay: _Layout) -> jax.Array:
  """``x``, gathered where (under an explicit mesh) its blocks cross its shards.

  Blocks lie inside the shards of an array sharded over dimension 0 only (as
  :func:`rmsprop_jax.state_shardings` shards): in the row layout always; in
  the flat layout for a 1-D array whose size is a multiple of the block
  size and whose block count is a multiple of its shards. Otherwise the
  blocks are computed on the array gathered over the dimensions that cut
  them (the result is the same; the gather is the price of the layout).
  """
  given = _explicit_spec(x)
  if given is None or all(s is None for s in given):
    return x
  spec = tuple(given) + (None,) * (x.ndim - len(given))
  if not lay.flat:
    keep = spec[:1]
  elif x.ndim == 1 and lay.padded == lay.length:
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    shards = math.prod(jax.typeof(x).sharding.mesh.shape[a] for a in axes)
    keep = spec[:1] if lay.blocks % shards == 0 else ()
  else:
    keep = ()
  if all(s is None for s in spec[len(keep) :]):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*keep))


def _block_view(x: jax.Array, lay: _Layout, fill: float) -> jax.Array:
  """``x`` as ``(rows, blocks, BLOCK_SIZE)``, short blocks padded with ``fill``.

  Under an explicit mesh, gathered first where blocks cross shards
  (:func:`_gathered_for_blocks`).
  """
  v = _gathered_for_blocks(x, lay).reshape(lay.rows, lay.length)
  if lay.padded != lay.length:
    v = lax.pad(v, np.asarray(fill, x.dtype), ((0, 0, 0), (0, lay.padded - lay.length, 0)))
  return v.reshape(lay.rows, lay.blocks, BLOCK_SIZE)


def expand_blocks(per_block: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Broadcasts one value per block (scale-shaped) to every element of ``shape``.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax.quantize import expand_blocks
    >>> e = expand_blocks(jnp.array([1.0, 2.0]), (300,))
    >>> float(e[255]), float(e[256]), e.shape
    (1.0, 2.0, (300,))
  """
  shape = tuple(int(d) for d in shape)
  lay = _layout(shape)
  want = scale_shape(shape)
  if per_block.shape != want:
    raise ValueError(f"expected per-block values of shape {want}, got {per_block.shape}")
  s = per_block.reshape(lay.rows, lay.blocks)
  e = lax.broadcast_in_dim(s, (lay.rows, lay.blocks, BLOCK_SIZE), (0, 1))
  e = e.reshape(lay.rows, lay.padded)
  if lay.padded != lay.length:
    e = lax.slice(e, (0, 0), (lay.rows, lay.length))
  return e.reshape(shape)


def _expand_like(per_block: jax.Array, like: jax.Array) -> jax.Array:
  """:func:`expand_blocks` to ``like``'s shape, and sharding under an explicit mesh."""
  e = expand_blocks(per_block, like.shape)
  spec = _explicit_spec(like)
  if spec is not None and _explicit_spec(e) != spec:
    e = jax.sharding.reshard(e, spec)
  return e


def _select_max(a: jax.Array, b: jax.Array) -> jax.Array:
  return lax.select(lax.gt(a, b), a, b)


def block_absmax(x: jax.Array) -> jax.Array:
  r"""The largest ``|x|`` of each block, as float32 of :func:`scale_shape`.

  NaN propagates (a block with a NaN has a NaN maximum). Computed on the
  float32 bit patterns (for non-negative floats their integer order is their
  numeric order, and NaN's pattern is above infinity's) in two stages: the
  maximum over 32 strided groups of 8 neighbours, which XLA:CPU vectorizes
  across the 8 lanes, then over those 8. On XLA:CPU a plain ``max`` over the
  last axis of ``(blocks, 256)``, or a tree of ``maximum`` over halves of the
  block, is about 15x slower (``benchmarks/quant_codes.md``).

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax.quantize import block_absmax
    >>> block_absmax(jnp.arange(-300.0, 0.0))  # blocks [-300, -45), [-44, 0)
    Array([300.,  44.], dtype=float32)
  """
  lay = _layout(tuple(x.shape))
  a = lax.bitwise_and(lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32), np.int32(0x7FFFFFFF))
  v = _block_view(a, lay, 0).reshape(lay.rows, lay.blocks, BLOCK_SIZE // _LANES, _LANES)
  # Reductions written with select, not max: with max, XLA fuses the two
  # stages into one reduction over a minor axis (slow), and when the input is
  # computed in the same fusion (e.g. the new nu from codes and gradient) the
  # select form is also ~25% faster in the whole step.
  m = lax.reduce(v, np.int32(0), _select_max, (2,))
  m = lax.reduce(m, np.int32(0), _select_max, (2,))
  m = lax.bitcast_convert_type(m, jnp.float32)
  return m.reshape(scale_shape(x.shape))


# ---------------------------------------------------------------------------
# Code maps.
# ---------------------------------------------------------------------------


class _Map(NamedTuple):
  kind: str  # "float", "linear", "sqrt", "table"
  signed: bool
  top: float  # largest grid value; a code's value is grid / top * scale
  exp_bits: int = 0
  man_bits: int = 0


def _dynamic_values(signed: bool) -> np.ndarray:
  """bitsandbytes' dynamic tree map (``create_dynamic_map``), sorted, float64.

  Seven decades, 10**-6 ... 10**0; decade i holds the midpoints of an even
  split of [0.1, 1] * 10**(i - 6) into 2**(i + 1) parts (2**i per sign when
  signed), plus 0 and 1.
  """
  vals = [np.array([0.0, 1.0])]
  for i in range(7):
    n = 2**i if signed else 2 ** (i + 1)
    edges = np.linspace(0.1, 1.0, n + 1)
    mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
    vals += [mids, -mids] if signed else [mids]
  out = np.sort(np.concatenate(vals).astype(np.float64))
  assert out.size == 256
  return out


@functools.cache
def _code_map(code: str, signed: bool) -> _Map:
  if code.startswith("float_e") and code[len("float_e") :].isdigit():
    e = int(code[len("float_e") :])
    m = (7 if signed else 8) - e
    if not (2 <= e <= 6 and m >= 1):
      raise ValueError(f"code {code!r}: exponent bits must be in [2, 6]")
    emin = -(2**e - 1)
    top = (2.0 - 2.0**-m) - 2.0**emin
    return _Map("float", signed, top, e, m)
  if code == "linear":
    return _Map("linear", signed, 127.0 if signed else 255.0)
  if code == "sqrt":
    return _Map("sqrt", signed, 127.0**2 if signed else 255.0**2)
  if code == "dynamic":
    return _Map("table", signed, 1.0)
  raise ValueError(f"unknown code {code!r}; choose from {CODES}")


def _default_code(code: str | None, signed: bool) -> str:
  return code if code is not None else (SIGNED_CODE if signed else NU_CODE)


@functools.cache
def _table(code: str, signed: bool) -> tuple[np.ndarray, int]:
  """Sorted grid values of a table map and the position of zero."""
  vals = _dynamic_values(signed) if code == "dynamic" else None
  if vals is None:
    raise ValueError(code)
  return vals.astype(np.float32), int(np.flatnonzero(vals == 0)[0])


def code_values(code: str | None = None, signed: bool = False) -> np.ndarray:
  """The value of every code, in units of the block's scale (max magnitude 1).

  Entry ``k`` is the value of the code whose bit pattern is ``k`` (for signed
  codes, the int8 ``k - 256`` when ``k >= 128``). Every map represents 0
  exactly, as code 0. Signed maps other than ``"dynamic"`` are symmetric and
  leave int8 -128 unused (its entry is NaN).

  Args:
    code: one of :data:`CODES`; None for the default of ``signed``
      (:data:`NU_CODE` or :data:`SIGNED_CODE`).
    signed: the signed (int8) or unsigned (uint8) variant.

  Returns:
    A float64 array of 256 values.

  Example:
    >>> from rmsprop_jax.quantize import code_values
    >>> v = code_values("float_e5")
    >>> float(v[1])  # the smallest step: ten decades below the maximum
    3.1e-11
    >>> float(v[0]), float(v[255]), bool((v[1:] > v[:-1]).all())
    (0.0, 1.0, True)
    >>> code_values("linear", signed=True)[[0, 1, 127, 129, 255]].round(4)
    array([ 0.    ,  0.0079,  1.    , -1.    , -0.0079])
  """
  code = _default_code(code, signed)
  cm = _code_map(code, signed)
  k = np.arange(256)
  kk = np.where(k >= 128, k - 256, k) if signed else k
  mag = np.abs(kk).astype(np.float64)
  sgn = np.sign(kk).astype(np.float64) if signed else np.ones(256)
  if cm.kind == "table":
    vals, zero = _table(code, signed)
    return vals.astype(np.float64)[(kk + zero) % 256]
  if cm.kind == "float":
    emin = -(2**cm.exp_bits - 1)
    e, f = np.floor_divide(mag, 2**cm.man_bits), np.mod(mag, 2**cm.man_bits)
    grid = 2.0 ** (emin + e) * (1 + f / 2**cm.man_bits) - 2.0**emin
  elif cm.kind == "linear":
    grid = mag
  else:
    grid = mag**2
  out = sgn * grid / cm.top
  if signed:
    out[128] = np.nan
  return out


def _encode(y: jax.Array, cm: _Map, code: str, bits: jax.Array | None) -> jax.Array:
  """Codes of ``y`` in grid units (``|y| <= cm.top``).

  Each map ends with a binary operation on two full-size arrays (floor code +
  carry, or a sign select): XLA then never duplicates the whole quantization
  into a consumer that dequantizes the new codes (it reads them from memory).
  """
  if cm.kind == "table":
    return _encode_table(y, cm, code, bits)
  # Clamps written as selects: XLA's max/min also test for NaN (slower on CPU).
  a = lax.abs(y) if cm.signed else _select_max(y, _full(0, y))
  a = lax.select(lax.lt(a, _full(cm.top, a)), a, _full(cm.top, a))
  if cm.kind == "float":
    shift = 23 - cm.man_bits
    emin = -(2**cm.exp_bits - 1)
    low = _u32((1 << shift) - 1)
    w = lax.bitcast_convert_type(lax.add(a, np.float32(2.0**emin)), jnp.uint32)
    bias = (127 + emin) << cm.man_bits  # the code of 2**emin before the offset
    if not cm.signed and bias % 256 == 0:
      base = lax.shift_right_logical(w, _u32(shift))  # uint8 wraps the bias away
    else:
      base = lax.shift_right_logical(lax.sub(w, _u32((127 + emin) << 23)), _u32(shift))
    frac = lax.bitwise_and(w, low)
    r = _u32(1 << (shift - 1)) if bits is None else lax.bitwise_and(bits, low)
    carry = lax.shift_right_logical(lax.add(frac, r), _u32(shift))
  else:
    if cm.kind == "linear":
      k = lax.floor(a)
      p = lax.sub(a, k)
    else:  # sqrt: grid values k**2; correct the rounded root both ways
      k = lax.floor(lax.sqrt(a))
      k1 = lax.add(k, np.float32(1))
      k = lax.select(lax.le(lax.mul(k1, k1), a), k1, k)
      k = lax.select(lax.gt(lax.mul(k, k), a), lax.sub(k, np.float32(1)), k)
      p = lax.div(lax.sub(a, lax.mul(k, k)), lax.add(lax.add(k, k), np.float32(1)))
    base = lax.convert_element_type(k, jnp.uint32)
    up = lax.ge(p, np.float32(0.5)) if bits is None else lax.lt(_uniform24(bits), p)
    carry = lax.convert_element_type(up, jnp.uint32)
  if not cm.signed:
    return lax.add(lax.convert_element_type(base, jnp.uint8), lax.convert_element_type(carry, jnp.uint8))
  mag = lax.add(lax.convert_element_type(base, jnp.int8), lax.convert_element_type(carry, jnp.int8))
  return lax.select(lax.lt(y, np.float32(0)), lax.neg(mag), mag)


def _encode_table(y: jax.Array, cm: _Map, code: str, bits: jax.Array | None) -> jax.Array:
  vals, zero = _table(code, cm.signed)
  table = jnp.asarray(vals)
  y = jnp.clip(y, vals[0], vals[-1])
  i = jnp.clip(jnp.searchsorted(table, y, side="right", method="scan_unrolled") - 1, 0, 254)
  lo, hi = table[i], table[i + 1]
  p = (y - lo) / (hi - lo)
  up = (p >= 0.5) if bits is None else (_uniform24(bits) < p)
  idx = i + up.astype(i.dtype)
  if not cm.signed:
    return idx.astype(jnp.uint8)
  return lax.bitcast_convert_type(((idx - zero) % 256).astype(jnp.uint8), jnp.int8)


def _decode(codes: jax.Array, cm: _Map, code: str) -> jax.Array:
  """Grid values of ``codes`` (float32, ``|value| <= cm.top``)."""
  if cm.kind == "table":
    vals, zero = _table(code, cm.signed)
    k = codes.astype(jnp.int32)
    idx = (k + zero) % 256 if cm.signed else k
    return jnp.asarray(vals)[idx]
  mag = lax.abs(codes.astype(jnp.int32)) if cm.signed else codes
  if cm.kind == "float":
    shift = 23 - cm.man_bits
    emin = -(2**cm.exp_bits - 1)
    w = lax.add(
      lax.shift_left(lax.convert_element_type(mag, jnp.uint32), _u32(shift)),
      _u32((127 + emin) << 23),
    )
    v = lax.sub(lax.bitcast_convert_type(w, jnp.float32), np.float32(2.0**emin))
  else:
    v = lax.convert_element_type(mag, jnp.float32)
    if cm.kind == "sqrt":
      v = lax.mul(v, v)
  if cm.signed:
    v = lax.select(lax.lt(codes, _full(0, codes)), lax.neg(v), v)
  return v


# ---------------------------------------------------------------------------
# 8-bit blockwise quantization.
# ---------------------------------------------------------------------------


def _map_of(codes: jax.Array, code: str | None) -> tuple[_Map, str]:
  """The code map of stored codes (uint8 or int8) and its name."""
  if codes.dtype not in (jnp.uint8, jnp.int8):
    raise TypeError(f"codes must be uint8 or int8, got {codes.dtype}")
  signed = codes.dtype == jnp.int8
  code = _default_code(code, signed)
  return _code_map(code, signed), code


def _to_grid(scale: jax.Array, cm: _Map) -> jax.Array:
  """Per block, values -> grid units (``top / scale``; 0 for an all-zero block)."""
  return lax.select(lax.gt(scale, _full(0, scale)), lax.div(_full(cm.top, scale), scale), _full(0, scale))


def _from_grid(scale: jax.Array, cm: _Map) -> jax.Array:
  """Per block, grid units -> values (``scale / top``)."""
  return lax.div(scale, _full(np.float32(cm.top), scale))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale"], meta_fields=["code"])
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """An array stored as 8-bit codes and one float32 scale per block.

  A pytree of two arrays (checkpoints, ``vmap`` and sharding treat it like
  any state) with its code map as static metadata, so that
  :func:`dequantize` decodes it with the map it was quantized with.

  Attributes:
    codes: uint8 (unsigned maps) or int8 (signed maps) codes, of the original
      array's shape.
    scale: float32, one per block (:func:`scale_shape`): the largest
      magnitude the block may hold, by default its absolute maximum.
    code: the code map (one of :data:`CODES`), or None for the default of the
      codes' signedness (:data:`NU_CODE` for uint8, :data:`SIGNED_CODE` for
      int8).
  """

  codes: jax.Array
  scale: jax.Array
  code: str | None = None

  def __post_init__(self) -> None:
    if self.code is not None and self.code not in CODES:
      raise ValueError(f"code must be one of {CODES} or None, got {self.code!r}")

  @property
  def shape(self) -> tuple[int, ...]:
    """The shape of the array the codes stand for (that of ``codes``)."""
    return tuple(self.codes.shape)

  def __iter__(self):  # ``codes, scale = q``, as when this was a (codes, scale) tuple
    return iter((self.codes, self.scale))


def _code_field(code: str | None, signed: bool) -> str | None:
  """``code`` as stored in :class:`QuantizedArray`: None for the default map."""
  return None if code is None or code == _default_code(None, signed) else code


def _resolve_code(q: QuantizedArray, code: str | None) -> str | None:
  """The map to decode ``q`` with: its own; a ``code`` argument must agree."""
  signed = q.codes.dtype == jnp.int8
  own = _default_code(q.code, signed)
  if code is not None and _default_code(code, signed) != own:
    raise ValueError(f"q was quantized with code {own!r}; got code={code!r}")
  return own


def full(
  shape: Sequence[int],
  value: jax.typing.ArrayLike,
  *,
  signed: bool,
  like: jax.Array | np.ndarray | jax.ShapeDtypeStruct | None = None,
  code: str | None = None,
) -> QuantizedArray:
  """The quantization of an array of ``shape`` filled with ``value``, written down directly.

  Exactly what :func:`quantize` gives for that constant array (every block's
  scale is ``|value|``; its codes are those of +-1, or 0), without computing
  any block maximum: under ``jit`` nothing is left for XLA to constant-fold,
  whatever the size.

  Args:
    shape: the array's shape (rank >= 1).
    value: a scalar (Python number, array or tracer); >= 0 when unsigned.
    signed: signed (int8) or unsigned (uint8) codes.
    like: optional array or ``jax.ShapeDtypeStruct`` of ``shape`` whose
      placement the codes take (its sharding, or under ``jit`` its
      propagated sharding).
    code: the code map; None for the default of ``signed``.

  Returns:
    A :class:`QuantizedArray`.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax.quantize import dequantize, full, quantize
    >>> q = full((2, 300), 0.5, signed=False)
    >>> r = quantize(jnp.full((2, 300), 0.5), signed=False)
    >>> bool((q.codes == r.codes).all() and (q.scale == r.scale).all())
    True
  """
  shape = tuple(int(d) for d in shape)
  _layout(shape)  # refuses scalars
  dtype = np.dtype(np.int8 if signed else np.uint8)
  name = _default_code(code, bool(signed))
  v = lax.convert_element_type(value, jnp.float32)
  unit = lambda sign: np.asarray(_code_of_unit(name, bool(signed), sign), dtype)
  code_v = lax.select(lax.gt(v, np.float32(0)), unit(1), np.zeros((), dtype))
  if signed:  # -1's code: not always -(+1's), "dynamic" is not symmetric
    code_v = lax.select(lax.lt(v, np.float32(0)), unit(-1), code_v)
  mag = lax.abs(v)
  return QuantizedArray(
    _filled(shape, code_v, like),
    _filled(scale_shape(shape), mag, like, blocks=True),
    _code_field(code, bool(signed)),
  )


@functools.cache
def _code_of_unit(code: str, signed: bool, sign: int) -> int:
  """The code a block's extreme ``sign`` (+1 or -1) quantizes to, a static int.

  The map's largest (smallest) value: +1 in every map, -1 in the symmetric
  ones; signed ``"dynamic"`` reaches down to -0.993 only, where quantize clips.
  """
  k = int(np.nanargmax(code_values(code, signed) * sign))
  return k - 256 if signed and k >= 128 else k


def _filled(
  shape: tuple[int, ...],
  value: jax.Array,
  like: jax.Array | np.ndarray | jax.ShapeDtypeStruct | None,
  blocks: bool = False,
) -> jax.Array:
  """``value`` broadcast to ``shape``, placed like ``like`` (per block of it if ``blocks``)."""
  if like is None:
    return lax.broadcast(value, shape)
  if isinstance(like, jax.ShapeDtypeStruct):
    sharding = like.sharding
    if blocks and sharding is not None:
      sharding = _scale_sharding(sharding, tuple(like.shape))
    return jnp.full(shape, value, value.dtype, device=sharding)
  src = jnp.asarray(like.real if jnp.iscomplexobj(like) else like)  # a NumPy array from an eager caller
  if blocks:  # the first entry of each block: the scale's shape, sharded as its blocks are
    lay = _layout(tuple(like.shape))
    rows = _gathered_for_blocks(src, lay).reshape(lay.rows, lay.length)
    src = lax.slice(rows, (0, 0), (lay.rows, lay.length), (1, BLOCK_SIZE)).reshape(shape)
  # A select on ``like`` (always false) carries its sharding; XLA folds it away after
  # propagating shardings, so nothing of ``like`` is read. (``jnp.where``, not
  # ``lax.select``: its call keeps the select from being folded before propagation.)
  keep = jnp.zeros(src.shape, dtype=bool)
  return jnp.where(keep, lax.convert_element_type(src, value.dtype), value)


def _scale_sharding(
  sharding: jax.sharding.Sharding, shape: tuple[int, ...]
) -> jax.sharding.NamedSharding | None:
  """For an array of ``shape`` placed with ``sharding``: its scale's placement.

  Blocks lie inside rows, so the scale takes the array's first-dimension
  sharding (row layout, or a flat layout whose shards hold whole blocks);
  otherwise it is replicated.
  """
  spec = getattr(sharding, "spec", None)
  mesh = getattr(sharding, "mesh", None)
  if spec is None or mesh is None:
    return None
  lay = _layout(shape)
  first = tuple(spec)[0] if len(spec) else None
  if first is not None:
    axes = first if isinstance(first, tuple) else (first,)
    n = math.prod(mesh.shape[a] for a in axes)
    rows = lay.blocks if lay.flat else lay.rows
    if rows % n == 0 and (not lay.flat or lay.padded == lay.length):
      rest = () if lay.flat else (None,)
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(first, *rest))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def quantize(
  x: jax.Array,
  *,
  signed: bool,
  bits: jax.Array | None = None,
  code: str | None = None,
  scale: jax.Array | None = None,
) -> QuantizedArray:
  r"""Quantizes ``x`` to 8-bit codes with one float32 scale per block.

  With :math:`s_b = \max_{i \in b} |x_i|` (or the given ``scale``), each
  value is stored as the code of :math:`x_i / s_b` in the code map
  (:func:`code_values`), rounded to nearest or stochastically between the two
  neighbouring codes :math:`c^- \le x_i / s_b \le c^+`, up with probability
  :math:`(x_i / s_b - c^-) / (c^+ - c^-)`: unbiased in the value domain,
  :math:`\mathbb{E}[\operatorname{dequantize}(q)_i] = x_i` (to float32
  rounding of :math:`x_i / s_b`).

  Args:
    x: a float array of rank >= 1 (computed in float32).
    signed: signed codes (int8, for first moments) or unsigned (uint8, for
      non-negative values such as second moments; negative inputs store 0).
    bits: None to round to nearest, else uint32 random bits of ``x``'s shape
      (:func:`random_bits`) to round stochastically.
    code: the code map, one of :data:`CODES`; None for :data:`NU_CODE`
      (unsigned) or :data:`SIGNED_CODE` (signed).
    scale: optional per-block scale (:func:`scale_shape`), e.g. an upper bound
      maintained by the caller; magnitudes above it are clipped to it. Default:
      :func:`block_absmax` of ``x``.

  Returns:
    A :class:`QuantizedArray`.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax.quantize import quantize, dequantize
    >>> x = jnp.array([0.0, 1e-9, 1e-4, 0.3, 2.0])
    >>> q = quantize(x, signed=False)  # unsigned: NU_CODE, ten decades
    >>> q.codes, q.scale
    (Array([  0,  12, 140, 233, 255], dtype=uint8), Array([2.], dtype=float32))
    >>> (dequantize(q)[1:] / x[1:]).round(2)  # steps of 6-12% (nearest)
    Array([0.99, 0.98, 1.  , 1.  ], dtype=float32)

  References:
    Dettmers, Lewis, Shleifer and Zettlemoyer, "8-bit Optimizers via
    Block-wise Quantization", ICLR 2022.
  """
  field = _code_field(code, bool(signed))
  code = _default_code(code, bool(signed))
  cm = _code_map(code, bool(signed))
  x = x.astype(jnp.float32)
  shape = tuple(x.shape)
  if bits is not None:
    _check_bits(bits, shape)
  if scale is None:
    scale = block_absmax(x)
  elif scale.shape != scale_shape(shape):
    raise ValueError(f"scale must have shape {scale_shape(shape)}, got {scale.shape}")
  scale = scale.astype(jnp.float32)
  y = lax.mul(x, _expand_like(_to_grid(scale, cm), x))
  return QuantizedArray(_encode(y, cm, code, bits), scale, field)


def ema_update(
  q: QuantizedArray,
  x: jax.Array,
  decay: jax.typing.ArrayLike,
  one_minus_decay: jax.typing.ArrayLike | None = None,
  *,
  bits: jax.Array | None = None,
  code: str | None = None,
  scale: jax.Array | None = None,
) -> QuantizedArray:
  r"""An exponential moving average kept in 8-bit codes: one pass over them.

  Returns the quantization of :math:`\beta\,\hat m + (1 - \beta)\,x`
  (:math:`\hat m` the values of ``q``), with each block's new scale the
  upper bound

  .. math::

    s'_b = \beta\, s_b + (1 - \beta) \max_{i \in b} |x_i|
      \;\ge\; \max_{i \in b} |\beta\,\hat m_i + (1 - \beta)\, x_i|,

  computed from the old scale and ``x`` alone (never from the codes), so the
  codes are read once and written in place. Per element it is one
  multiply-add of per-block coefficients, :math:`y_i = a_b x_i + c_b g_i`
  (:math:`g_i` the code's grid value), then the encoding of :func:`quantize`
  with the same rounding (stochastic, unbiased, when ``bits`` are given).
  The bound is loose when a block's values change sign (its maximum decays
  slower than the average); it suits second moments (non-negative ``x``),
  for which RMSProp uses it.

  Args:
    q: the stored average (from :func:`quantize` or a previous call).
    x: the new values, of ``q.codes``' shape (e.g. ``g**2``).
    decay: :math:`\beta`, a scalar in [0, 1].
    one_minus_decay: :math:`1 - \beta` as the caller rounds it (default
      ``1 - decay``).
    bits: None to round to nearest, else uint32 random bits of ``x``'s shape.
    code: the code map of ``q`` (None: its own, ``q.code``).
    scale: the new per-block scale, if the caller computed it (e.g. in a
      pass of its own); magnitudes above it are clipped to it. Default: the
      bound above.

  Returns:
    The new :class:`QuantizedArray`.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax.quantize import dequantize, ema_update, quantize
    >>> q = quantize(jnp.full((512,), 4.0), signed=False)
    >>> q = ema_update(q, jnp.full((512,), 2.0), 0.5)
    >>> dequantize(q)[:2], q.scale
    (Array([3., 3.], dtype=float32), Array([3., 3.], dtype=float32))
  """
  codes = q.codes
  cm, code = _map_of(codes, _resolve_code(q, code))
  if x.shape != codes.shape:
    raise ValueError(f"x must have the codes' shape {codes.shape}, got {x.shape}")
  x = x.astype(jnp.float32)
  if bits is not None:
    _check_bits(bits, x.shape)
  old = q.scale.astype(jnp.float32)
  decay = lax.convert_element_type(decay, jnp.float32)
  omd = (
    lax.sub(np.float32(1), decay)
    if one_minus_decay is None
    else lax.convert_element_type(one_minus_decay, jnp.float32)
  )
  if scale is None:
    scale = lax.add(lax.mul(decay, old), lax.mul(omd, block_absmax(x)))
  elif scale.shape != old.shape:
    raise ValueError(f"scale must have shape {old.shape}, got {scale.shape}")
  scale = scale.astype(jnp.float32)
  inv = _to_grid(scale, cm)
  a = lax.mul(omd, inv)  # x -> grid units of the new scale
  c = lax.mul(lax.mul(decay, _from_grid(old, cm)), inv)  # old grid -> new grid
  y = lax.add(lax.mul(x, _expand_like(a, x)), lax.mul(_decode(codes, cm, code), _expand_like(c, x)))
  return QuantizedArray(_encode(y, cm, code, bits), scale, q.code)


def dequantize(q: QuantizedArray, *, code: str | None = None) -> jax.Array:
  """The float32 values of a :class:`QuantizedArray`.

  Args:
    q: codes and scales from :func:`quantize`.
    code: optional, the code map ``q`` was quantized with; it must agree with
      ``q.code`` (a :class:`QuantizedArray` records its map).

  Returns:
    A float32 array of ``q.codes``' shape.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax.quantize import QuantizedArray, dequantize
    >>> q = QuantizedArray(jnp.array([0, 128, 255], jnp.uint8), jnp.array([4.0]), code="linear")
    >>> dequantize(q).round(4)
    Array([0.    , 2.0078, 4.    ], dtype=float32)
  """
  codes = q.codes
  cm, code = _map_of(codes, _resolve_code(q, code))
  unit = _from_grid(q.scale.astype(jnp.float32), cm)
  return lax.mul(_decode(codes, cm, code), _expand_like(unit, codes))
