"""Formulations measured against the narrow storages' compile time and copy.

1. ``stacked``: the state of same-shaped leaves kept stacked, the gradients
   and params stacked inside each step and the updates sliced back. Prints
   trace + compile time and the step's temporaries per param, beside optax.
2. ``copy``: a bfloat16-``nu`` RMSProp step written by hand, with and without
   the loop that writes ``nu`` reading one element of the new params (a data
   dependency that lets XLA overwrite ``nu`` in place). Prints temporaries and
   XLA's bytes per param, and the median step time beside float32.
3. ``copy_train``: the same two steps inside whole MLP train steps (the
   gradients computed in the same program), compiled from abstract shapes:
   temporaries and peak bytes per param of the optimizer step alone and of
   the train step, for several MLP sizes.

Run: ``python benchmarks/formulations.py [stacked] [copy] [copy_train]``
(about 1.5 min on 2 cores). Results: benchmarks/README.md, "Formulations
tried".
"""

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from jax import lax

import rmsprop_jax

SHAPE = (256, 1024)
STORAGES = {
  "float32": {},
  "bfloat16 nu": {"nu_dtype": jnp.bfloat16},
  "8-bit": {"state_bits": 8},
  "8-bit centered+momentum": {"state_bits": 8, "centered": True, "momentum": 0.9},
}


def stacked(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` on the leaves stacked into one array (all leaves of one shape)."""

  def init(params):
    return inner.init(jnp.stack(jax.tree.leaves(params)))

  def update(grads, state, params=None):
    leaves, treedef = jax.tree.flatten(grads)
    p = None if params is None else jnp.stack(jax.tree.leaves(params))
    u, state = inner.update(jnp.stack(leaves), state, p)
    return jax.tree.unflatten(treedef, list(u)), state

  return optax.GradientTransformation(init, update)


def compiled_step(opt: optax.GradientTransformation, params):
  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  return (
    jax.jit(step, donate_argnums=(0, 1)).lower(params, jax.eval_shape(opt.init, params), params).compile()
  )


def run_stacked(leaves: int = 200) -> None:
  params = {f"w{i:03d}": jax.ShapeDtypeStruct(SHAPE, jnp.float32) for i in range(leaves)}
  n = leaves * SHAPE[0] * SHAPE[1]
  makers = {"optax": lambda: optax.rmsprop(1e-3)}
  makers |= {
    f"ours {k}, stacked in the step": (lambda kw=kw: stacked(rmsprop_jax.rmsprop(1e-3, **kw)))
    for k, kw in STORAGES.items()
  }
  for name, make in makers.items():
    t0 = time.perf_counter()
    c = compiled_step(make(), params)
    t = time.perf_counter() - t0
    temp = c.memory_analysis().temp_size_in_bytes / n
    print(f"{name:<48} trace + compile {t:5.2f} s  temporaries {temp:5.2f} B/param")


def _new_nu(nu, g):
  return 0.9 * nu.astype(jnp.float32) + 0.1 * g * g


def _zero_from(x):
  """int32 0 read from ``x[0, 0]`` (a dependency on ``x`` that XLA cannot fold)."""
  bits = lax.bitcast_convert_type(x[0, 0], jnp.int32)
  return lax.min(lax.shift_right_logical(bits, 1), 0)


def _leaf(p, nu, g, narrow: bool, ordered: bool):
  new_p = p - 1e-3 * g * lax.rsqrt(_new_nu(nu, g) + 1e-8)
  if not narrow:
    return new_p, _new_nu(nu, g)
  nu_b, g_b = lax.optimization_barrier((nu, g))  # the nu loop recomputes, as the package does
  new_nu = _new_nu(nu_b, g_b)
  if ordered:
    new_nu = new_nu * (1 + _zero_from(new_p)).astype(jnp.float32)
  return new_p, new_nu.astype(jnp.bfloat16)


def run_copy(leaves: int = 60, repeats: int = 5, steps: int = 10) -> None:
  variants = {
    "float32 nu": (False, False),
    "bfloat16 nu": (True, False),
    "bfloat16 nu, ordered": (True, True),
  }
  grads = [jax.random.normal(k, SHAPE) for k in jax.random.split(jax.random.key(0), leaves)]
  n = leaves * SHAPE[0] * SHAPE[1]
  times: dict[str, list[float]] = {v: [] for v in variants}
  for _ in range(repeats):
    for name, (narrow, ordered) in variants.items():

      def step(ps, nus, gs, narrow=narrow, ordered=ordered):
        out = [_leaf(p, nu, g, narrow, ordered) for p, nu, g in zip(ps, nus, gs)]
        return [o[0] for o in out], [o[1] for o in out]

      dtype = jnp.bfloat16 if narrow else jnp.float32
      ps, nus = [jnp.ones(SHAPE) for _ in grads], [jnp.ones(SHAPE, dtype) for _ in grads]
      fn = jax.jit(step, donate_argnums=(0, 1))
      if not times[name]:
        c = fn.lower(ps, nus, grads).compile()
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        temp = c.memory_analysis().temp_size_in_bytes / n
        print(
          f"{name:<22} temporaries {temp:4.2f} B/param  XLA bytes {cost['bytes accessed'] / n:5.2f} B/param"
        )
      ps, nus = jax.block_until_ready(fn(ps, nus, grads))
      ts = []
      for _ in range(steps):
        t0 = time.perf_counter()
        ps, nus = jax.block_until_ready(fn(ps, nus, grads))
        ts.append(time.perf_counter() - t0)
      times[name].append(statistics.median(ts))
  for name, ts in times.items():
    print(f"{name:<22} step {1e3 * statistics.median(ts):6.2f} ms (median of {repeats} rounds)")


def _peak(compiled) -> int:
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def run_copy_train(
  sizes=((6, 2048, 32), (6, 2048, 256), (12, 1024, 64), (4, 4096, 16), (24, 512, 128)),
) -> None:
  variants = {
    "float32 nu": (False, False),
    "bfloat16 nu": (True, False),
    "bfloat16 nu, ordered": (True, True),
  }
  for layers, width, batch in sizes:
    shapes = [s for _ in range(layers) for s in ((width, width), (1, width))]
    n = sum(a * b for a, b in shapes)
    ps = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    xy = jax.ShapeDtypeStruct((batch, width), jnp.float32)

    def loss(ps, x, y):
      h = x
      for i in range(0, len(ps), 2):
        h = h @ ps[i] + ps[i + 1]
        if i + 2 < len(ps):
          h = jax.nn.relu(h)
      return jnp.mean((h - y) ** 2)

    print(f"MLP {layers} layers of {width}x{width}, batch {batch} (B/param)")
    for name, (narrow, ordered) in variants.items():

      def opt_step(ps, nus, gs, narrow=narrow, ordered=ordered):
        out = [_leaf(p, nu, g, narrow, ordered) for p, nu, g in zip(ps, nus, gs)]
        return [o[0] for o in out], [o[1] for o in out]

      def train_step(ps, nus, x, y, opt_step=opt_step):
        return opt_step(ps, nus, jax.grad(loss)(ps, x, y))

      nus = [jax.ShapeDtypeStruct(s, jnp.bfloat16 if narrow else jnp.float32) for s in shapes]
      step = jax.jit(opt_step, donate_argnums=(0, 1)).lower(ps, nus, ps).compile()
      train = jax.jit(train_step, donate_argnums=(0, 1)).lower(ps, nus, xy, xy).compile()
      print(
        f"  {name:<22} optimizer step: temporaries {step.memory_analysis().temp_size_in_bytes / n:4.2f},"
        f" peak {_peak(step) / n:5.2f}   train step: temporaries"
        f" {train.memory_analysis().temp_size_in_bytes / n:4.2f}, peak {_peak(train) / n:5.2f}"
      )


if __name__ == "__main__":
  which = sys.argv[1:] or ["stacked", "copy", "copy_train"]
  if "stacked" in which:
    run_stacked()
  if "copy" in which:
    run_copy()
  if "copy_train" in which:
    run_copy_train()
