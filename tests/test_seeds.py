"""The worked examples of the source texts (shared/seeds), reproduced.

Each reference below is the text's own loop, copied with its printing replaced
by collecting the numbers; our optimizer must follow it step by step.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax


def seed000_loop():
  """Seed 000: minimise L = (y - w x)^2 with w=0, eta=0.1, gamma=0.9."""
  eta, gamma, eps = 0.1, 0.9, 1e-8
  x, y = 2.0, 4.0
  w, G = 0.0, 0.0
  rows = []
  for _t in range(1, 6):
    g = (y - w * x) * (-x)
    G = gamma * G + (1 - gamma) * (g**2)
    w = w - eta * g / (np.sqrt(G + eps))
    rows.append((g, G, w))
  return rows


def test_seed000_five_iterations():
  x, y = 2.0, 4.0
  grad = lambda w: (y - w * x) * (-x)  # the text's g (half of dL/dw)
  opt = rmsprop_jax.rmsprop(0.1, decay=0.9, eps=1e-8)
  w = jnp.float32(0.0)
  state = opt.init(w)
  ws = []
  for g_ref, G_ref, w_ref in seed000_loop():
    g = grad(w)
    u, state = opt.update(g, state)
    w = optax.apply_updates(w, u)
    ws.append(float(w))
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.nu, G_ref, rtol=1e-5)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
  # Iteration 1 by hand: g1 = -8, G1 = 6.4, w2 = 0.1 * 8 / sqrt(6.4)
  assert ws[0] == pytest.approx(0.8 / math.sqrt(6.4 + 1e-8), rel=1e-6)


def seed001_loop(n_steps=30):
  """Seed 001's from-scratch loop for f(x) = x^2 (eps outside the root)."""
  x, eta, gamma, epsilon = 4.0, 0.1, 0.9, 1e-8
  Eg2 = 0
  rows = []
  for _t in range(1, n_steps + 1):
    g = 2 * x
    Eg2 = gamma * Eg2 + (1 - gamma) * g**2
    lr = eta / (np.sqrt(Eg2) + epsilon)
    update = lr * g
    x -= update
    rows.append((x, g, Eg2, lr, update))
  return rows


def test_seed001_table_of_thirty_steps():
  # The code puts eps outside the root (its formula puts it inside; with
  # eps = 1e-8 the two agree to ~1e-9 here).
  opt = rmsprop_jax.rmsprop(0.1, decay=0.9, eps=1e-8, eps_in_sqrt=False)
  x = jnp.float32(4.0)
  state = opt.init(x)
  for x_ref, g_ref, eg2_ref, lr_ref, upd_ref in seed001_loop():
    g = jax.grad(lambda x: x**2)(x)
    u, state = opt.update(g, state)
    x = optax.apply_updates(x, u)
    eff = rmsprop_jax.effective_learning_rate(state, 0.1, 1e-8, eps_in_sqrt=False)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.nu, eg2_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(eff, lr_ref, rtol=1e-4)
    np.testing.assert_allclose(-u, upd_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(x, x_ref, rtol=1e-4, atol=1e-5)


def test_seed001_step_one_arithmetic_in_the_text_is_wrong():
  # The text: x = 4 - 0.1/sqrt(6.4) * 8 ~ 4 - 0.316 * 8 = 1.47. But 0.1/sqrt(6.4)
  # = 0.0395, not 0.316, so x_1 = 4 - 0.0395 * 8 = 3.684, and step 2 has
  # g = 2 x_1 = 7.37 and E[g^2] = 0.9 * 6.4 + 0.1 * g**2 = 11.19 (the text: 2.94
  # and 6.624). Our optimizer against that arithmetic, done here by hand.
  opt = rmsprop_jax.rmsprop(0.1, decay=0.9, eps=1e-8, eps_in_sqrt=False)
  x = jnp.float32(4.0)
  state = opt.init(x)
  xs, nus = [], []
  for _ in range(2):
    u, state = opt.update(jax.grad(lambda x: x**2)(x), state)
    x = optax.apply_updates(x, u)
    xs.append(float(x))
    nus.append(float(state.nu))
  x1 = 4 - 0.1 / (math.sqrt(6.4) + 1e-8) * 8
  g2 = 2 * x1
  nu2 = 0.9 * 6.4 + 0.1 * g2**2
  assert nus[0] == pytest.approx(6.4, rel=1e-6)  # this part of the text is right
  assert xs[0] == pytest.approx(x1, rel=1e-6) and x1 == pytest.approx(3.6837722, rel=1e-7)
  assert abs(xs[0] - 1.47) > 2
  assert nus[1] == pytest.approx(nu2, rel=1e-6) and nu2 == pytest.approx(11.188071, rel=1e-6)
  assert abs(nus[1] - 6.624) > 4
  assert xs[1] == pytest.approx(x1 - 0.1 / (math.sqrt(nu2) + 1e-8) * g2, rel=1e-6)


def seed003_loop(f_grad, eta=0.4, gamma=0.9, steps=20, start=(-5.0, -2.0)):
  """Seed 003's rmsprop_2d driven as d2l.train_2d drives it (20 steps)."""
  x1, x2 = start
  s1, s2 = 0.0, 0.0
  eps = 1e-6
  path = [(x1, x2)]
  for _ in range(steps):
    g1, g2 = f_grad(x1, x2)
    s1 = gamma * s1 + (1 - gamma) * g1**2
    s2 = gamma * s2 + (1 - gamma) * g2**2
    x1 -= eta / math.sqrt(s1 + eps) * g1
    x2 -= eta / math.sqrt(s2 + eps) * g2
    path.append((x1, x2))
  return np.array(path)


def _our_path(f, eta, gamma, steps=20, start=(-5.0, -2.0)):
  opt = rmsprop_jax.rmsprop(eta, decay=gamma, eps=1e-6)
  x = jnp.array(start, jnp.float32)
  state = opt.init(x)
  path = [np.asarray(x)]
  for _ in range(steps):
    u, state = opt.update(jax.grad(f)(x), state)
    x = optax.apply_updates(x, u)
    path.append(np.asarray(x))
  return np.array(path)


def test_seed003_two_dimensional_quadratic():
  f = lambda x: 0.1 * x[0] ** 2 + 2 * x[1] ** 2
  ref = seed003_loop(lambda x1, x2: (0.2 * x1, 4 * x2))
  ours = _our_path(f, 0.4, 0.9)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
  assert abs(ours[-1, 0]) < 0.1 and abs(ours[-1, 1]) < 1e-3  # it converges (from -5, -2)


def test_seed003_exercise_gamma_one_never_adapts():
  # gamma = 1: s stays 0, so every step is eta * g / sqrt(eps) = 400 g.
  f = lambda x: 0.1 * x[0] ** 2 + 2 * x[1] ** 2
  ref = seed003_loop(lambda x1, x2: (0.2 * x1, 4 * x2), gamma=1.0, steps=3)
  ours = _our_path(f, 0.4, 1.0, steps=3)
  np.testing.assert_allclose(ours, ref, rtol=1e-4)
  assert ours[1, 0] == pytest.approx(-5 - 0.4 / math.sqrt(1e-6) * 0.2 * -5, rel=1e-6)
  assert np.all(np.abs(ours[1:]) > 100)  # it blows up


def test_seed003_exercise_rotated_problem():
  f = lambda x: 0.1 * (x[0] + x[1]) ** 2 + 2 * (x[0] - x[1]) ** 2
  grad = lambda a, b: (0.2 * (a + b) + 4 * (a - b), 0.2 * (a + b) - 4 * (a - b))
  ref = seed003_loop(grad)
  np.testing.assert_allclose(_our_path(f, 0.4, 0.9), ref, rtol=1e-4, atol=1e-4)
