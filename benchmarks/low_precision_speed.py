"""Step time of each state storage against optax.rmsprop, alternating in one process.

`python -m rmsprop_jax bench` pairs one of our storages with optax per case.
This script puts all of them side by side: one process, the same big tree
(16.2M parameters), every implementation compiled once, then several rounds
that time each in turn (median of 15 donated, jitted steps per round), so that
all see the same machine state. Reports each storage's median time over
optax's, per round.

Run: ``python benchmarks/low_precision_speed.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import optax

import rmsprop_jax
from rmsprop_jax.bench import _tree, conv_net_shapes

IMPLS = {
  "optax.rmsprop": lambda: optax.rmsprop(1e-3),
  "ours, float32": lambda: rmsprop_jax.rmsprop(1e-3),
  "ours, bfloat16 nu (stochastic)": lambda: rmsprop_jax.rmsprop(1e-3, nu_dtype=jnp.bfloat16),
  "ours, bfloat16 nu (nearest)": lambda: rmsprop_jax.rmsprop(1e-3, nu_dtype=jnp.bfloat16, rounding="nearest"),
  "ours, 8-bit state": lambda: rmsprop_jax.rmsprop(1e-3, state_bits=8),
}


def main(rounds: int = 3, steps: int = 15) -> dict[str, list[float]]:
  params0 = _tree(conv_net_shapes())
  grads = _tree(conv_net_shapes(), seed=1)
  runners = {}
  for name, make in IMPLS.items():
    opt = make()

    def step(p, s, g, opt=opt):
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s

    fn = jax.jit(step, donate_argnums=(0, 1))
    carry = [jax.tree.map(jnp.copy, params0), opt.init(params0)]
    carry[:] = fn(*carry, grads)
    jax.block_until_ready(carry)
    runners[name] = (fn, carry)
  ratios: dict[str, list[float]] = {name: [] for name in IMPLS}
  for _ in range(rounds):
    med = {}
    for name, (fn, carry) in runners.items():
      ts = []
      for _ in range(steps):
        t0 = time.perf_counter()
        carry[:] = fn(*carry, grads)
        jax.block_until_ready(carry)
        ts.append(time.perf_counter() - t0)
      med[name] = statistics.median(ts)
    for name in IMPLS:
      ratios[name].append(med[name] / med["optax.rmsprop"])
  print(f"{'storage':34s}" + "".join(f"{'round ' + str(i + 1):>10s}" for i in range(rounds)))
  for name, rs in ratios.items():
    print(f"{name:34s}" + "".join(f"{r:>10.3f}" for r in rs))
  return ratios


if __name__ == "__main__":
  main()
