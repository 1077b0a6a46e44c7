"""The reinforcement-learning RMSProps of the porting page, against their own update rules.

Each row of docs/porting.md ("Reinforcement learning") names an RMSProp that RL code bases
ship and the settings of ours that reproduce it. Here each original update is written out in
NumPy float64, as its source states it, and our float32 optimizer is fed the same gradients:

- DQN (Mnih et al., Nature 2015; DeepMind's Lua ``NeuralQLearner``)::

    g = 0.95 g + 0.05 grad;  g2 = 0.95 g2 + 0.05 grad^2
    w -= lr * grad / sqrt(g2 - g^2 + 0.01)                 (g, g2 start at 0)

- Stable-Baselines3 ``RMSpropTFLike`` (``sb3_contrib``/``stable_baselines3.common.sb2_compat``)::

    square_avg = alpha square_avg + (1 - alpha) grad^2     (square_avg starts at 1)
    avg = sqrt(square_avg [- grad_avg^2] + eps)
    buf = momentum buf + grad / avg;  p -= lr * buf         (no momentum: p -= lr grad / avg)

- Stable-Baselines3 A2C's default optimizer, ``torch.optim.RMSprop(alpha=0.99, eps=1e-5)``::

    square_avg = alpha square_avg + (1 - alpha) grad^2     (square_avg starts at 0)
    p -= lr * grad / (sqrt(square_avg) + eps)

- TF1 ``tf.compat.v1.train.RMSPropOptimizer(centered=True)`` (``ApplyCenteredRMSProp``)::

    ms = ms + (grad^2 - ms)(1 - decay)   (ms starts at 1);  mg = mg + (grad - mg)(1 - decay)
    mom = momentum mom + lr grad / sqrt(ms - mg^2 + eps);   var -= mom

Tolerance: every step of ours is float32 arithmetic, a dozen roundings of relative size
2**-24 each; the moments carry the error of earlier steps (an EMA contracts it, so at most
adds it up), and a momentum buffer sums earlier steps. Step t's update is therefore within
``OPS * (t + 1) * 2**-24`` of the float64 rule, relative to the size of the updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax
from rmsprop_jax import presets

STEPS = 40
SHAPE = (64, 33)
OPS = 16  # float32 roundings per step, counted generously (EMA 3 each, root, divide, buffer)
U32 = 2.0**-24


class Port(NamedTuple):
  ours: Callable[[], object]  # builds our optimizer
  step: Callable  # the original rule: (grad float64, state dict) -> update float64
  init: Callable[[tuple[int, ...]], dict]  # its state at step 0


def dqn_nature(lr=2.5e-4):
  """DeepMind's DQN (Lua, dqn/NeuralQLearner.lua): centered, 0.95, 0.01 under the root."""

  def step(grad, s):
    s["g"] = 0.95 * s["g"] + 0.05 * grad
    s["g2"] = 0.95 * s["g2"] + 0.05 * grad**2
    return -lr * grad / np.sqrt(s["g2"] - s["g"] ** 2 + 0.01)

  return Port(
    lambda: rmsprop_jax.rmsprop(lr, decay=0.95, eps=0.01, centered=True),
    step,
    lambda shape: {"g": np.zeros(shape), "g2": np.zeros(shape)},
  )


def sb3_rmsprop_tf_like(lr=7e-4, alpha=0.99, eps=1e-5, momentum=0.0, centered=False):
  """Stable-Baselines3 RMSpropTFLike (A2C's optimizer with use_rms_prop, TF's rules).

  ``lr`` may be a schedule of the step count: SB3 writes each param group's ``lr`` before
  an update (``update_learning_rate``), and the buffer holds unscaled steps, so the new rate
  multiplies the whole buffer.
  """

  def step(grad, s):
    rate = lr(s["t"]) if callable(lr) else lr
    s["t"] += 1
    s["square_avg"] = alpha * s["square_avg"] + (1 - alpha) * grad**2
    var = s["square_avg"]
    if centered:
      s["grad_avg"] = alpha * s["grad_avg"] + (1 - alpha) * grad
      var = var - s["grad_avg"] ** 2
    avg = np.sqrt(var + eps)
    if momentum > 0:
      s["buf"] = momentum * s["buf"] + grad / avg
      return -rate * s["buf"]
    return -rate * grad / avg

  return Port(
    lambda: rmsprop_jax.rmsprop(
      lr,
      decay=alpha,
      eps=eps,
      eps_in_sqrt=True,
      initial_scale=1.0,
      centered=centered,
      momentum=momentum if momentum > 0 else None,
      lr_inside_momentum=False,
    ),
    step,
    lambda shape: {"t": 0, "square_avg": np.ones(shape), "grad_avg": np.zeros(shape), "buf": np.zeros(shape)},
  )


def sb3_a2c_default(lr=7e-4, alpha=0.99, eps=1e-5):
  """SB3's A2C with use_rms_prop=True and no optimizer_class: torch's RMSprop."""

  def step(grad, s):
    s["square_avg"] = alpha * s["square_avg"] + (1 - alpha) * grad**2
    return -lr * grad / (np.sqrt(s["square_avg"]) + eps)

  return Port(
    lambda: presets.pytorch(lr=lr, alpha=alpha, eps=eps),
    step,
    lambda shape: {"square_avg": np.zeros(shape)},
  )


def tf1_centered(lr=2.5e-4, decay=0.95, momentum=0.0, epsilon=1e-5):
  """TF1 RMSPropOptimizer(centered=True), as Dopamine's and OpenAI Baselines' DQN use it."""

  def step(grad, s):
    s["ms"] = s["ms"] + (grad**2 - s["ms"]) * (1 - decay)
    s["mg"] = s["mg"] + (grad - s["mg"]) * (1 - decay)
    s["mom"] = momentum * s["mom"] + lr * grad / np.sqrt(s["ms"] - s["mg"] ** 2 + epsilon)
    return -s["mom"]

  return Port(
    lambda: presets.tf1(lr, decay=decay, momentum=momentum, epsilon=epsilon, centered=True),
    step,
    lambda shape: {"ms": np.ones(shape), "mg": np.zeros(shape), "mom": np.zeros(shape)},
  )


PORTS = {
  "DQN Nature's centered RMSProp, 0.01 inside the root": dqn_nature(),
  "SB3 RMSpropTFLike as A2C builds it": sb3_rmsprop_tf_like(),
  "SB3 RMSpropTFLike with momentum, lr after the buffer": sb3_rmsprop_tf_like(lr=1e-2, momentum=0.9),
  "SB3 RMSpropTFLike with momentum under a learning-rate schedule": sb3_rmsprop_tf_like(
    lr=lambda t: 1e-2 * (1 - t / STEPS), momentum=0.9
  ),
  "SB3 RMSpropTFLike centered with momentum": sb3_rmsprop_tf_like(momentum=0.5, centered=True),
  "SB3 A2C's default, torch RMSprop": sb3_a2c_default(),
  "TF1 RMSPropOptimizer centered (Dopamine's DQN)": tf1_centered(),
  "TF1 RMSPropOptimizer centered with momentum": tf1_centered(lr=1e-3, decay=0.9, momentum=0.9),
}


def gradients(seed: int) -> list[np.ndarray]:
  """Random float32 gradients with a drifting mean and scale (so centering matters)."""
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=SHAPE)
  return [
    ((0.3 * mean + rng.normal(size=SHAPE)) * np.exp(rng.normal(size=SHAPE) - 0.02 * t)).astype(np.float32)
    for t in range(STEPS)
  ]


@pytest.mark.parametrize("jit", [True, False], ids=["jitted", "eager"])
@pytest.mark.parametrize("name", list(PORTS))
def test_the_settings_of_the_porting_table_follow_the_original_rule(name, jit):
  port = PORTS[name]
  opt = port.ours()
  update = jax.jit(opt.update) if jit else opt.update
  params = jnp.zeros(SHAPE)
  state = opt.init(params)
  ref = port.init(SHAPE)
  for t, g in enumerate(gradients(seed=len(name))):
    expected = port.step(g.astype(np.float64), ref)
    ours, state = update(jnp.asarray(g), state, params)
    ours = np.asarray(ours, np.float64)
    scale = np.abs(expected).max()
    err = np.abs(ours - expected).max() / scale
    bound = OPS * (t + 1) * U32
    assert err <= bound, f"step {t}: largest difference {err:.2e} of the update's scale, bound {bound:.2e}"


def test_the_rules_differ_from_each_other_by_more_than_the_tolerance():
  # The check can tell the rows apart: DQN's zero start against TF1's start at ones, and
  # eps inside against outside, move the first update far beyond the bound.
  g = gradients(seed=0)[0].astype(np.float64)
  dqn, tf1 = dqn_nature(), tf1_centered(epsilon=0.01)
  a = dqn.step(g, dqn.init(SHAPE))
  b = tf1.step(g, tf1.init(SHAPE))
  assert np.abs(a - b).max() / np.abs(a).max() > 1e3 * OPS * STEPS * U32
