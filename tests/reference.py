"""An independent float64 NumPy model of every RMSProp variant we support.

Written from the published update rules (Hinton 2012, Graves 2013, the
PyTorch, Keras 3 and TF1 documentation), one explicit loop per step; it shares
no code with rmsprop_jax.
"""

from __future__ import annotations

import numpy as np


def reference_updates(
  params0,
  grads,
  *,
  lr=0.01,
  decay=0.9,
  eps=1e-8,
  eps_in_sqrt=True,
  initial_scale=0.0,
  centered=False,
  momentum=None,
  nesterov=False,
  bias_correction=False,
  weight_decay=0.0,
  weight_decay_mode="coupled",
  maximize=False,
  lr_inside_momentum=True,
  nu_round=None,
):
  """Runs RMSProp in float64 on a dict of arrays.

  Args:
    params0: dict name -> array, the starting parameters.
    grads: either a list of dicts (a fixed gradient sequence) or a callable
      ``params -> grads dict`` (gradients that depend on the parameters).
    lr: a float or a callable ``step -> lr`` (step counted from 0).
    decay: a float or a callable ``step -> decay`` (step counted from 0).
    nu_round: optional function rounding the second moment to its storage
      precision after each EMA update: the rounded value is what the next
      step starts from, while this step divides by the exact new value.
    (the rest): as in rmsprop_jax.rmsprop.

  Returns:
    (list of update dicts, list of param dicts after each step).
  """
  wide = lambda v: np.asarray(v, np.complex128 if np.iscomplexobj(v) else np.float64)
  p = {k: wide(v).copy() for k, v in params0.items()}
  nu = {k: np.full(v.shape, float(initial_scale)) for k, v in p.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  buf = {k: np.zeros_like(v) for k, v in p.items()}
  steps = len(grads) if isinstance(grads, list) else grads.steps
  all_updates, all_params = [], []
  for t in range(steps):
    g_all = grads[t] if isinstance(grads, list) else grads(p)
    rate = lr(t) if callable(lr) else lr
    rho = decay(t) if callable(decay) else decay
    upd = {}
    for k in p:
      g = wide(g_all[k])
      if maximize:
        g = -g
      if weight_decay and weight_decay_mode == "coupled":
        g = g + weight_decay * p[k]
      nu_new = rho * nu[k] + (1 - rho) * np.abs(g) ** 2
      nu[k] = nu_new if nu_round is None else nu_round(nu_new)
      mu[k] = rho * mu[k] + (1 - rho) * g
      nu_hat, mu_hat = nu_new, mu[k]
      if bias_correction:
        assert not callable(decay), "bias correction needs a constant decay"
        nu_hat = nu_hat / (1 - decay ** (t + 1))
        mu_hat = mu_hat / (1 - decay ** (t + 1))
      var = nu_hat - np.abs(mu_hat) ** 2 if centered else nu_hat
      var = np.maximum(var, 0.0)
      denom = np.sqrt(var + eps) if eps_in_sqrt else np.sqrt(var) + eps
      step = g / denom
      if momentum is None:
        u = -rate * step
      elif lr_inside_momentum:
        buf[k] = momentum * buf[k] - rate * step
        u = momentum * buf[k] - rate * step if nesterov else buf[k]
      else:
        buf[k] = momentum * buf[k] + step
        u = -rate * (momentum * buf[k] + step if nesterov else buf[k])
      if weight_decay and weight_decay_mode == "decoupled":
        u = u - rate * weight_decay * p[k]
      upd[k] = u
    for k in p:
      p[k] = p[k] + upd[k]
    all_updates.append(upd)
    all_params.append({k: v.copy() for k, v in p.items()})
  return all_updates, all_params


class ParamGrad:
  """A gradient that depends on the parameters: of sum(p^2 / 2 + p^4 / 40)."""

  def __init__(self, steps, scale=1.0):
    self.steps = steps
    self.scale = scale

  def __call__(self, params):
    return {k: self.scale * (v + 0.1 * v**3) for k, v in params.items()}
