"""One process of the two-process data-parallel tests (test_scale.py, test_sharding.py).

Run as ``python multiprocess_worker.py PORT PROCESS_ID OUT.npz [MODE]``. Joins
a 2-process JAX cluster on 127.0.0.1 (CPU collectives over gloo), trains a
linear model data-parallel with rmsprop_jax, and saves its final params.

MODE ``replicated`` (the default) keeps the optimizer state like the params,
whole on every process; ``zero1`` shards it over the data axis with
``rmsprop_jax.state_shardings`` (ZeRO-1) and also saves, under ``state_*``
keys, how many elements of the state of ``w`` this process holds and its
slice of ``nu``.
"""

import sys

import numpy as np

STEPS = 20
N_PER_PROCESS = 16
# Features per mode: zero1 needs a weight vector that splits over 2 processes.
FEATURES = {"replicated": 5, "zero1": 8}


def problem(features: int = 5):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2 * N_PER_PROCESS, features)).astype(np.float32)
  y = (x @ rng.normal(size=(features,)) + 0.5).astype(np.float32)
  return x, y


def main(port: str, process_id: str, out: str, mode: str = "replicated") -> None:
  if mode not in FEATURES:
    raise ValueError(f"mode must be one of {sorted(FEATURES)}, got {mode!r}")
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=int(process_id),
    initialization_timeout=60,
  )
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import rmsprop_jax

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  x, y = problem(FEATURES[mode])
  lo = jax.process_index() * N_PER_PROCESS
  local = slice(lo, lo + N_PER_PROCESS)
  xs = jax.make_array_from_process_local_data(data_sharding, x[local], x.shape)
  ys = jax.make_array_from_process_local_data(data_sharding, y[local], y.shape)

  opt = rmsprop_jax.rmsprop(0.05, momentum=0.9, centered=True)
  params = {"w": jnp.zeros(FEATURES[mode]), "b": jnp.zeros(())}
  params = jax.device_put(params, replicated)

  def step(params, state, x, y):
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  if mode == "zero1":
    state_sharding = rmsprop_jax.state_shardings(opt, params, mesh, "data", min_size=0)
    state = jax.jit(opt.init, out_shardings=state_sharding)(params)
    param_sharding = jax.tree.map(lambda _: replicated, params)
    step = jax.jit(
      step,
      in_shardings=(param_sharding, state_sharding, data_sharding, data_sharding),
      out_shardings=(param_sharding, state_sharding),
      donate_argnums=(0, 1),
    )
  else:
    state = jax.jit(opt.init)(params)
    step = jax.jit(step)

  for _ in range(STEPS):
    params, state = step(params, state, xs, ys)
  local_params = {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}
  if mode == "zero1":
    for field in ("nu", "mu", "trace"):
      held = sum(s.data.size for s in getattr(state, field)["w"].addressable_shards)
      local_params[f"state_{field}_w"] = np.asarray(held)
    (shard,) = state.nu["w"].addressable_shards
    local_params["state_nu_w_start"] = np.asarray(shard.index[0].start or 0)
    local_params["state_nu_w_slice"] = np.asarray(shard.data)
  np.savez(out, **local_params)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
