"""The CPU lowering (per-output recompute) against the portable step, on XLA:CPU.

For each storage and option: the temporaries of the jitted, donated train step
(``memory_analysis``), the bytes XLA says it accesses, the optimized HLO
instructions per leaf, and the step time of the CPU lowering over the
portable one's (paired in one process, median of rounds). The recompute is
kept where it pays in bytes or time (benchmarks/README.md, "Lowerings").

  python benchmarks/lowerings.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import rmsprop_jax
from rmsprop_jax import cpu_recompute, xla_stats

STORAGES = {"float32": {}, "bfloat16": {"nu_dtype": jnp.bfloat16}, "8-bit": {"state_bits": 8}}
OPTIONS = {
  "plain": {},
  "momentum": {"momentum": 0.9},
  "nesterov": {"momentum": 0.9, "nesterov": True},
  "centered+momentum": {"centered": True, "momentum": 0.9},
  "coupled wd": {"weight_decay": 1e-2},
}


def _instructions(compiled: jax.stages.Compiled) -> int:
  text = compiled.as_text() or ""
  return sum(1 for line in text.splitlines() if " = " in line and not line.lstrip().startswith("//"))


def measure(kw: dict, leaves: int, shape: tuple[int, int], rounds: int) -> dict:
  params = {f"w{i}": jax.ShapeDtypeStruct(shape, jnp.float32) for i in range(leaves)}
  n = leaves * int(np.prod(shape))
  cpu = rmsprop_jax.rmsprop(1e-3, **kw)
  with cpu_recompute.portable_on_cpu():
    portable = rmsprop_jax.rmsprop(1e-3, **kw)
  out, runs = {}, {}
  for name, opt in (("cpu", cpu), ("portable", portable)):
    compiled = xla_stats.compile_donated_step(opt, params)
    half = xla_stats.compile_donated_step(opt, dict(list(params.items())[: leaves // 2]))
    out[name] = {
      "temp_B_per_param": compiled.memory_analysis().temp_size_in_bytes / n,
      "xla_B_per_param": (xla_stats.xla_bytes_accessed(compiled) or 0) / n,
      "hlo_per_leaf": (_instructions(compiled) - _instructions(half)) / (leaves - leaves // 2),
    }
    rng = np.random.default_rng(0)
    p = {k: jnp.asarray(rng.normal(size=shape), jnp.float32) for k in params}
    runs[name] = [compiled, p, opt.init(p), {k: v * 1e-2 for k, v in p.items()}]
  ratios = []
  for r in range(rounds):
    times = {}
    for name in ("cpu", "portable") if r % 2 == 0 else ("portable", "cpu"):
      compiled, p, s, g = runs[name]
      p, s = compiled(p, s, g)  # warm, and keeps the donated buffers alive
      jax.block_until_ready(p)
      t0 = time.perf_counter()
      for _ in range(3):
        p, s = compiled(p, s, g)
      jax.block_until_ready((p, s))
      times[name] = time.perf_counter() - t0
      runs[name][1:3] = [p, s]
    ratios.append(times["cpu"] / times["portable"])
  out["time_cpu_over_portable"] = statistics.median(ratios)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  leaves, shape, rounds = (4, (64, 256), 2) if args.quick else (16, (1024, 1024), 9)
  results = {}
  print(f"{leaves} leaves of {shape[0]}x{shape[1]}; cpu = per-output recompute, portable = each value once")
  print(
    f"{'storage':9} {'option':18} {'temp B/p cpu/port':>18} {'XLA B/p cpu/port':>17}"
    f" {'HLO/leaf':>11} {'time':>6}"
  )
  for sname, s in STORAGES.items():
    for oname, o in OPTIONS.items():
      if sname == "float32" and oname in ("plain", "momentum", "centered+momentum"):
        continue  # nothing to recompute: one lowering
      r = measure({**s, **o}, leaves, shape, rounds)
      results[f"{sname}/{oname}"] = r
      c, p = r["cpu"], r["portable"]
      print(
        f"{sname:9} {oname:18} {c['temp_B_per_param']:8.2f} / {p['temp_B_per_param']:5.2f}"
        f" {c['xla_B_per_param']:7.1f} / {p['xla_B_per_param']:5.1f}"
        f" {c['hlo_per_leaf']:4.0f}/{p['hlo_per_leaf']:4.0f} {r['time_cpu_over_portable']:6.2f}"
      )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"leaves": leaves, "shape": shape, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
