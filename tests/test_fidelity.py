"""Fidelity of 8-bit state over a run, next to bitsandbytes' 8-bit RMSprop and torch's.

Each 8-bit run is compared with its own framework's float32 run from the same
initial weights and batches (``rmsprop_jax.fidelity``): ours with our float32
run, bitsandbytes' ``RMSprop8bit`` with ``torch.optim.RMSprop``. Then
bitsandbytes' own per-step test protocol applied to ours, and the error that
stochastic rounding accumulates in a stored EMA, against a float64 EMA.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsprop_jax
from rmsprop_jax import fidelity

torch = pytest.importorskip("torch")


def test_bench_runs_fidelity_only_when_named_and_run_refuses_unknown_names():
  from rmsprop_jax import bench

  assert bench.expand_cases(["fidelity", "big_tree"]) == ["fidelity", "big_tree"]
  assert "fidelity" not in bench.expand_cases(None)
  with pytest.raises(ValueError, match="variants must be among"):
    fidelity.run(quick=True, variants=("nesterov",))


def _distances(problem, variant, seeds, steps):
  """(ours, bitsandbytes') distance to their float32 runs, per seed."""
  ours, peer = [], []
  for seed in range(seeds):
    prob = fidelity.make_problem(problem, seed, True, steps)
    ref = fidelity.run_jax(fidelity.ours_opt(variant, None, seed), prob)
    ours.append(fidelity.compare(fidelity.run_jax(fidelity.ours_opt(variant, "8-bit", seed), prob), ref))
    tref = fidelity.run_torch(fidelity.torch_opt(variant, False), prob)
    peer.append(fidelity.compare(fidelity.run_torch(fidelity.torch_opt(variant, True), prob), tref))
  return [o["distance"] for o in ours], [p["distance"] for p in peer]


def test_8bit_digits_mlp_run_stays_at_least_as_close_to_float32_as_bitsandbytes():
  pytest.importorskip("bitsandbytes")
  ours, peer = _distances("digits_mlp", "plain", seeds=2, steps=100)
  assert np.mean(ours) <= np.mean(peer), (ours, peer)


@pytest.mark.xfail(
  strict=True,
  reason="on noisy least squares (a block's nu within about a decade) bitsandbytes' code, 1-3% apart"
  " near the block maximum, rounded to nearest, strays less than float_e5's codes 6-12% apart,"
  " rounded stochastically (benchmarks/README.md, Fidelity)",
)
def test_8bit_least_squares_run_stays_at_least_as_close_to_float32_as_bitsandbytes():
  pytest.importorskip("bitsandbytes")
  ours, peer = _distances("least_squares", "plain", seeds=1, steps=100)
  assert np.mean(ours) <= np.mean(peer), (ours, peer)


def test_bitsandbytes_8bit_rmsprop_ignores_momentum_on_cpu_and_refuses_centered():
  # What the docs say of the peer (notebook 06): its CPU kernel's rmsprop branch uses alpha only.
  bnb = pytest.importorskip("bitsandbytes")
  prob = fidelity.make_problem("least_squares", 0, True, 20)
  make = lambda m: lambda ps: bnb.optim.RMSprop8bit(ps, lr=1e-3, alpha=0.99, momentum=m, min_8bit_size=1)
  plain, momentum = fidelity.run_torch(make(0.0), prob), fidelity.run_torch(make(0.9), prob)
  np.testing.assert_array_equal(plain["snapshots"][-1][0], momentum["snapshots"][-1][0])
  with pytest.raises(NotImplementedError, match="Centered"):
    bnb.optim.RMSprop8bit([torch.zeros(8, requires_grad=True)], centered=True)


class _Ours:
  """Our 8-bit PyTorch preset, stepped like a torch optimizer."""

  def __init__(self, p0):
    self.opt = rmsprop_jax.presets.pytorch(lr=0.01, alpha=0.9, state_bits=8)
    self.params = jnp.asarray(p0)
    self.state = self.opt.init(self.params)
    self._step = jax.jit(lambda p, s, g: (lambda u, s: (p + u, s))(*self.opt.update(g, s, p)))

  def step(self, g):
    self.params, self.state = self._step(self.params, self.state, jnp.asarray(g))
    return np.asarray(self.params), np.asarray(rmsprop_jax.dequantize_state(self.state).nu)


class _Bnb:
  """bitsandbytes' RMSprop8bit with the same settings, its state decoded by its own functions."""

  def __init__(self, p0):
    bnb = pytest.importorskip("bitsandbytes")
    self.F = bnb.functional
    self.p = torch.tensor(p0, requires_grad=True)
    self.opt = bnb.optim.RMSprop8bit([self.p], lr=0.01, alpha=0.9, min_8bit_size=1)

  def step(self, g):
    self.p.grad = torch.from_numpy(g.copy())
    self.opt.step()
    st = self.opt.state[self.p]
    nu = self.F.dequantize_blockwise(st["state1"], absmax=st["absmax1"], code=st["qmap1"], blocksize=256)
    return self.p.detach().numpy().copy(), nu.numpy()


@pytest.mark.parametrize("impl", [_Ours, _Bnb], ids=["ours", "bitsandbytes"])
def test_8bit_state_passes_bitsandbytes_per_step_limits_against_torch_rmsprop(impl):
  # The setting and limits of bitsandbytes' test_optimizer8bit (float32): params randn * 0.1,
  # gradients randn * 0.01, torch.optim.RMSprop(lr 0.01, alpha 0.9) as the reference; per step a
  # mean absolute param error below 6e-5 and a mean relative one below 6e-4, and fewer than 20
  # state entries off by more than atol 3e-3 + rtol 1e-3. Per step: before each, the reference
  # restarts from the 8-bit run's params and decoded nu, so what is measured is one step's
  # error, not the runs' drift (that is the fidelity case's).
  rng = np.random.default_rng(0)
  shape = (256, 512)
  p0 = (0.1 * rng.normal(size=shape)).astype(np.float32)
  ref = torch.tensor(p0, requires_grad=True)
  topt = torch.optim.RMSprop([ref], lr=0.01, alpha=0.9)
  run = impl(p0)
  worst = 0.0
  for i in range(30):
    g = (0.01 * rng.normal(size=shape)).astype(np.float32)
    ref.grad = torch.from_numpy(g.copy())
    topt.step()
    ours, nu = run.step(g)
    theirs = ref.detach().numpy()
    err = np.abs(ours - theirs)
    assert err.mean() < 6e-5 and (err / (np.abs(theirs) + 1e-9)).mean() < 6e-4, (i, err.mean())
    square_avg = topt.state[ref]["square_avg"].numpy()
    assert (~np.isclose(square_avg, nu, atol=3e-3, rtol=1e-3)).sum() < 20
    worst = max(worst, float(err.mean()))
    with torch.no_grad():
      ref.copy_(torch.from_numpy(ours.copy()))
      topt.state[ref]["square_avg"].copy_(torch.from_numpy(nu.copy()))
  # Both compute the step in float32 from the decoded state: float32 rounding of |p| ~ 0.1.
  assert worst < 1e-7, worst


@pytest.mark.parametrize("decay", [0.9, 0.99, 0.999])
def test_accumulated_error_of_the_stored_nu_is_bounded_by_the_code_spacing(decay):
  # Each step rounds the new nu stochastically to one of its two neighbouring codes, whose
  # gap is at most 1/8 of the lower one (float_e5: 3 mantissa bits): an error of mean 0 and
  # variance at most (gap / 2)**2. The stored EMA keeps each error, decayed by `decay`, so per
  # element the accumulated error has variance at most sum_k decay**(2k) (gap / 2)**2, a
  # relative RMS of at most (1/16) / sqrt(1 - decay**2) of nu. Measured over 1/(1-decay) steps
  # after the EMA has filled (4/(1-decay) steps), against a float64 EMA of the same gradients;
  # the float32 EMA is the float64 one to float32 rounding.
  shape = (16, 256)
  horizon = int(round(1 / (1 - decay)))
  steps = 4 * horizon
  rng = np.random.default_rng(1)
  scale = np.exp(rng.normal(size=shape))  # nu spread over ~3 decades in a block
  grads = (1e-3 * scale * rng.normal(size=(steps, *shape))).astype(np.float32)
  ema64 = np.zeros(shape)
  ema64_seen = []
  for g in grads.astype(np.float64):
    ema64 = decay * ema64 + (1 - decay) * g * g
    ema64_seen.append(ema64)
  ema64_seen = np.stack(ema64_seen[-horizon:])
  f32 = rmsprop_jax.scale_by_rms(decay, eps=1e-8)
  q8 = rmsprop_jax.scale_by_rms(decay, eps=1e-8, state_bits=8)

  @jax.jit
  def run(gs):
    def body(states, g):
      s32, s8 = f32.update(g, states[0])[1], q8.update(g, states[1])[1]
      return (s32, s8), (s32.nu, rmsprop_jax.dequantize_state(s8).nu)

    init = (f32.init(gs[0]), q8.init(gs[0]))
    return jax.lax.scan(body, init, gs)[1]

  nu32, nu8 = (np.asarray(a, np.float64)[-horizon:] for a in run(jnp.asarray(grads)))
  np.testing.assert_allclose(nu32, ema64_seen, rtol=steps * 2.0**-23)
  rel = nu8 / ema64_seen - 1
  per_element_rms = np.sqrt(np.mean(rel**2, axis=0))
  bound = (1 / 16) / math.sqrt(1 - decay**2)
  assert np.sqrt(np.mean(per_element_rms**2)) <= bound, np.sqrt(np.mean(per_element_rms**2))
  # Unbiased: the mean error over the elements stays within its sampling noise (the
  # elements' errors are independent; each is correlated over ~1/(1-decay) steps).
  noise = bound / math.sqrt(rel.shape[1] * rel.shape[2])
  assert abs(rel.mean()) <= 5 * noise, (rel.mean(), noise)
