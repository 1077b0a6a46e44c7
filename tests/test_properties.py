"""Property tests (hypothesis) for the plain variant from a zero state."""

import math

import jax.numpy as jnp
import numpy as np
from helpers import count_compilations
from hypothesis import given, settings
from hypothesis import strategies as st

import rmsprop_jax

N = 5  # fixed leaf size: every example reuses one compiled update
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32).filter(lambda x: abs(x) > 1e-3)
grad_seqs = st.lists(st.lists(finite, min_size=N, max_size=N), min_size=1, max_size=8)
lrs = st.floats(1e-4, 1.0)
decays = st.floats(0.0, 0.999)


def _updates(grads, lr, decay, eps):
  opt = rmsprop_jax.rmsprop(lr, decay=decay, eps=eps)
  state = opt.init(jnp.zeros(N))
  out = []
  for g in grads:
    u, state = opt.update(jnp.asarray(g, jnp.float32), state)
    out.append(np.asarray(u, np.float64))
  return np.array(out)


@settings(max_examples=60, deadline=None)
@given(grad_seqs, lrs, decays)
def test_each_update_is_bounded_by_lr_over_sqrt_one_minus_decay(grads, lr, decay):
  u = _updates(grads, lr, decay, 1e-8)
  bound = lr / math.sqrt(1 - decay)
  assert np.all(np.abs(u) <= bound * (1 + 1e-5))


@settings(max_examples=60, deadline=None)
@given(grad_seqs, lrs, decays)
def test_updates_oppose_the_gradient(grads, lr, decay):
  u = _updates(grads, lr, decay, 1e-8)
  assert np.all(np.sign(u) == -np.sign(np.asarray(grads, np.float32)))


@settings(max_examples=40, deadline=None)
@given(grad_seqs, lrs, decays, st.floats(1e-2, 1e2))
def test_scaling_gradients_leaves_updates_unchanged_as_eps_goes_to_zero(grads, lr, decay, c):
  u = _updates(grads, lr, decay, 0.0)
  scaled = _updates([[c * x for x in g] for g in grads], lr, decay, 0.0)
  np.testing.assert_allclose(scaled, u, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.lists(finite, min_size=N, max_size=N), lrs, decays)
def test_first_update_is_lr_over_sqrt_one_minus_decay_times_sign(g, lr, decay):
  u = _updates([g], lr, decay, 0.0)[0]
  expected = -lr / math.sqrt(1 - decay) * np.sign(g)
  np.testing.assert_allclose(u, expected, rtol=1e-5)


def test_hypothesis_examples_share_one_compiled_update():
  _updates([[1.0] * N], 0.1, 0.9, 1e-8)
  with count_compilations() as compiled:
    _updates([[2.0] * N, [3.0] * N], 0.3, 0.5, 1e-8)
  assert compiled == []
