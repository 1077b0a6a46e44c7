"""Where an 8-bit RMSProp step spends its time on XLA:CPU: one loop at a time.

XLA:CPU has no multi-output fusion, so the jitted 8-bit step is three loops
per quantized leaf, and optax's float32 step two. This script times each loop
on its own, on the quantized leaves of the bench's big tree (16.2M
parameters), against optax's two, alternating in one process:

* ``optax: nu``: ``nu = decay * nu + (1 - decay) * g**2`` (12 B/param);
* ``optax: params``: ``p - lr * g * rsqrt(nu + eps)`` (16 B/param);
* ``8-bit: block max``: the bound on each block's new scale,
  ``decay * scale + (1 - decay) * block_absmax(g**2)`` (reads g: 4 B/param);
* ``8-bit: ema_update``: ``quantize.ema_update`` with random bits: the
  block max above, then the codes' update in place (codes and g in, codes
  out: 6 B/param), two loops;
* ``8-bit: params``: ``p - lr * g * rsqrt(max(dequantize(q), (1 - decay) g**2)
  + eps)`` (codes, g, p in, p out: 13 B/param);
* ``bytes only``: a loop with the codes loop's traffic and no arithmetic
  (a byte and a float in, a byte out): the floor of the middle loop.

The loops are those of the core of 2026-11-26, whose step divided by the stored codes floored
by ``(1 - decay) g**2``; the current step divides by the exact new ``nu`` (the stored codes
decoded and updated in float32), so this script measures that earlier core's passes
(``benchmarks/README.md``, "Earlier cores").

Run: ``python benchmarks/passes_8bit.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rmsprop_jax import quantize as qz
from rmsprop_jax.bench import _tree, conv_net_shapes

DECAY, LR, EPS = 0.9, 1e-3, 1e-8


def main(rounds: int = 7, samples: int = 8) -> dict[str, float]:
  shapes = [s for s in conv_net_shapes() if np.prod(s) >= qz.MIN_QUANTIZE_SIZE]
  params = list(_tree(shapes).values())
  grads = list(_tree(shapes, seed=1).values())
  q0 = [qz.quantize(jnp.abs(g) * 1e-3, signed=False) for g in grads]
  nu0 = [jnp.abs(g) for g in grads]
  count = jnp.int32(5)

  def optax_nu(nu, gs):
    return [DECAY * v + (1 - DECAY) * g * g for v, g in zip(nu, gs)]

  def optax_params(nu, gs, ps):
    return [p - LR * g * lax.rsqrt(v + EPS) for v, g, p in zip(nu, gs, ps)]

  def block_max(scales, gs):
    return [DECAY * s + (1 - DECAY) * qz.block_absmax(g * g) for s, g in zip(scales, gs)]

  def codes(cs, scales, gs, count):
    out = []
    for i, (c, s, g) in enumerate(zip(cs, scales, gs)):
      bits = qz.random_bits(0, count, i, g.shape)
      out.append(qz.ema_update(qz.QuantizedArray(c, s), g * g, DECAY, bits=bits).codes)
    return out

  def params_8bit(cs, scales, gs, ps):
    out = []
    for c, s, g, p in zip(cs, scales, gs, ps):
      stored, floor = qz.dequantize(qz.QuantizedArray(c, s)), (1 - DECAY) * g * g
      nu = lax.select(lax.gt(floor, stored), floor, stored)
      out.append(p - LR * g * lax.rsqrt(nu + EPS))
    return out

  def bytes_only(cs, gs):
    return [c + (g > 0).astype(jnp.uint8) for c, g in zip(cs, gs)]

  scales = [q.scale for q in q0]
  state = {
    "nu": [jnp.copy(v) for v in nu0],
    "p": [jnp.copy(p) for p in params],
    "p8": [jnp.copy(p) for p in params],
    "s": [jnp.copy(s) for s in scales],
    "c": [q.codes for q in q0],
    "c2": [jnp.copy(q.codes) for q in q0],
  }
  jits = {
    "optax: nu": (jax.jit(optax_nu, donate_argnums=0), lambda: (state["nu"], grads), "nu"),
    "optax: params": (jax.jit(optax_params, donate_argnums=2), lambda: (nu0, grads, state["p"]), "p"),
    "8-bit: block max": (jax.jit(block_max, donate_argnums=0), lambda: (state["s"], grads), "s"),
    "8-bit: ema_update": (jax.jit(codes, donate_argnums=0), lambda: (state["c"], scales, grads, count), "c"),
    "8-bit: params": (
      jax.jit(params_8bit, donate_argnums=3),
      lambda: (state["c2"], scales, grads, state["p8"]),
      "p8",
    ),
    "bytes only": (jax.jit(bytes_only, donate_argnums=0), lambda: (state["c2"], grads), "c2"),
  }

  def run(name):
    fn, args, key = jits[name]
    state[key] = fn(*args())
    return state[key]

  for name in jits:
    jax.block_until_ready(run(name))
  times: dict[str, list[float]] = {name: [] for name in jits}
  for r in range(rounds):
    for name in jits if r % 2 == 0 else list(jits)[::-1]:
      ts = []
      for _ in range(samples):
        t0 = time.perf_counter()
        jax.block_until_ready(run(name))
        ts.append(time.perf_counter() - t0)
      times[name].append(statistics.median(ts))
  med = {name: statistics.median(ts) for name, ts in times.items()}
  step = med["optax: nu"] + med["optax: params"]
  print(f"{'loop':<18}{'ms':>8}{'/ optax step':>14}")
  for name, t in med.items():
    print(f"{name:<18}{t * 1e3:>8.2f}{t / step:>14.2f}")
  eight = med["8-bit: ema_update"] + med["8-bit: params"]
  floor = med["8-bit: block max"] + med["bytes only"] + med["8-bit: params"]
  print(
    f"\n8-bit step (ema_update + params) / optax step: {eight / step:.2f};"
    f" the codes loop alone: {(med['8-bit: ema_update'] - med['8-bit: block max']) / step:.2f};"
    f" with a codes loop of no arithmetic: {floor / step:.2f}"
  )
  return med


if __name__ == "__main__":
  main()
