"""Presets side by side with the real torch.optim.RMSprop and Keras 3 RMSprop.

Gradients depend on the parameters (so weight decay and momentum matter) and
on the step (so the problem is not stationary); >= 40 steps, rtol 1e-4.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import reference_updates

from rmsprop_jax import presets

STEPS = 45
RNG = np.random.default_rng(1234)
P0 = {
  "w": RNG.normal(size=(3, 4)).astype(np.float32),
  "b": RNG.normal(size=(4,)).astype(np.float32),
}
SHIFTS = [{k: RNG.normal(size=v.shape).astype(np.float32) for k, v in P0.items()} for _ in range(STEPS)]


def grad_fn(params, t):
  """float32 gradient of sum(p^2/2 + p^4/40 - shift_t * p)."""
  return {k: (p + np.float32(0.1) * p**3 - SHIFTS[t][k]).astype(np.float32) for k, p in params.items()}


def run_ours(opt):
  params = {k: jnp.asarray(v) for k, v in P0.items()}
  state = opt.init(params)
  update = jax.jit(opt.update)
  traj = []
  for t in range(STEPS):
    g = grad_fn({k: np.asarray(v) for k, v in params.items()}, t)
    u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
    params = optax.apply_updates(params, u)
    traj.append({k: np.asarray(v) for k, v in params.items()})
  return traj


def assert_trajectories_close(ours, theirs, rtol=1e-4, atol=1e-6):
  for t, (a, b) in enumerate(zip(ours, theirs)):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"step {t} {k}")


# ----------------------------------------------------------------- PyTorch

TORCH_GRID = {
  "defaults": {},
  "alpha 0.9 as in seed 002": dict(alpha=0.9),
  "eps 1e-3": dict(eps=1e-3),
  "weight decay": dict(weight_decay=0.05),
  "momentum": dict(momentum=0.9),
  "centered": dict(centered=True),
  "maximize": dict(maximize=True, lr=0.001),
  "centered with momentum": dict(centered=True, momentum=0.8),
  "weight decay with momentum": dict(weight_decay=0.1, momentum=0.9),
  "everything": dict(
    alpha=0.95, eps=1e-6, weight_decay=0.01, momentum=0.5, centered=True, maximize=True, lr=0.003
  ),
}


def run_torch(kwargs, step_lr=None):
  torch = pytest.importorskip("torch")
  params = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in P0.items()}
  opt = torch.optim.RMSprop(list(params.values()), **kwargs)
  sched = torch.optim.lr_scheduler.StepLR(opt, **step_lr) if step_lr else None
  traj = []
  for t in range(STEPS):
    g = grad_fn({k: v.detach().numpy() for k, v in params.items()}, t)
    for k, p in params.items():
      p.grad = torch.from_numpy(g[k].copy())
    opt.step()
    if sched:
      sched.step()
    traj.append({k: v.detach().numpy().copy() for k, v in params.items()})
  return traj


@pytest.mark.parametrize("kwargs", TORCH_GRID.values(), ids=TORCH_GRID.keys())
def test_pytorch_preset_matches_torch_optim_rmsprop(kwargs):
  torch_traj = run_torch(kwargs)
  ours = run_ours(presets.pytorch(**kwargs))
  assert_trajectories_close(ours, torch_traj)


def test_pytorch_preset_with_step_lr_schedule_and_momentum():
  torch_traj = run_torch(dict(lr=0.02, momentum=0.9), step_lr=dict(step_size=10, gamma=0.3))
  sched = optax.exponential_decay(0.02, transition_steps=10, decay_rate=0.3, staircase=True)
  ours = run_ours(presets.pytorch(lr=sched, momentum=0.9))
  assert_trajectories_close(ours, torch_traj)
  # optax's order (lr inside the buffer) is a different trajectory under a
  # schedule: the preset is not a renaming of optax.rmsprop.
  other = run_ours(optax.rmsprop(sched, decay=0.99, eps=1e-8, eps_in_sqrt=False, momentum=0.9))
  assert not np.allclose(other[-1]["w"], torch_traj[-1]["w"], rtol=1e-3)


# ------------------------------------------------------------------- Keras

KERAS_GRID = {
  "defaults": dict(learning_rate=0.01),
  "rho 0.5": dict(learning_rate=0.01, rho=0.5),
  "epsilon 1e-3": dict(learning_rate=0.01, epsilon=1e-3),
  "momentum": dict(learning_rate=0.01, momentum=0.9),
  "centered": dict(learning_rate=0.01, centered=True),
  "weight decay": dict(learning_rate=0.01, weight_decay=0.1),
  "centered with momentum": dict(learning_rate=0.01, centered=True, momentum=0.8),
  "everything": dict(
    learning_rate=0.005, rho=0.8, momentum=0.5, epsilon=1e-6, centered=True, weight_decay=0.05
  ),
  "clipnorm": dict(learning_rate=0.01, clipnorm=0.5, weight_decay=0.05),
  "clipvalue": dict(learning_rate=0.01, clipvalue=0.3, momentum=0.9),
  "global clipnorm": dict(learning_rate=0.01, global_clipnorm=1.0, centered=True),
}


def run_keras(kwargs):
  if os.environ.get("KERAS_BACKEND", "jax") != "jax":
    pytest.skip("these comparisons run Keras on its JAX backend")
  keras = pytest.importorskip("keras")
  variables = {k: keras.Variable(v.copy(), name=k) for k, v in P0.items()}
  opt = keras.optimizers.RMSprop(**kwargs)
  traj = []
  for t in range(STEPS):
    g = grad_fn({k: np.asarray(v.value) for k, v in variables.items()}, t)
    opt.apply([jnp.asarray(g[k]) for k in variables], list(variables.values()))
    traj.append({k: np.asarray(v.value).copy() for k, v in variables.items()})
  return traj


@pytest.mark.parametrize("kwargs", KERAS_GRID.values(), ids=KERAS_GRID.keys())
def test_keras_preset_matches_keras_rmsprop(kwargs):
  keras_traj = run_keras(kwargs)
  ours = run_ours(presets.keras(**kwargs))
  assert_trajectories_close(ours, keras_traj)


def test_keras_preset_with_step_decayed_learning_rate_and_momentum():
  keras = pytest.importorskip("keras")
  sched = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=10, decay_rate=0.3, staircase=True)
  keras_traj = run_keras(dict(learning_rate=sched, momentum=0.9, weight_decay=0.05))
  ours_sched = optax.exponential_decay(0.02, transition_steps=10, decay_rate=0.3, staircase=True)
  ours = run_ours(presets.keras(learning_rate=ours_sched, momentum=0.9, weight_decay=0.05))
  assert_trajectories_close(ours, keras_traj)


# --------------------------------------------------------------------- TF1

TF1_GRID = {
  "defaults": dict(learning_rate=0.01),
  "momentum": dict(learning_rate=0.01, momentum=0.9),
  "centered": dict(learning_rate=0.01, centered=True, epsilon=1e-6),
  "centered with momentum": dict(learning_rate=0.01, centered=True, momentum=0.5, decay=0.8),
}


def tf1_numpy(learning_rate, decay=0.9, momentum=0.0, epsilon=1e-10, centered=False):
  """float64 model of TF1's ApplyRMSProp / ApplyCenteredRMSProp kernels."""
  p = {k: v.astype(np.float64) for k, v in P0.items()}
  ms = {k: np.ones_like(v) for k, v in p.items()}  # TF1 starts ms at 1
  mg = {k: np.zeros_like(v) for k, v in p.items()}
  mom = {k: np.zeros_like(v) for k, v in p.items()}
  traj = []
  for t in range(STEPS):
    g = grad_fn({k: v.astype(np.float32) for k, v in p.items()}, t)
    for k in p:
      gk = g[k].astype(np.float64)
      ms[k] = ms[k] + (gk * gk - ms[k]) * (1 - decay)
      denom = ms[k]
      if centered:
        mg[k] = mg[k] + (gk - mg[k]) * (1 - decay)
        denom = ms[k] - mg[k] ** 2
      mom[k] = momentum * mom[k] + learning_rate * gk / np.sqrt(denom + epsilon)
      p[k] = p[k] - mom[k]
    traj.append({k: v.copy() for k, v in p.items()})
  return traj


@pytest.mark.parametrize("kwargs", TF1_GRID.values(), ids=TF1_GRID.keys())
def test_tf1_preset_matches_a_float64_model_of_tf1(kwargs):
  assert_trajectories_close(run_ours(presets.tf1(**kwargs)), tf1_numpy(**kwargs))


def test_torch_kernel_flags_port_unchanged_and_do_not_change_numbers():
  kwargs = dict(lr=0.01, momentum=0.9)
  flagged = run_ours(presets.pytorch(**kwargs, foreach=True, capturable=False, differentiable=False))
  assert_trajectories_close(flagged, run_torch(dict(kwargs, foreach=True)))


def test_keras_refuses_two_clip_options():
  with pytest.raises(ValueError, match="Only one of clipnorm, clipvalue and global_clipnorm"):
    presets.keras(clipnorm=1.0, clipvalue=0.5)


def test_optax_preset_is_optax_rmsprop():
  a = run_ours(presets.optax(0.01, 0.9, 1e-6, 0.0, True, True, 0.9))
  b = run_ours(optax.rmsprop(0.01, 0.9, 1e-6, 0.0, True, True, 0.9))
  assert_trajectories_close(a, b, rtol=1e-6, atol=0)


def test_torch_defaults_differ_from_optax_defaults():
  # The porting hazard the presets exist for: same lr, different numbers.
  a = run_ours(presets.pytorch(lr=0.01))
  b = run_ours(optax.rmsprop(0.01))
  assert np.max(np.abs(a[-1]["w"] - b[-1]["w"])) > 1e-3


def test_reference_model_agrees_with_the_torch_preset_in_float64():
  # Independent check of the mapping: our float64 NumPy model configured the
  # PyTorch way tracks the real torch trajectory too.
  kwargs = dict(lr=0.01, alpha=0.9, momentum=0.9, weight_decay=0.05)
  torch_traj = run_torch(kwargs)

  class Grads:
    steps = STEPS
    t = 0

    def __call__(self, p):
      g = grad_fn({k: v.astype(np.float32) for k, v in p.items()}, Grads.t)
      Grads.t += 1
      return g

  _, params = reference_updates(
    P0,
    Grads(),
    lr=0.01,
    decay=0.9,
    eps=1e-8,
    eps_in_sqrt=False,
    momentum=0.9,
    weight_decay=0.05,
    lr_inside_momentum=False,
  )
  assert_trajectories_close(params, torch_traj)
