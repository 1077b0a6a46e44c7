"""Compile time of a 600-leaf training step, ours against optax.rmsprop, in one process.

The bench's ``compile_600`` case compiles once per fresh process, and those
processes differ by 10-20% among themselves on a small VM. Here both are
compiled eight times each, alternating (a fresh step function every time, so
no jit cache is reused; ours does reuse its traced update, as a program that
builds several steps does), and the medians are compared; the first, cold
compile of each is printed too.

Run: ``python benchmarks/compile_in_process.py`` (about 30 s on 2 cores).
"""

import statistics
import time

import jax
import jax.numpy as jnp
import optax

import rmsprop_jax

PARAMS = {f"p{i:03d}": jnp.zeros(1000) for i in range(600)}
MAKERS = {"optax": lambda: optax.rmsprop(1e-3), "ours": lambda: rmsprop_jax.rmsprop(1e-3)}


def compile_once(make) -> float:
  opt = make()
  state = opt.init(PARAMS)

  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  t0 = time.perf_counter()
  jax.jit(step).lower(PARAMS, state, PARAMS).compile()
  return time.perf_counter() - t0


def main(rounds: int = 8) -> dict[str, list[float]]:
  times: dict[str, list[float]] = {name: [] for name in MAKERS}
  for r in range(rounds):
    order = list(MAKERS) if r % 2 == 0 else list(MAKERS)[::-1]
    for name in order:
      times[name].append(compile_once(MAKERS[name]))
  med = {name: statistics.median(ts) for name, ts in times.items()}
  ratio = med["ours"] / med["optax"]
  print(f"median compile: ours {med['ours']:.3f} s, optax {med['optax']:.3f} s, ratio {ratio:.3f}")
  print(f"first (cold) compile: ours {times['ours'][0]:.3f} s, optax {times['optax'][0]:.3f} s")
  return times


if __name__ == "__main__":
  main()
