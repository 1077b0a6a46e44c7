"""``rmsprop``: the user-facing optimizer and its options."""

from __future__ import annotations

import jax
import optax

from rmsprop_jax import _checks
from rmsprop_jax.storage import Rounding, StateBits
from rmsprop_jax.transform import (
  WEIGHT_DECAY_MODES,
  Config,
  Hyperparams,
  WeightDecayMode,
  fused_rmsprop,
)


def rmsprop(
  learning_rate: optax.ScalarOrSchedule,
  decay: optax.ScalarOrSchedule = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
  *,
  eps_in_sqrt: bool = True,
  initial_scale: jax.typing.ArrayLike = 0.0,
  centered: bool = False,
  momentum: jax.typing.ArrayLike | None = None,
  nesterov: bool = False,
  bias_correction: bool = False,
  nu_dtype: jax.typing.DTypeLike | None = None,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mode: WeightDecayMode = "coupled",
  maximize: bool = False,
  lr_inside_momentum: bool = True,
  state_bits: StateBits = None,
  rounding: Rounding = "stochastic",
  seed: jax.typing.ArrayLike = 0,
  min_quantize_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""RMSProp: gradient descent scaled by a running RMS of the gradients.

  With the defaults this computes exactly what ``optax.rmsprop`` computes
  (same eps placement, same order of learning rate and momentum), as one
  fused, pre-compiled update:

  .. math::

    \nu_t &= \rho\,\nu_{t-1} + (1-\rho)\,g_t^2 \\
    u_t &= -\eta_t\,\frac{g_t}{\sqrt{\nu_t + \epsilon}}

  Options select a few well-named steps around that core:

  - ``centered``: divide by :math:`\sqrt{\nu_t - \mu_t^2 + \epsilon}` with
    :math:`\mu_t` the EMA of :math:`g_t` (Graves, 2013).
  - ``momentum``: :math:`b_t = \beta b_{t-1} + u_t` and the update is
    :math:`b_t` (or :math:`u_t + \beta b_t` with ``nesterov``). With
    ``lr_inside_momentum=False`` the buffer accumulates unscaled steps and the
    learning rate multiplies its output, as in PyTorch.
  - ``weight_decay``: ``"coupled"`` adds :math:`\lambda\theta` to the gradient
    before everything (PyTorch, L2); ``"decoupled"`` subtracts
    :math:`\eta_t\lambda\theta` from the update after everything (Keras 3).
  - ``maximize``: ascend instead of descend (negate the gradient first).

  Args:
    learning_rate: :math:`\eta`, a float >= 0, a scalar array, or a schedule
      ``count -> lr`` called with the number of steps taken before this one.
    decay: :math:`\rho` in [0, 1], the EMA decay of the squared gradients,
      or a schedule ``count -> decay`` called like the learning rate's (a
      rising decay, say, for seed texts' "adaptive gamma").
    eps: :math:`\epsilon` >= 0. With ``eps=0`` a zero denominator (a zero
      gradient from a zero state) gives a zero update instead of NaN.
    eps_in_sqrt: add ``eps`` inside the square root (optax, Keras, TF1); False
      adds it outside (PyTorch).
    initial_scale: initial value of :math:`\nu`, >= 0. PyTorch and optax use
      0, TF1 uses 1.
    centered: use the centered (variance) form.
    momentum: :math:`\beta` in [0, 1), or None for no momentum buffer.
    nesterov: Nesterov momentum (needs ``momentum``).
    bias_correction: divide :math:`\nu` (and :math:`\mu`) by
      :math:`1-\rho^t`. Needs a constant ``decay``: with a decay schedule it
      is refused with a ``ValueError``.
    weight_decay: :math:`\lambda` >= 0; 0 disables it.
    weight_decay_mode: ``"coupled"`` (L2 added to the gradient) or
      ``"decoupled"`` (subtracted from the update, scaled by the current lr).
    maximize: maximize the objective instead of minimizing it.
    lr_inside_momentum: True (optax, Keras, TF1) scales by the learning rate
      before the momentum buffer; False (PyTorch) after it. The two agree for
      a constant learning rate up to rounding and differ under schedules.
    nu_dtype, state_bits, rounding, seed, min_quantize_size: how the state is
      stored (``state_bits=8``: 8-bit codes; ``nu_dtype=jnp.bfloat16``; their
      rounding), each documented in :class:`~rmsprop_jax.StorageOptions`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`rmsprop_jax.RMSPropState` (``count``, ``nu``, ``mu``, ``trace``).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import rmsprop_jax
    >>> f = lambda x: jnp.sum(x ** 2)
    >>> opt = rmsprop_jax.rmsprop(learning_rate=0.003)
    >>> params = jnp.array([1.0, 2.0, 3.0])
    >>> state = opt.init(params)
    >>> for _ in range(5):
    ...   updates, state = opt.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{f(params):.2E}")
    1.36E+01

  References:
    Hinton, Lecture 6e of "Neural Networks for Machine Learning", 2012.
    Graves, "Generating Sequences With Recurrent Neural Networks", 2013.

  .. note::
    ``eps`` sits inside the root by default, as in optax; PyTorch's
    ``sqrt(v) + eps`` needs ``eps_in_sqrt=False`` (see
    :func:`rmsprop_jax.presets.pytorch`).
  """
  _checks.check_learning_rate("learning_rate", learning_rate)
  _checks.check_scalar_or_schedule("decay", decay, 0.0, 1.0)
  _checks.check_scalar("eps", eps, 0.0)
  _checks.check_scalar("initial_scale", initial_scale, 0.0)
  _checks.check_scalar("momentum", momentum, 0.0, 1.0, high_open=True, allow_none=True)
  _checks.check_scalar("weight_decay", weight_decay, 0.0)
  _checks.check_choice("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)
  if nesterov and momentum is None:
    raise ValueError("nesterov=True needs a momentum value, got momentum=None")
  use_wd = not _checks.is_known_zero(weight_decay)
  cfg = Config(
    eps_in_sqrt=eps_in_sqrt,
    centered=centered,
    bias_correction=bias_correction,
    nu_dtype=nu_dtype,
    momentum=momentum is not None,
    nesterov=nesterov,
    lr_inside_momentum=lr_inside_momentum,
    weight_decay=weight_decay_mode if use_wd else None,
    maximize=maximize,
    rounding=rounding,
    state_bits=state_bits,
    min_quantize_size=min_quantize_size,
  )
  hp = Hyperparams(
    learning_rate=learning_rate,
    decay=decay,
    eps=eps,
    momentum=momentum,
    weight_decay=weight_decay if use_wd else None,
    initial_scale=initial_scale,
    seed=seed,
  )
  return fused_rmsprop(cfg, hp)
