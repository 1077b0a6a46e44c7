"""interop: a run moved between the real torch / Keras RMSprop and JAX.

Every test trains K steps in the framework, converts, then takes STEPS more
steps in the framework and in JAX from the same point. Two ways to get the
gradients: the framework's own gradients fed to both (differences come from
the optimizers' arithmetic alone; rtol 1e-6), or each side computing its own
(torch's autograd or Keras's ops against jax.grad; rtol 1e-5). Tolerances are
relative to each leaf's scale (max |p|): single entries pass through zero,
where an elementwise relative error means nothing. The Keras tests run on the
latest Keras and on its floor, 3.5.0 (.ci/minimum-versions.txt).
"""

import io
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax
from rmsprop_jax import RMSPropState, interop, presets
from rmsprop_jax.quantize import QuantizedArray

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

K, STEPS = 7, 30
RNG = np.random.default_rng(0)
X = RNG.normal(size=(K + STEPS + 10, 8, 3)).astype(np.float32)  # one batch per step
Y = RNG.normal(size=(K + STEPS + 10, 8, 2)).astype(np.float32)
P0 = {"b": RNG.normal(size=(2,)).astype(np.float32), "w": RNG.normal(size=(3, 2)).astype(np.float32)}
NAMES = ("b", "w")  # jax.tree.leaves order of P0
GRADIENTS = {"framework's gradients fed to both": 1e-6, "each side computes its own": 1e-5}


def jax_loss(p, x, y, sign):
  return sign * jnp.mean((jnp.tanh(x @ p["w"] + p["b"][None, :]) - y) ** 2)


jax_grad = jax.jit(jax.grad(jax_loss))


def assert_close(ours, theirs, rtol, where=""):
  for k in NAMES:
    a, b = np.asarray(ours[k]), np.asarray(theirs[k])
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.max(np.abs(b)), err_msg=f"{where} {k}")


class JaxRun:
  """Our side: params and state, one jitted update per optimizer."""

  def __init__(self, opt, state, params, sign=1.0):
    self.opt, self.state, self.sign = opt, state, sign
    self.params = jax.tree.map(jnp.asarray, params)
    self.update = jax.jit(opt.update)

  def step(self, t, grads=None):
    g = grads if grads is not None else jax_grad(self.params, X[t], Y[t], self.sign)
    u, self.state = self.update(jax.tree.map(jnp.asarray, g), self.state, self.params)
    self.params = optax.apply_updates(self.params, u)


# ----------------------------------------------------------------- PyTorch


class TorchRun:
  """The real torch.optim.RMSprop on P0 (params b, w in that order)."""

  def __init__(self, kwargs, groups=None, scheduler=None, sign=1.0, params=None):
    src = P0 if params is None else params
    self.p = [torch.tensor(np.array(src[k]), requires_grad=True) for k in NAMES]
    spec = (
      self.p
      if groups is None
      else [dict(g, params=[self.p[NAMES.index(n)] for n in names]) for names, g in groups]
    )
    self.opt = torch.optim.RMSprop(spec, **kwargs)
    self.sched = scheduler(self.opt) if scheduler else None
    self.sign = sign

  def step(self, t, skip=()):
    """One step on batch t with torch's own gradients; returns them."""
    self.opt.zero_grad()
    x, y = torch.from_numpy(X[t]), torch.from_numpy(Y[t])
    loss = self.sign * torch.mean((torch.tanh(x @ self.p[1] + self.p[0]) - y) ** 2)
    loss.backward()
    for k in skip:  # no gradient: torch leaves this parameter alone
      self.p[NAMES.index(k)].grad = None
    grads = {k: p.grad.numpy().copy() for k, p in zip(NAMES, self.p) if p.grad is not None}
    self.opt.step()
    if self.sched:
      self.sched.step()
    return grads

  @property
  def params(self):
    return {k: p.detach().numpy().copy() for k, p in zip(NAMES, self.p)}


def continue_both(theirs, ours, shared, rtol, start=K, steps=STEPS):
  for t in range(start, start + steps):
    g = theirs.step(t)
    ours.step(t, g if shared else None)
    assert_close(ours.params, theirs.params, rtol, where=f"step {t}")


TORCH_CASES = {
  "plain": dict(lr=0.01),
  "momentum": dict(lr=0.01, momentum=0.9),
  "centered": dict(lr=0.01, centered=True),
  "centered with momentum": dict(lr=0.01, centered=True, momentum=0.9),
  "weight decay": dict(lr=0.01, weight_decay=0.1),
  "maximize": dict(lr=0.01, maximize=True, momentum=0.5),
  "everything": dict(
    lr=0.005, alpha=0.9, eps=1e-6, weight_decay=0.05, momentum=0.8, centered=True, maximize=True
  ),
}


@pytest.mark.parametrize("gradients", GRADIENTS, ids=GRADIENTS)
@pytest.mark.parametrize("kwargs", TORCH_CASES.values(), ids=TORCH_CASES)
def test_a_torch_run_continues_in_jax(kwargs, gradients):
  sign = -1.0 if kwargs.get("maximize") else 1.0  # maximize -loss: the same descent
  theirs = TorchRun(kwargs, sign=sign)
  for t in range(K):
    theirs.step(t)
  opt, state = interop.from_torch(theirs.opt, theirs.params)
  assert int(state.count) == K
  continue_both(theirs, JaxRun(opt, state, theirs.params, sign), "fed" in gradients, GRADIENTS[gradients])


SCHEDULES = {
  "StepLR": (
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    optax.exponential_decay(0.01, transition_steps=5, decay_rate=0.5, staircase=True),
  ),
  "ExponentialLR": (
    lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95),
    optax.exponential_decay(0.01, transition_steps=1, decay_rate=0.95),
  ),
}


@pytest.mark.parametrize("gradients", GRADIENTS, ids=GRADIENTS)
@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES)
def test_a_torch_lr_scheduler_continues_as_the_optax_schedule_passed_on(schedule, gradients):
  scheduler, optax_schedule = schedule
  theirs = TorchRun(dict(lr=0.01, momentum=0.9), scheduler=scheduler)
  for t in range(K):
    theirs.step(t)
  # The schedule of the whole run: called with the step count, which goes on from torch's.
  opt, state = interop.from_torch(theirs.opt, theirs.params, learning_rate=optax_schedule)
  continue_both(theirs, JaxRun(opt, state, theirs.params), "fed" in gradients, GRADIENTS[gradients])


def test_a_schedule_that_does_not_continue_the_run_is_refused():
  theirs = TorchRun(dict(lr=0.01), scheduler=SCHEDULES["StepLR"][0])
  for t in range(K):
    theirs.step(t)
  restarted = optax.exponential_decay(0.01, transition_steps=5, decay_rate=0.5, staircase=True)
  shifted = lambda n: restarted(n + 5)
  with pytest.raises(
    ValueError, match=r"learning_rate\(7\) is 0.0025, but param_groups\[0\]\['lr'\] is 0.005.*shift it"
  ):
    interop.from_torch(theirs.opt, theirs.params, learning_rate=shifted)
  with pytest.raises(ValueError, match="learning_rate has 2 entries, but the optimizer has 1 param groups"):
    interop.from_torch(theirs.opt, theirs.params, learning_rate=[restarted, restarted])


TWO_GROUPS = [(("b",), dict(lr=0.02)), (("w",), dict(lr=0.005, weight_decay=0.1))]


@pytest.mark.parametrize("gradients", GRADIENTS, ids=GRADIENTS)
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant lr", "StepLR"])
def test_two_torch_param_groups_become_a_multi_transform(scheduled, gradients):
  scheduler = SCHEDULES["StepLR"][0] if scheduled else None
  theirs = TorchRun(dict(momentum=0.9), groups=TWO_GROUPS, scheduler=scheduler)
  for t in range(K):
    theirs.step(t)
  lrs = None
  if scheduled:
    lrs = [optax.exponential_decay(lr, 5, 0.5, staircase=True) for lr in (0.02, 0.005)]
  opt, state = interop.from_torch(theirs.opt, theirs.params, learning_rate=lrs)
  assert isinstance(state, optax.MultiTransformState)
  assert set(state.inner_states) == {"param_group_0", "param_group_1"}
  continue_both(theirs, JaxRun(opt, state, theirs.params), "fed" in gradients, GRADIENTS[gradients])


def test_torch_param_groups_with_the_same_settings_become_one_preset():
  same = [(("b",), dict(lr=0.02)), (("w",), dict(lr=0.02))]
  theirs = TorchRun(dict(momentum=0.9), groups=same)
  theirs.step(0)
  _, state = interop.from_torch(theirs.opt, theirs.params)
  assert isinstance(state, RMSPropState)


def test_parameters_torch_has_not_stepped_start_from_zero_and_counts_may_differ():
  theirs = TorchRun(dict(lr=0.01, momentum=0.9, centered=True))
  for t in range(K):
    theirs.step(t, skip=("b",) if t < 3 else ())  # b: 4 steps, w: 7
  opt, state = interop.from_torch(theirs.opt, theirs.params)
  assert int(state.count) == K  # the maximum
  np.testing.assert_array_equal(state.nu["b"], theirs.opt.state[theirs.p[0]]["square_avg"].numpy())
  continue_both(theirs, JaxRun(opt, state, theirs.params), shared=True, rtol=1e-6)

  fresh = TorchRun(dict(lr=0.01, momentum=0.9))
  for t in range(K):
    fresh.step(t, skip=("b",))  # b never stepped: torch has no state for it
  assert not fresh.opt.state.get(fresh.p[0])
  opt, state = interop.from_torch(fresh.opt, fresh.params)
  np.testing.assert_array_equal(state.nu["b"], 0)
  np.testing.assert_array_equal(state.trace["b"], 0)
  continue_both(fresh, JaxRun(opt, state, fresh.params), shared=True, rtol=1e-6)


def test_differing_counts_are_refused_when_the_update_depends_on_the_count(monkeypatch):
  theirs = TorchRun(dict(lr=0.01))
  for t in range(K):
    theirs.step(t, skip=("b",) if t < 3 else ())
  biased = lambda lr, alpha, eps, **kw: rmsprop_jax.rmsprop(
    lr, alpha, eps, eps_in_sqrt=False, bias_correction=True
  )
  monkeypatch.setattr(presets, "pytorch", biased)
  with pytest.raises(
    ValueError,
    match=r"step counts differ \(param_groups\[0\] has parameters at steps \[4\], the maximum is 7\)",
  ):
    interop.from_torch(theirs.opt, theirs.params)


def test_a_saved_torch_state_dict_converts_like_the_live_optimizer_and_nothing_is_modified():
  theirs = TorchRun(dict(lr=0.01, momentum=0.9, centered=True))
  for t in range(K):
    theirs.step(t)
  before = {k: v.clone() for k, v in theirs.opt.state[theirs.p[1]].items()}
  params = theirs.params
  params_copy = jax.tree.map(np.copy, params)
  _, live = interop.from_torch(theirs.opt, params)
  checkpoint = io.BytesIO()
  torch.save(theirs.opt.state_dict(), checkpoint)
  checkpoint.seek(0)
  _, saved = interop.from_torch(torch.load(checkpoint), params)
  jax.tree.map(np.testing.assert_array_equal, live, saved)
  # The state is a copy: steps in JAX leave torch's state and the inputs alone.
  opt, state = interop.from_torch(theirs.opt, params)
  run = JaxRun(opt, state, params)
  run.step(K)
  for k, v in theirs.opt.state[theirs.p[1]].items():
    assert torch.equal(v, before[k]), k
  jax.tree.map(np.testing.assert_array_equal, params, params_copy)


def test_the_state_has_the_params_dtypes_and_jax_leaves():
  rng = np.random.default_rng(1)
  p = [torch.tensor(P0[k]).to(torch.bfloat16).requires_grad_() for k in NAMES]
  topt = torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True)
  for _ in range(K):
    for q in p:
      q.grad = torch.from_numpy(rng.normal(size=q.shape).astype(np.float32)).to(torch.bfloat16)
    topt.step()
  params = {k: jnp.asarray(q.detach().float().numpy(), jnp.bfloat16) for k, q in zip(NAMES, p)}
  _, state = interop.from_torch(topt, params)
  assert isinstance(state.count, jax.Array) and state.count.dtype == jnp.int32
  for field, name in ((state.nu, "square_avg"), (state.mu, "grad_avg"), (state.trace, "momentum_buffer")):
    for k, q in zip(NAMES, p):
      assert isinstance(field[k], jax.Array) and field[k].dtype == jnp.bfloat16, (k, field[k].dtype)
      expected = topt.state[q][name].float().numpy()
      np.testing.assert_array_equal(np.asarray(field[k], np.float32), expected)


@pytest.mark.parametrize(
  "kwargs, groups",
  [(dict(lr=0.01, momentum=0.9, centered=True), None), (dict(momentum=0.9), TWO_GROUPS)],
  ids=["momentum and centered", "two param groups"],
)
def test_torch_to_jax_to_torch_continues_identically_in_torch(kwargs, groups):
  original = TorchRun(kwargs, groups=groups)
  for t in range(K):
    original.step(t)
  opt, state = interop.from_torch(original.opt, original.params)
  back = TorchRun(kwargs, groups=groups, params=original.params)
  interop.to_torch(opt, state, back.opt)
  for t in range(K, K + STEPS):
    original.step(t)
    back.step(t)
    for a, b in zip(original.p, back.p):
      assert torch.equal(a, b), t


def test_a_run_goes_to_jax_and_back_to_torch():
  kwargs = dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.05)
  theirs = TorchRun(kwargs)
  for t in range(K):
    theirs.step(t)
  opt, state = interop.from_torch(theirs.opt, theirs.params)
  ours = JaxRun(opt, state, theirs.params)
  for t in range(K, K + STEPS):
    ours.step(t)
  back = TorchRun(kwargs, params=jax.tree.map(np.asarray, ours.params))
  interop.to_torch(opt, ours.state, back.opt)
  assert float(back.opt.state[back.p[0]]["step"]) == K + STEPS
  continue_both(back, ours, shared=True, rtol=1e-6, start=K + STEPS, steps=10)


SMALLER = {
  "8-bit": (dict(state_bits=8, min_quantize_size=1), 0.07),  # 8-bit codes up to 12.5% apart
  "bfloat16 nu": (dict(nu_dtype=jnp.bfloat16), 2.0**-8),
}


def assert_moments_close(ours, theirs, rtol, where=""):
  """Each moment within ``rtol`` of its leaf's largest magnitude."""
  for k, (a, b) in enumerate(zip(ours, theirs)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.max(np.abs(b)) + 1e-30, err_msg=f"{where} {k}")


@pytest.mark.slow  # a torch run, then jax eager and jitted per storage: slow, run by CI
@pytest.mark.parametrize("storage", SMALLER, ids=SMALLER)
def test_a_torch_run_continues_in_jax_with_a_smaller_state(storage):
  kw, rtol = SMALLER[storage]
  kwargs = TORCH_CASES["centered with momentum"]
  theirs = TorchRun(kwargs)
  for t in range(K):
    theirs.step(t)
  opt, state = interop.from_torch(theirs.opt, theirs.params, **kw)
  stored = state.nu["w"]
  assert isinstance(stored, QuantizedArray) if "state_bits" in kw else stored.dtype == jnp.bfloat16
  moments = rmsprop_jax.dequantize_state(state)  # nu itself, also for centered 8-bit
  for field, key in (("nu", "square_avg"), ("mu", "grad_avg"), ("trace", "momentum_buffer")):
    torch_side = [theirs.opt.state[p][key].numpy() for p in theirs.p]
    rounded = field == "nu" or "state_bits" in kw  # bfloat16 nu: mu and the buffer stay float32
    assert_moments_close(
      [getattr(moments, field)[k] for k in NAMES], torch_side, rtol if rounded else 0, field
    )
  # The run goes on like torch's, within the storage's rounding.
  continue_both(theirs, JaxRun(opt, state, theirs.params), shared=True, rtol=0.02, steps=10)


def test_a_smaller_state_goes_back_to_torch_as_its_float32_values():
  kwargs = TORCH_CASES["centered with momentum"]
  theirs = TorchRun(kwargs)
  for t in range(K):
    theirs.step(t)
  opt, state = interop.from_torch(theirs.opt, theirs.params, state_bits=8, min_quantize_size=1)
  ours = JaxRun(opt, state, theirs.params)
  for t in range(K, K + 5):
    ours.step(t)
  back = TorchRun(kwargs, params=jax.tree.map(np.asarray, ours.params))
  interop.to_torch(opt, ours.state, back.opt)
  moments = rmsprop_jax.dequantize_state(ours.state)
  for k, p in zip(NAMES, back.p):
    st = back.opt.state[p]
    np.testing.assert_array_equal(st["square_avg"].numpy(), np.asarray(moments.nu[k]))
    np.testing.assert_array_equal(st["grad_avg"].numpy(), np.asarray(moments.mu[k]))
    np.testing.assert_array_equal(st["momentum_buffer"].numpy(), np.asarray(moments.trace[k]))


def test_storage_keywords_are_checked():
  theirs = TorchRun(dict(lr=0.01))
  theirs.step(0)
  with pytest.raises(TypeError, match="unexpected keyword argument.*state_bytes"):
    interop.from_torch(theirs.opt, theirs.params, state_bytes=8)
  with pytest.raises(ValueError, match="state_bits"):
    interop.from_torch(theirs.opt, theirs.params, state_bits=4)


def test_torch_errors_name_what_is_wrong():
  theirs = TorchRun(dict(lr=0.01))
  theirs.step(0)
  with pytest.raises(TypeError, match=r"must be a torch.optim.RMSprop, got torch.optim.adam.Adam"):
    interop.from_torch(torch.optim.Adam([torch.zeros(2, requires_grad=True)]), {"b": np.zeros(2)})
  adam = torch.optim.Adam(theirs.p)
  with pytest.raises(
    TypeError, match=r"state_dict\(\) of a torch.optim.RMSprop, but param_groups\[0\] has no"
  ):
    interop.from_torch(adam.state_dict(), theirs.params)
  with pytest.raises(ValueError, match="params has 1 parameters but the torch optimizer has 2"):
    interop.from_torch(theirs.opt, {"b": P0["b"]})
  with pytest.raises(
    ValueError,
    match=r"position 1 \(params\['w'\]\): the torch optimizer's parameter has shape \(3, 2\),"
    r" but params has shape \(2, 3\)",
  ):
    interop.from_torch(theirs.opt, {"b": P0["b"], "w": P0["w"].T})
  with pytest.raises(ValueError, match=r"param_groups\[0\]: alpha must be in \[0, 1\], got 1.5"):
    interop.from_torch(torch.optim.RMSprop(theirs.p, alpha=1.5), theirs.params)
  z = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
  with pytest.raises(ValueError, match=r"parameters \[0\] are complex"):
    interop.from_torch(torch.optim.RMSprop([z]), [np.zeros(2, np.complex64)])

  opt, state = interop.from_torch(theirs.opt, theirs.params)
  with pytest.raises(ValueError, match="position 0: the state has a momentum buffer, but param_groups"):
    momentum_opt = presets.pytorch(momentum=0.9)
    interop.to_torch(momentum_opt, momentum_opt.init(theirs.params), theirs.opt)
  with pytest.raises(ValueError, match="position 0: param_groups.0. has centered=True, but the state has no"):
    interop.to_torch(opt, state, torch.optim.RMSprop(theirs.p, centered=True))
  with pytest.raises(ValueError, match="state does not belong to opt"):
    interop.to_torch(presets.pytorch(momentum=0.9), state, theirs.opt)
  with pytest.raises(
    ValueError, match=r"position 0: the torch optimizer's parameter has shape \(2,\), but the state"
  ):
    interop.to_torch(opt, opt.init({"b": np.zeros(3), "w": P0["w"]}), theirs.opt)
  with pytest.raises(TypeError, match="must be a live torch.optim.RMSprop"):
    interop.to_torch(opt, state, theirs.opt.state_dict())


# ------------------------------------------------------------------- Keras


def keras_loss(b, w, x, y, sign):
  ops = keras.ops
  return sign * ops.mean(ops.square(ops.tanh(ops.matmul(x, w) + ops.expand_dims(b, 0)) - y))


keras_grad = jax.jit(jax.grad(keras_loss, argnums=(0, 1)))


class KerasRun:
  """The real Keras 3 RMSprop (JAX backend) on P0, gradients from keras.ops."""

  def __init__(self, kwargs, params=None, exclude=None, exclude_variables=(), build=True):
    src = P0 if params is None else params
    self.vars = [keras.Variable(np.array(src[k]), name=k) for k in NAMES]
    self.opt = keras.optimizers.RMSprop(**kwargs)
    if exclude or exclude_variables:
      var_list = [self.vars[NAMES.index(k)] for k in exclude_variables]
      self.opt.exclude_from_weight_decay(var_list=var_list, var_names=exclude)
    if build:
      self.opt.build(self.vars)

  def step(self, t):
    g = keras_grad(self.vars[0].value, self.vars[1].value, X[t], Y[t], 1.0)
    self.opt.apply(list(g), self.vars)
    return dict(zip(NAMES, g))

  @property
  def params(self):
    return {k: np.asarray(v.value).copy() for k, v in zip(NAMES, self.vars)}


KERAS_CASES = {
  "plain": dict(learning_rate=0.01),
  "momentum": dict(learning_rate=0.01, momentum=0.9),
  "centered": dict(learning_rate=0.01, centered=True),
  "centered with momentum": dict(learning_rate=0.01, centered=True, momentum=0.9),
  "weight decay": dict(learning_rate=0.01, weight_decay=0.1),
  "clipnorm": dict(learning_rate=0.01, momentum=0.5, clipnorm=0.1),
  "everything": dict(
    learning_rate=0.005, rho=0.8, momentum=0.8, epsilon=1e-6, centered=True, weight_decay=0.05
  ),
}


def keras_then_jax(kwargs, gradients, learning_rate=None, **exclude):
  theirs = KerasRun(kwargs, **exclude)
  for t in range(K):
    theirs.step(t)
  opt, state = interop.from_keras(theirs.opt, theirs.params, learning_rate=learning_rate)
  continue_both(theirs, JaxRun(opt, state, theirs.params), "fed" in gradients, GRADIENTS[gradients])
  return state


@pytest.mark.parametrize("gradients", GRADIENTS, ids=GRADIENTS)
@pytest.mark.parametrize("kwargs", KERAS_CASES.values(), ids=KERAS_CASES)
def test_a_keras_run_continues_in_jax(kwargs, gradients):
  state = keras_then_jax(kwargs, gradients)
  assert int(rmsprop_jax.diagnostics.find_state(state).count) == K


KERAS_DECAY = dict(initial_learning_rate=0.01, decay_steps=5, decay_rate=0.5, staircase=True)


@pytest.mark.parametrize("gradients", GRADIENTS, ids=GRADIENTS)
@pytest.mark.parametrize(
  "passed_on", [False, True], ids=["the Keras schedule itself", "an optax schedule passed on"]
)
def test_a_keras_learning_rate_schedule_continues(passed_on, gradients):
  sched = keras.optimizers.schedules.ExponentialDecay(**KERAS_DECAY)
  ours = optax.exponential_decay(0.01, 5, 0.5, staircase=True) if passed_on else None
  keras_then_jax(dict(learning_rate=sched, momentum=0.9, weight_decay=0.1), gradients, learning_rate=ours)


EXCLUDE = {"by name": dict(exclude=["b"]), "by variable": dict(exclude_variables=["b"])}


@pytest.mark.parametrize("gradients", GRADIENTS, ids=GRADIENTS)
@pytest.mark.parametrize("exclude", EXCLUDE.values(), ids=EXCLUDE)
def test_keras_exclude_from_weight_decay_becomes_a_multi_transform(exclude, gradients):
  state = keras_then_jax(dict(learning_rate=0.01, weight_decay=0.2), gradients, **exclude)
  assert set(state.inner_states) == {"weight_decay", "no_weight_decay"}


def test_keras_to_jax_to_keras_continues_identically_in_keras():
  kwargs = dict(learning_rate=0.01, momentum=0.9, centered=True, weight_decay=0.05)
  original = KerasRun(kwargs)
  for t in range(K):
    original.step(t)
  opt, state = interop.from_keras(original.opt, original.params)
  back = KerasRun(kwargs, params=original.params)
  interop.to_keras(opt, state, back.opt)
  for t in range(K, K + STEPS):
    original.step(t)
    back.step(t)
    for a, b in zip(original.vars, back.vars):
      np.testing.assert_array_equal(a.value, b.value, err_msg=f"step {t}")


def test_a_run_goes_to_jax_and_back_to_keras():
  kwargs = dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(**KERAS_DECAY), momentum=0.9)
  theirs = KerasRun(kwargs)
  for t in range(K):
    theirs.step(t)
  opt, state = interop.from_keras(theirs.opt, theirs.params)
  ours = JaxRun(opt, state, theirs.params)
  for t in range(K, K + STEPS):
    ours.step(t)
  back = KerasRun(kwargs, params=ours.params)
  interop.to_keras(opt, ours.state, back.opt)
  assert int(back.opt.iterations) == K + STEPS
  continue_both(back, ours, shared=True, rtol=1e-6, start=K + STEPS, steps=10)


def test_a_keras_run_goes_to_jax_in_8_bits_and_back():
  kwargs = KERAS_CASES["centered with momentum"]
  theirs = KerasRun(kwargs)
  for t in range(K):
    theirs.step(t)
  opt, state = interop.from_keras(theirs.opt, theirs.params, state_bits=8, min_quantize_size=1)
  assert isinstance(state.nu["w"], QuantizedArray)
  moments = rmsprop_jax.dequantize_state(state)
  _, exact = interop.from_keras(theirs.opt, theirs.params)  # Keras's moments, in our conventions
  for field in ("nu", "mu", "trace"):
    ours_side = [getattr(moments, field)[k] for k in NAMES]
    keras_side = [getattr(exact, field)[k] for k in NAMES]
    assert_moments_close(ours_side, keras_side, SMALLER["8-bit"][1], field)
  ours = JaxRun(opt, state, theirs.params)
  continue_both(theirs, ours, shared=True, rtol=0.02, steps=10)
  back = KerasRun(kwargs, params=ours.params)
  interop.to_keras(opt, ours.state, back.opt)
  nu = [np.asarray(v.value) for v in back.opt.variables if v.name.endswith("_velocity")]
  for a, k in zip(nu, NAMES):
    np.testing.assert_array_equal(a, np.asarray(rmsprop_jax.dequantize_state(ours.state).nu[k]))


def test_an_unbuilt_keras_optimizer_starts_from_zero():
  theirs = KerasRun(dict(learning_rate=0.01, momentum=0.9, weight_decay=0.1), build=False)
  opt, state = interop.from_keras(theirs.opt, P0)
  assert int(state.count) == 0
  jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0), (state.nu, state.trace))
  continue_both(theirs, JaxRun(opt, state, P0), shared=True, rtol=1e-6, start=0, steps=10)


def without(monkeypatch, obj, name):
  """``obj`` as a Keras release without the attribute ``name`` would make it."""
  owner = obj if name in vars(obj) else next(c for c in type(obj).__mro__ if name in vars(c))
  monkeypatch.delattr(owner, name)


@pytest.mark.parametrize("name", ["_learning_rate", "_trainable_variables", "_use_weight_decay"])
def test_a_keras_without_a_private_attribute_the_port_reads_fails_naming_it(name, monkeypatch):
  sched = keras.optimizers.schedules.ExponentialDecay(**KERAS_DECAY)
  theirs = KerasRun(dict(learning_rate=sched, weight_decay=0.1), exclude=["b"])
  theirs.step(0)
  without(monkeypatch, theirs.opt, name)
  with pytest.raises(
    RuntimeError, match=rf"has no attribute '{name}' .* in Keras {re.escape(keras.__version__)}"
  ):
    interop.from_keras(theirs.opt, theirs.params)


def test_keras_variables_the_port_does_not_know_are_refused(monkeypatch):
  theirs = KerasRun(dict(learning_rate=0.01))
  theirs.step(0)
  # A momentum the optimizer keeps no buffer for: its buffer is missing, not zero.
  monkeypatch.setattr(theirs.opt, "momentum", 0.9)
  with pytest.raises(RuntimeError, match=r"has 2 '\*_velocity', 0 '\*_momentum', 0 '\*_average_gradient'"):
    interop.from_keras(theirs.opt, theirs.params)
  monkeypatch.undo()
  # A variable of a kind the port does not know (a renamed slot, an addition).
  theirs.opt.add_variable((2,), name="b_rms")
  with pytest.raises(RuntimeError, match=r"and others named \['b_rms'\], not one velocity per parameter"):
    interop.from_keras(theirs.opt, theirs.params)
  with pytest.raises(RuntimeError, match=r"others named \['b_rms'\]"):
    interop.to_keras(*interop.from_keras(KerasRun(dict(learning_rate=0.01)).opt, P0), theirs.opt)


def test_keras_variables_overwritten_with_their_gradient_are_refused():
  theirs = KerasRun(dict(learning_rate=0.01), build=False)
  theirs.vars[1].overwrite_with_gradient = True  # e.g. a float8 layer's scales
  theirs.opt.build(theirs.vars)
  with pytest.raises(ValueError, match=r"positions \[1\] have overwrite_with_gradient=True"):
    interop.from_keras(theirs.opt, theirs.params)


def test_an_exclude_from_weight_decay_that_leaves_no_trace_fails(monkeypatch):
  """An unbuilt optimizer: whether exclude_from_weight_decay() was called is
  read from what it writes; a Keras where it writes nothing cannot be read."""
  base = next(c for c in type(keras.optimizers.RMSprop()).__mro__ if "exclude_from_weight_decay" in vars(c))
  monkeypatch.setattr(base, "exclude_from_weight_decay", lambda self, var_list=None, var_names=None: None)
  with pytest.raises(RuntimeError, match="exclude_from_weight_decay.. sets no attribute"):
    interop.from_keras(keras.optimizers.RMSprop(weight_decay=0.1), P0)


def test_keras_errors_name_what_is_wrong():
  theirs = KerasRun(dict(learning_rate=0.01))
  with pytest.raises(
    TypeError, match="must be a keras.optimizers.RMSprop, got keras.src.optimizers.adam.Adam"
  ):
    interop.from_keras(keras.optimizers.Adam(), P0)
  with pytest.raises(ValueError, match="use_ema=True cannot be ported"):
    interop.from_keras(keras.optimizers.RMSprop(use_ema=True), P0)
  with pytest.raises(ValueError, match="the Keras learning_rate is a callable; pass learning_rate="):
    interop.from_keras(keras.optimizers.RMSprop(learning_rate=lambda: 0.01), P0)
  with pytest.raises(ValueError, match=r"learning_rate is 0.02, but optimizer.learning_rate is 0.01"):
    interop.from_keras(theirs.opt, P0, learning_rate=0.02)
  with pytest.raises(
    ValueError,
    match=r"position 0 \(params\['b'\]\): the Keras optimizer's parameter has shape \(2,\),"
    r" but params has shape \(3,\)",
  ):
    interop.from_keras(theirs.opt, {"b": np.zeros(3), "w": P0["w"]})
  with pytest.raises(ValueError, match="params has 1 parameters but the Keras optimizer has 2"):
    interop.from_keras(theirs.opt, {"b": P0["b"]})
  exclude_unbuilt = keras.optimizers.RMSprop(weight_decay=0.1)
  exclude_unbuilt.exclude_from_weight_decay(var_names=["b"])
  with pytest.raises(ValueError, match="exclude_from_weight_decay is set but the optimizer is not built"):
    interop.from_keras(exclude_unbuilt, P0)
  with pytest.raises(ValueError, match="global_clipnorm with exclude_from_weight_decay cannot be ported"):
    interop.from_keras(KerasRun(dict(weight_decay=0.1, global_clipnorm=1.0), exclude=["b"]).opt, P0)
  opt, state = interop.from_keras(theirs.opt, P0)
  with pytest.raises(ValueError, match="optimizer must be built"):
    interop.to_keras(opt, state, keras.optimizers.RMSprop())
  with pytest.raises(
    ValueError, match="position 0: the state has a momentum buffer, but the optimizer has momentum=0.0"
  ):
    m = presets.keras(momentum=0.9)
    interop.to_keras(m, m.init(P0), theirs.opt)


def test_the_module_imports_without_torch_or_keras():
  code = (
    "import sys, rmsprop_jax.interop; assert not {'torch', 'keras'} & set(sys.modules), sorted(sys.modules)"
  )
  subprocess.run([sys.executable, "-c", code], check=True)
