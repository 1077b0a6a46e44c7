"""Inspecting an RMSProp state: effective learning rates and friends."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from rmsprop_jax.transform import RMSPropState


def find_state(state: Any) -> RMSPropState:
  """The one :class:`RMSPropState` inside ``state``.

  Works on our own state and on states that wrap it (``optax.chain``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``, ...).

  Args:
    state: an optimizer state containing exactly one :class:`RMSPropState`.

  Returns:
    That :class:`RMSPropState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import rmsprop_jax
    >>> opt = optax.chain(optax.clip(1.0), rmsprop_jax.rmsprop(0.1))
    >>> rmsprop_jax.diagnostics.find_state(opt.init(jnp.zeros(2))).nu
    Array([0., 0.], dtype=float32)
  """
  is_ours = lambda x: isinstance(x, RMSPropState)
  found = [s for s in jax.tree.leaves(state, is_leaf=is_ours) if is_ours(s)]
  if len(found) != 1:
    raise ValueError(
        f"state must contain exactly one RMSPropState, found {len(found)}"
    )
  return found[0]


def effective_learning_rate(
    state: Any,
    learning_rate: optax.ScalarOrSchedule,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_in_sqrt: bool = True,
) -> optax.Updates:
  r"""The per-parameter step size of the last update, ``lr / sqrt(nu + eps)``.

  .. math::

    \eta^{\text{eff}}_t = \frac{\eta_t}{\sqrt{\nu_t - \mu_t^2 + \epsilon}}
    \quad\text{or}\quad \frac{\eta_t}{\sqrt{\nu_t - \mu_t^2} + \epsilon}

  (:math:`\mu_t = 0` unless the state is centered.) The last update was
  ``-effective_learning_rate * g`` for plain RMSProp without momentum; this is
  the "Effective LR" column of tutorial tables, and the quantity whose decay
  to zero distinguishes AdaGrad from RMSProp.

  Args:
    state: an :class:`RMSPropState`, or any optimizer state containing one.
    learning_rate: the float used, or the schedule (evaluated at the count of
      the last step, ``count - 1``).
    eps: the eps used.
    eps_in_sqrt: whether eps was inside the root (as for the optimizer).

  Returns:
    A tree like the params with the effective learning rate of each entry.

  Example:
    >>> import jax.numpy as jnp
    >>> import rmsprop_jax
    >>> opt = rmsprop_jax.rmsprop(0.1, decay=0.9, eps=0.0)
    >>> _, state = opt.update(jnp.array([8.0]), opt.init(jnp.array([4.0])))
    >>> rmsprop_jax.effective_learning_rate(state, 0.1, eps=0.0)  # 0.1/sqrt(6.4)
    Array([0.03952847], dtype=float32)
  """
  st = find_state(state)
  lr = learning_rate
  if callable(learning_rate):
    lr = learning_rate(jnp.maximum(st.count - 1, 0))

  def one(nu, mu=None):
    var = nu.astype(jnp.promote_types(nu.dtype, jnp.float32))
    if mu is not None:
      var = jnp.maximum(var - jnp.abs(mu) ** 2, 0)
    if eps_in_sqrt:
      return lr / jnp.sqrt(var + eps)
    return lr / (jnp.sqrt(var) + eps)

  if st.mu is None:
    return jax.tree.map(one, st.nu)
  return jax.tree.map(one, st.nu, st.mu)
