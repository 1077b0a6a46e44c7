"""Framework-faithful parameterisations of :func:`rmsprop_jax.rmsprop`.

Each preset takes the argument names and defaults of one framework's RMSProp,
validates them under those names, and maps them onto options of the one core
transformation; none re-implements the math.

=======================  ============  ============  ===============  ===========
                         PyTorch       Keras 3       TF1              optax
=======================  ============  ============  ===============  ===========
decay name / default     alpha 0.99    rho 0.9       decay 0.9        decay 0.9
eps name / default       eps 1e-8      epsilon 1e-7  epsilon 1e-10    eps 1e-8
eps placement            sqrt(v)+eps   sqrt(v+eps)   sqrt(v+eps)      sqrt(v+eps)
initial mean square      0             0             1                0
learning rate vs buffer  after         inside        inside           inside
weight decay             coupled (L2)  decoupled     none             none
=======================  ============  ============  ===============  ===========
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

import jax
import jax.numpy as jnp
import optax as _optax

from rmsprop_jax import _checks
from rmsprop_jax.alias import rmsprop
from rmsprop_jax.storage import STORAGE_KEYS, StorageOptions
from rmsprop_jax.transform import register_settings, settings_of

if TYPE_CHECKING:
  from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = ["keras", "optax", "pytorch", "tf1"]


def _storage(storage: Mapping[str, object]) -> StorageOptions:
  """The storage options passed to a preset (refusing any other keyword).

  ``optax.inject_hyperparams(preset)`` passes them on as one keyword,
  ``storage={...}``: that is unpacked.
  """
  inner = storage.get("storage")
  if set(storage) == {"storage"} and isinstance(inner, Mapping):
    storage = inner
  unknown = sorted(set(storage) - set(STORAGE_KEYS))
  if unknown:
    raise TypeError(
      f"unexpected keyword argument(s) {', '.join(unknown)}; besides its own, a preset takes {STORAGE_KEYS}"
    )
  return cast(StorageOptions, dict(storage))  # only its keys; their values are checked by rmsprop


def _named(
  opt: _optax.GradientTransformationExtraArgs, **names: str
) -> _optax.GradientTransformationExtraArgs:
  """``opt`` carrying the preset's argument names of its hyperparameters.

  ``optax.inject_hyperparams(preset)`` keys its state by these names; the
  diagnostics read injected values through them.
  """
  settings = settings_of(opt)
  assert settings is not None  # opt is rmsprop()'s, which carries its settings
  register_settings(opt, settings._replace(names=tuple({**dict(settings.names), **names}.items())))
  return opt


def _momentum_or_none(momentum: jax.typing.ArrayLike) -> jax.typing.ArrayLike | None:
  """Frameworks keep no buffer for momentum == 0; neither do we."""
  return None if _checks.is_known_zero(momentum) else momentum


def pytorch(
  lr: _optax.ScalarOrSchedule = 0.01,
  alpha: _optax.ScalarOrSchedule = 0.99,
  eps: jax.typing.ArrayLike = 1e-8,
  weight_decay: jax.typing.ArrayLike = 0,
  momentum: jax.typing.ArrayLike = 0,
  centered: bool = False,
  maximize: bool = False,
  *,
  capturable: bool = False,
  foreach: bool | None = None,
  differentiable: bool = False,
  **storage: Unpack[StorageOptions],
) -> _optax.GradientTransformationExtraArgs:
  r"""``torch.optim.RMSprop``, same names, defaults and update order.

  .. math::

    g &\leftarrow \pm g + \lambda\theta, \quad
    v \leftarrow \alpha v + (1-\alpha) g^2, \\
    b &\leftarrow \beta b + \frac{g}{\sqrt{v} + \epsilon}, \quad
    \theta \leftarrow \theta - \eta_t b

  (without momentum, :math:`\theta \leftarrow \theta - \eta_t g / (\sqrt{v} +
  \epsilon)`; centered subtracts the squared EMA of :math:`g` under the root).

  Args:
    lr: learning rate, a float or a schedule ``step -> lr``; because it
      multiplies the momentum buffer's output, a schedule behaves like a torch
      LR scheduler stepped once per optimizer step.
    alpha: smoothing constant in [0, 1], or a schedule ``step -> alpha``.
    eps: added outside the square root, >= 0.
    weight_decay: L2 penalty added to the gradient (coupled), >= 0.
    momentum: momentum factor in [0, 1); 0 keeps no buffer.
    centered: normalise by the estimated variance of the gradient.
    maximize: maximise the objective (negates the gradient first).
    capturable: accepted so that a torch call ports unchanged; it selects a
      torch kernel (CUDA graphs) and does not change the numbers.
    foreach: likewise (torch's multi-tensor kernel); ignored.
    differentiable: likewise (autograd through the step); ignored, JAX
      differentiates through any update.
    **storage: how the state is stored: the keywords of
      :class:`~rmsprop_jax.StorageOptions` (``state_bits=8``, ...).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`. Pass ``params`` to
    ``update`` when ``weight_decay`` is nonzero.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import presets
    >>> opt = presets.pytorch(lr=0.01, alpha=0.9)
    >>> params = jnp.array([1.0, -2.0])
    >>> updates, _ = opt.update(jnp.array([0.5, 0.5]), opt.init(params), params)
    >>> print(updates.round(6))  # -lr * g / (sqrt(0.1 g^2) + eps)
    [-0.031623 -0.031623]

  References:
    https://pytorch.org/docs/stable/generated/torch.optim.RMSprop.html
  """
  _checks.check_learning_rate("lr", lr)
  _checks.check_scalar_or_schedule("alpha", alpha, 0.0, 1.0)
  _checks.check_scalar("eps", eps, 0.0)
  _checks.check_scalar("weight_decay", weight_decay, 0.0)
  _checks.check_scalar("momentum", momentum, 0.0, 1.0, high_open=True)
  del capturable, foreach, differentiable  # torch kernel choices, same numbers
  core = rmsprop(
    lr,
    decay=alpha,
    eps=eps,
    eps_in_sqrt=False,
    centered=centered,
    momentum=_momentum_or_none(momentum),
    weight_decay=weight_decay,
    weight_decay_mode="coupled",
    maximize=maximize,
    lr_inside_momentum=False,
    **_storage(storage),
  )
  return _named(core, learning_rate="lr", decay="alpha")


def keras(
  learning_rate: _optax.ScalarOrSchedule = 0.001,
  rho: _optax.ScalarOrSchedule = 0.9,
  momentum: jax.typing.ArrayLike = 0.0,
  epsilon: jax.typing.ArrayLike = 1e-7,
  centered: bool = False,
  weight_decay: jax.typing.ArrayLike | None = None,
  clipnorm: float | None = None,
  clipvalue: float | None = None,
  global_clipnorm: float | None = None,
  name: str = "rmsprop",
  **storage: Unpack[StorageOptions],
) -> _optax.GradientTransformationExtraArgs:
  r"""Keras 3 ``keras.optimizers.RMSprop``, same names, defaults and order.

  .. math::

    \theta &\leftarrow \theta - \eta_t\lambda\theta, \quad
    v \leftarrow \rho v + (1-\rho) g^2, \\
    m &\leftarrow \beta m + \frac{\eta_t g}{\sqrt{v + \epsilon}}, \quad
    \theta \leftarrow \theta - m

  Args:
    learning_rate: a float or a schedule of the iteration count.
    rho: discounting factor for the gradient history, in [0, 1], or a
      schedule of the iteration count.
    momentum: in [0, 1); 0 keeps no buffer. The learning rate sits inside
      the buffer.
    epsilon: added inside the square root, >= 0.
    centered: normalise by the estimated variance of the gradient.
    weight_decay: decoupled decay ``theta -= lr * wd * theta`` with the
      current learning rate, >= 0, or None.
    clipnorm: clip each gradient leaf to this L2 norm, as Keras does, before
      weight decay and the update. At most one of the three clip options.
    clipvalue: clip each gradient entry to ``[-clipvalue, clipvalue]``.
    global_clipnorm: clip all gradients jointly to this global L2 norm.
    name: accepted so that a Keras call ports unchanged; unused.
    **storage: how the state is stored: the keywords of
      :class:`~rmsprop_jax.StorageOptions` (``state_bits=8``, ...).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`. Pass ``params`` to
    ``update`` when ``weight_decay`` is set. With a clip option it is
    ``optax.chain(clip, rmsprop)`` (its state a tuple; see
    :func:`rmsprop_jax.diagnostics.find_state`).

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import presets
    >>> opt = presets.keras(learning_rate=0.1)
    >>> p = jnp.zeros(1)
    >>> print(opt.update(jnp.ones(1), opt.init(p), p)[0].round(6))  # -0.1/sqrt(0.1+1e-7)
    [-0.316228]

  References:
    https://keras.io/api/optimizers/rmsprop/
  """
  _checks.check_learning_rate("learning_rate", learning_rate)
  _checks.check_scalar_or_schedule("rho", rho, 0.0, 1.0)
  _checks.check_scalar("momentum", momentum, 0.0, 1.0, high_open=True)
  _checks.check_scalar("epsilon", epsilon, 0.0)
  _checks.check_scalar("weight_decay", weight_decay, 0.0, allow_none=True)
  del name
  core = rmsprop(
    learning_rate,
    decay=rho,
    eps=epsilon,
    eps_in_sqrt=True,
    centered=centered,
    momentum=_momentum_or_none(momentum),
    weight_decay=0.0 if weight_decay is None else weight_decay,
    weight_decay_mode="decoupled",
    **_storage(storage),
  )
  _named(core, decay="rho", eps="epsilon")
  clip = _keras_clip(clipnorm, clipvalue, global_clipnorm)
  return core if clip is None else _optax.chain(clip, core)


def _keras_clip(
  clipnorm: float | None, clipvalue: float | None, global_clipnorm: float | None
) -> _optax.GradientTransformation | None:
  """Keras 3's gradient clipping (``BaseOptimizer._clip_gradients``)."""
  given = {
    k: v
    for k, v in (("clipnorm", clipnorm), ("clipvalue", clipvalue), ("global_clipnorm", global_clipnorm))
    if v is not None
  }
  if len(given) > 1:
    raise ValueError(
      "Only one of clipnorm, clipvalue and global_clipnorm can be set, got "
      + ", ".join(f"{k}={v}" for k, v in given.items())
    )
  for k, v in given.items():
    _checks.check_scalar(k, v, 0.0)
  if clipnorm:

    def clip_leaf(g: jax.Array) -> jax.Array:  # Keras' _clip_by_norm, NaN-safe for zero gradients
      l2sum = jnp.sum(jnp.square(g))
      l2norm = jnp.where(l2sum > 0, jnp.sqrt(jnp.where(l2sum > 0, l2sum, 1.0)), l2sum)
      return (g * clipnorm) / jnp.maximum(l2norm, clipnorm)

    return _optax.stateless(lambda updates, params: jax.tree.map(clip_leaf, updates))
  if global_clipnorm:

    def clip_global(updates: _optax.Updates, params: _optax.Params | None) -> _optax.Updates:
      """Keras' clip_by_global_norm."""
      norm = _optax.tree.norm(updates)
      scale = global_clipnorm * jnp.minimum(1.0 / norm, 1.0 / global_clipnorm)
      scale = scale + (norm - norm)
      return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates)

    return _optax.stateless(clip_global)
  if clipvalue:
    return _optax.clip(clipvalue)
  return None


def tf1(
  learning_rate: _optax.ScalarOrSchedule,
  decay: _optax.ScalarOrSchedule = 0.9,
  momentum: jax.typing.ArrayLike = 0.0,
  epsilon: jax.typing.ArrayLike = 1e-10,
  centered: bool = False,
  **storage: Unpack[StorageOptions],
) -> _optax.GradientTransformationExtraArgs:
  r"""TF1 ``tf.compat.v1.train.RMSPropOptimizer``.

  .. math::

    ms \leftarrow \rho\,ms + (1-\rho) g^2 \;(ms_0 = 1),

    mom \leftarrow \beta\,mom + \frac{\eta g}{\sqrt{ms + \epsilon}},

    \theta \leftarrow \theta - mom

  Args:
    learning_rate: a float or a schedule of the step count.
    decay: discounting factor for the history, in [0, 1], or a schedule.
    momentum: in [0, 1); 0 keeps no buffer.
    epsilon: added inside the square root, >= 0.
    centered: subtract the squared mean gradient ``mg**2`` under the root.
    **storage: how the state is stored: the keywords of
      :class:`~rmsprop_jax.StorageOptions` (``state_bits=8``, ...).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import presets
    >>> opt = presets.tf1(learning_rate=0.1)
    >>> p = jnp.zeros(1)
    >>> print(opt.update(jnp.ones(1), opt.init(p), p)[0].round(6))  # ms = 0.9 + 0.1 = 1
    [-0.1]

  References:
    https://www.tensorflow.org/api_docs/python/tf/compat/v1/train/RMSPropOptimizer
  """
  _checks.check_learning_rate("learning_rate", learning_rate)
  _checks.check_scalar_or_schedule("decay", decay, 0.0, 1.0)
  _checks.check_scalar("momentum", momentum, 0.0, 1.0, high_open=True)
  _checks.check_scalar("epsilon", epsilon, 0.0)
  core = rmsprop(
    learning_rate,
    decay=decay,
    eps=epsilon,
    eps_in_sqrt=True,
    initial_scale=1.0,
    centered=centered,
    momentum=_momentum_or_none(momentum),
    **_storage(storage),
  )
  return _named(core, eps="epsilon")


def optax(
  learning_rate: _optax.ScalarOrSchedule,
  decay: _optax.ScalarOrSchedule = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  initial_scale: jax.typing.ArrayLike = 0.0,
  eps_in_sqrt: bool = True,
  centered: bool = False,
  momentum: jax.typing.ArrayLike | None = None,
  nesterov: bool = False,
  bias_correction: bool = False,
  **storage: Unpack[StorageOptions],
) -> _optax.GradientTransformationExtraArgs:
  """``optax.rmsprop``, with its positional signature.

  Identical to :func:`rmsprop_jax.rmsprop` (whose options past ``eps`` are
  keyword-only); here for symmetry with the other presets.

  Args:
    learning_rate: a float, scalar array or schedule.
    decay: EMA decay in [0, 1], or a schedule.
    eps: >= 0, inside the root unless ``eps_in_sqrt=False``.
    initial_scale: initial second moment, >= 0.
    eps_in_sqrt: where ``eps`` goes.
    centered: centered (variance) form.
    momentum: trace decay in [0, 1), or None.
    nesterov: Nesterov momentum.
    bias_correction: debias the moments.
    **storage: how the state is stored: the keywords of
      :class:`~rmsprop_jax.StorageOptions` (``state_bits=8``, ...).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import presets
    >>> opt = presets.optax(0.1, 0.9, 0.0)
    >>> print(opt.update(jnp.ones(1), opt.init(jnp.zeros(1)))[0].round(6))
    [-0.316228]

  References:
    https://optax.readthedocs.io/en/latest/api/optimizers.html#optax.rmsprop
  """
  return rmsprop(
    learning_rate,
    decay,
    eps,
    initial_scale=initial_scale,
    eps_in_sqrt=eps_in_sqrt,
    centered=centered,
    momentum=momentum,
    nesterov=nesterov,
    bias_correction=bias_correction,
    **_storage(storage),
  )
