"""One process of the two-process data-parallel test (see test_scale.py).

Run as ``python multiprocess_worker.py PORT PROCESS_ID OUT.npz``. Joins a
2-process JAX cluster on 127.0.0.1 (CPU collectives over gloo), trains a
linear model data-parallel with rmsprop_jax, and saves its final params.
"""

import sys

import numpy as np

STEPS = 20
N_PER_PROCESS = 16


def problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2 * N_PER_PROCESS, 5)).astype(np.float32)
  y = (x @ rng.normal(size=(5,)) + 0.5).astype(np.float32)
  return x, y


def main(port: str, process_id: str, out: str) -> None:
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
  x, y = problem()
  lo = jax.process_index() * N_PER_PROCESS
  local = slice(lo, lo + N_PER_PROCESS)
  xs = jax.make_array_from_process_local_data(data_sharding, x[local], x.shape)
  ys = jax.make_array_from_process_local_data(data_sharding, y[local], y.shape)

  opt = rmsprop_jax.rmsprop(0.05, momentum=0.9, centered=True)
  params = {"w": jnp.zeros(5), "b": jnp.zeros(())}
  params = jax.device_put(params, replicated)
  state = jax.jit(opt.init)(params)

  @jax.jit
  def step(params, state, x, y):
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(STEPS):
    params, state = step(params, state, xs, ys)
  local_params = {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}
  np.savez(out, **local_params)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
