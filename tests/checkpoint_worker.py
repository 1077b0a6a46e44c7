"""An 8-bit state trained under ZeRO-1, checkpointed with orbax, resumed elsewhere.

Used by test_checkpoint.py in its own process (on the 8 host devices
conftest.py forces) and, as ``python checkpoint_worker.py MODE CKPT OUT.npz``,
in fresh processes with as many host CPU devices as the test gives them
(``--xla_force_host_platform_device_count``):

- ``train``: trains ``STEPS`` steps of ``rmsprop(1e-2, momentum=0.9,
  state_bits=8)`` under ZeRO-1 (params replicated, the state split over a
  ``data`` axis of all devices by :func:`rmsprop_jax.state_shardings`),
  saves params and state with orbax at ``CKPT`` after ``SAVE_AT`` steps, and
  carries on, uninterrupted, to the end;
- ``resume``: restores that checkpoint onto the devices at hand (the state
  laid out by ``state_shardings`` over them) and trains the remaining steps.

Either way it returns (saves) the final params and state, gathered, one
entry per leaf, and per leaf the most elements one device holds.

The gradient is a function of each parameter alone plus a fixed term per
step, so that no sum over a batch, reduced across a different number of
devices in a different order, enters the comparison: what is compared is the
optimizer's own arithmetic on 8, 2 and 1 devices.
"""

from __future__ import annotations

import sys

import numpy as np

STEPS = 10
SAVE_AT = 4
# 8-bit in the flat layout, 8-bit with a short block per row, float32 (small).
SHAPES = {"w": (256, 128), "v": (64, 300), "b": (128,)}


def _problem():
  rng = np.random.default_rng(0)
  params = {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
  noise = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
  return params, noise


def opt():
  import rmsprop_jax

  return rmsprop_jax.rmsprop(1e-2, momentum=0.9, state_bits=8)


def run(mode: str, ckpt: str, devices=None) -> dict[str, np.ndarray]:
  """Trains (``train``) or resumes (``resume``) on ``devices`` (default: all)."""
  import jax
  import optax
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import rmsprop_jax

  if mode not in ("train", "resume"):
    raise ValueError(f"mode must be 'train' or 'resume', got {mode!r}")
  devices = jax.devices() if devices is None else devices
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  params0, noise = _problem()
  tx = opt()
  params = jax.device_put(params0, replicated)
  param_sharding = jax.tree.map(lambda _: replicated, params)
  state_sharding = rmsprop_jax.state_shardings(tx, params, mesh, "data")

  def step(params, state, noise):
    grads = jax.tree.map(lambda p, n: p + 0.1 * p**3 + n, params, noise)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(
    step,
    in_shardings=(param_sharding, state_sharding, param_sharding),
    out_shardings=(param_sharding, state_sharding),
    donate_argnums=(0, 1),
  )
  with ocp.StandardCheckpointer() as checkpointer:
    if mode == "train":
      state = jax.jit(tx.init, out_shardings=state_sharding)(params)
      first = 0
    else:
      abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        (params, jax.eval_shape(tx.init, params)),
        (param_sharding, state_sharding),
      )
      params, state = checkpointer.restore(ckpt, abstract)
      first = SAVE_AT
    for t in range(first, STEPS):
      if mode == "train" and t == SAVE_AT:
        checkpointer.save(ckpt, (params, state))
        checkpointer.wait_until_finished()
      params, state = step(params, state, jax.device_put(noise[t], replicated))

  out = {"devices": np.asarray(len(devices))}
  for name, tree in (("params", params), ("state", state)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      key = name + jax.tree_util.keystr(path)
      out[key] = np.asarray(jax.device_get(leaf))
      out["held " + key] = np.asarray(max(s.data.size for s in leaf.addressable_shards))
  return out


if __name__ == "__main__":
  mode, ckpt, path = sys.argv[1:]
  np.savez(path, **run(mode, ckpt))
