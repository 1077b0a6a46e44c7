"""Where a jitted, donated step spends its time on XLA:CPU: each compiled loop, measured.

Runs the bench's step (``optax.apply_updates`` after ``opt.update``, params and state
donated) on same-shaped leaves under ``jax.profiler.trace`` with XLA:CPU's per-thunk trace
events on (``--xla_cpu_enable_xprof_traceme=true``), then sums the events by loop (the fusion's
name without its numeric suffix) for ours and for ``optax.rmsprop`` with the same options.
Unlike ``passes_8bit.py``, which rebuilds the loops by hand, this measures the loops the
current core compiles to.

The times are summed over leaves: XLA runs the loops of different leaves concurrently on the
cores, so the total exceeds the step's wall time. Names are XLA's (``negate_select_fusion``
is the loop whose root is a select of a negation, e.g. a signed 8-bit encode); the HLO of the
compiled step (``--hlo``) says what each one computes.

Run: ``python benchmarks/profile_step.py --impl ours_8bit --options momentum`` (seconds).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import bench


def loop_times(impl: str, options: str, leaves: int, shape: tuple[int, ...], steps: int, hlo: bool = False):
  """{loop name: (ms per step summed over leaves, loops per step)} of one jitted step."""
  opt = bench._make_opt(impl, options)
  rng = np.random.default_rng(0)
  params = {f"p{i:03d}": jnp.asarray(rng.standard_normal(shape, np.float32)) for i in range(leaves)}
  grads = {k: jnp.asarray(0.01 * rng.standard_normal(shape, np.float32)) for k in params}

  def step(p, s, g):
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt.init(params), grads).compile()
  if hlo:
    print(compiled.as_text())
  state = opt.init(params)
  for _ in range(3):  # warm up: first-touch of the buffers, thread pools
    params, state = compiled(params, state, grads)
  jax.block_until_ready(params)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        params, state = compiled(params, state, grads)
      jax.block_until_ready(params)
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total: dict[str, float] = collections.defaultdict(float)
  count: collections.Counter[str] = collections.Counter()
  for e in events:
    name = e.get("name", "")
    is_loop = name.endswith("fusion") or "fusion." in name or name.startswith("copy")
    if e.get("ph") != "X" or not is_loop or name.startswith("end: "):  # "end: x": x's completion
      continue
    loop = re.sub(r"\.\d+$", "", name)
    total[loop] += e["dur"] / 1e3 / steps  # microseconds -> ms per step
    count[loop] += 1
  return {k: (total[k], count[k] // steps) for k in sorted(total, key=lambda k: -total[k])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impl", default="ours_8bit", choices=bench.STORAGE_IMPLS[1:])
  parser.add_argument("--options", default="momentum", choices=sorted(bench.OPTIONS))
  parser.add_argument("--leaves", type=int, default=60)
  parser.add_argument("--shape", default="256x1024", help="each leaf's shape, e.g. 256x1024")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--hlo", action="store_true", help="also print our compiled step's HLO")
  args = parser.parse_args()
  shape = tuple(int(d) for d in args.shape.split("x"))
  print(f"{args.leaves} leaves of {args.shape}, options {args.options!r}, {args.steps} profiled steps")
  for impl in ("optax", args.impl):
    loops = loop_times(impl, args.options, args.leaves, shape, args.steps, hlo=args.hlo and impl != "optax")
    print(f"\n{impl}: {sum(ms for ms, _ in loops.values()):.1f} ms per step in its loops")
    for name, (ms, n) in loops.items():
      print(f"  {ms:8.2f} ms  {n:4d} per step  {name}")


if __name__ == "__main__":
  main()
