"""State you can keep: orbax and pickle round trips resume bit-identically; an 8-bit
ZeRO-1 state checkpointed on 8 devices resumes on 2 and on 1."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import checkpoint_worker
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import PARAMS0, fixed_grads

import rmsprop_jax

GRADS = fixed_grads(10, seed=31)


def _opt():
  return rmsprop_jax.rmsprop(
    optax.linear_schedule(0.02, 0.001, 10),
    momentum=0.9,
    centered=True,
    nu_dtype=jnp.bfloat16,
  )


def _steps(opt, params, state, grads):
  step = jax.jit(opt.update)
  traj = []
  for g in grads:
    u, state = step(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, u)
    traj.append(params)
  return params, state, traj


def _resume_check(save, load):
  opt = _opt()
  params = jax.tree.map(jnp.asarray, PARAMS0)
  full_params, full_state, full_traj = _steps(opt, params, opt.init(params), GRADS)
  mid_params, mid_state, _ = _steps(opt, params, opt.init(params), GRADS[:4])
  restored_params, restored_state = load(save((mid_params, mid_state)))
  assert isinstance(restored_state, rmsprop_jax.RMSPropState)
  assert restored_state.nu["w"].dtype == jnp.bfloat16
  _, end_state, traj = _steps(_opt(), restored_params, restored_state, GRADS[4:])
  for a, b in zip(traj, full_traj[4:]):
    chex.assert_trees_all_equal(a, b)  # bit-identical
  chex.assert_trees_all_equal(end_state, full_state)


def test_pickle_round_trip_resumes_bit_identically():
  _resume_check(pickle.dumps, pickle.loads)


def test_orbax_round_trip_resumes_bit_identically(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")

  def save(tree):
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp_path / "ckpt", tree)
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

  def load(abstract):
    with ocp.StandardCheckpointer() as ckpt:
      return ckpt.restore(tmp_path / "ckpt", abstract)

  _resume_check(save, load)


@pytest.mark.slow
def test_soak_100k_steps_stays_finite():
  opt = rmsprop_jax.rmsprop(1e-2, momentum=0.9, centered=True)
  target = jnp.array([1.0, -2.0, 3.0])

  @jax.jit
  def soak(params, state, key):
    def step(carry, k):
      params, state = carry
      noise = jax.random.normal(k, params.shape) * 0.1
      g = params - target + noise
      u, state = opt.update(g, state, params)
      return (optax.apply_updates(params, u), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), jax.random.split(key, 100_000))
    return params, state

  params = jnp.zeros(3)
  params, state = soak(params, opt.init(params), jax.random.key(0))
  chex.assert_tree_all_finite((params, state))
  np.testing.assert_allclose(params, target, atol=0.1)
  assert int(state.count) == 100_000


# ------------------------------------------------- ZeRO-1, 8-bit, other device counts

needs_8 = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs 8 devices (conftest.py forces 8 host CPUs)"
)


def _assert_continues_as_uninterrupted(resumed, full, devices):
  """``resumed`` (a run restored onto ``devices`` devices) against ``full`` (8 devices).

  The codes and the count are the same bits. Floats (params, block scales,
  float32 moments) agree to float32 rounding, not bit for bit: XLA:CPU
  contracts ``a * b + c`` into a fused multiply-add where the loop it emits
  for a shard's shape allows it, so a leaf's arithmetic may round differently
  on 2 devices than on 8 (by one unit in the last place: on this machine the
  ``(64, 300)`` leaf on 2 devices; with ``--xla_cpu_max_isa=AVX``, no FMA,
  every run here is bit-identical).
  """
  assert int(resumed["devices"]) == devices
  for key, want in full.items():
    if key == "devices" or key.startswith("held "):
      continue
    got = resumed[key]
    assert got.dtype == want.dtype and got.shape == want.shape, key
    if not np.issubdtype(want.dtype, np.floating):  # codes, count
      np.testing.assert_array_equal(got, want, err_msg=key)
    else:
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.abs(want).max(), err_msg=key)
  for name, shape in checkpoint_worker.SHAPES.items():
    size = int(np.prod(shape))
    for moment in ("nu", "trace"):
      codes = resumed.get(f"held state.{moment}['{name}'].codes")
      if codes is not None:  # quantized: the codes are split over the devices
        assert int(codes) == size // devices, (moment, name)
    assert int(resumed[f"held params['{name}']"]) == size  # params replicated


@needs_8
def test_zero1_8bit_checkpoint_restores_onto_2_and_1_devices_and_continues(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  full = checkpoint_worker.run("train", ckpt, jax.devices()[:8])
  assert int(full["held state.nu['w'].codes"]) == 256 * 128 // 8
  for n in (2, 1):
    _assert_continues_as_uninterrupted(checkpoint_worker.run("resume", ckpt, jax.devices()[:n]), full, n)


@pytest.mark.slow
def test_zero1_8bit_checkpoint_resumes_in_fresh_processes_with_2_and_1_devices(tmp_path):
  """The same in processes of their own: trained on 8 host devices, resumed on 2 and on 1."""
  worker = str(Path(__file__).with_name("checkpoint_worker.py"))
  ckpt = str(tmp_path / "ckpt")

  def run(mode, devices):
    out = tmp_path / f"{mode}{devices}.npz"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
      [sys.executable, worker, mode, ckpt, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return dict(np.load(out))

  full = run("train", 8)
  for n in (2, 1):
    _assert_continues_as_uninterrupted(run("resume", n), full, n)


@needs_8
def test_8bit_checkpoint_from_2_devices_resumes_on_8_where_a_column_split_would_cut_blocks(tmp_path):
  """A (64, 1024) leaf: its codes split over columns on 2 devices (512 each: whole blocks), over
  rows on 8 (a column split would cut blocks: 128 each); the state reshards on restore."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  ocp = pytest.importorskip("orbax.checkpoint")
  opt = rmsprop_jax.rmsprop(1e-2, momentum=0.9, state_bits=8)

  def zero1(n):
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,))
    params = jax.device_put({"w": jnp.full((64, 1024), 0.5)}, NamedSharding(mesh, P()))
    shardings = rmsprop_jax.state_shardings(opt, params, mesh)
    step = jax.jit(opt.update, in_shardings=(None, shardings, None), out_shardings=(None, shardings))
    return params, shardings, step

  params, shardings, step = zero1(2)
  _, state = step(params, jax.jit(opt.init, out_shardings=shardings)(params), params)
  assert state.nu["w"].codes.addressable_shards[0].data.shape == (64, 512)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", state)
  want_u, want = step(params, state, params)  # the uninterrupted run's next step, on 2 devices
  params, shardings, step = zero1(8)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    jax.eval_shape(opt.init, params),
    shardings,
  )
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(tmp_path / "ckpt", abstract)
  assert state.nu["w"].codes.addressable_shards[0].data.shape == (8, 1024)
  u, state = step(params, state, params)
  np.testing.assert_allclose(u["w"], want_u["w"], rtol=1e-6)
  for got, ref in zip(
    jax.tree.leaves(rmsprop_jax.dequantize_state(state)), jax.tree.leaves(rmsprop_jax.dequantize_state(want))
  ):
    np.testing.assert_allclose(got, ref, rtol=1e-6)
