"""Where a jitted step's compile time goes: XLA:CPU's HLO passes, timed one by one.

Each configuration is compiled in a fresh process (a donated step on N leaves
of 256x1024, from abstract shapes) with XLA's pass pipeline logging on
(``TF_CPP_VMODULE=hlo_pass_pipeline=1``): every HLO pass logs its time, and
the HLO verifier (run between passes as an invariant checker) is timed from
the log's timestamps. Printed per configuration: trace + lower, the compile
call, the sum of the HLO passes (the rest of the compile is the backend: LLVM
and the runtime's thunks), the temporaries per param, and the passes that take
the most time.

Run: ``python benchmarks/compile_passes.py [--leaves 100 200] [--top 6]``
(about 1.5 min on 2 cores). Results: benchmarks/README.md, "Where the compile
goes, pass by pass".
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

CONFIGS = {
  "optax": "optax.rmsprop(1e-3)",
  "optax c+m": "optax.rmsprop(1e-3, centered=True, momentum=0.9)",
  "float32": "rmsprop_jax.rmsprop(1e-3)",
  "bfloat16 nu": "rmsprop_jax.rmsprop(1e-3, nu_dtype=jnp.bfloat16)",
  "bfloat16 nu, nearest": "rmsprop_jax.rmsprop(1e-3, nu_dtype=jnp.bfloat16, rounding='nearest')",
  "8-bit": "rmsprop_jax.rmsprop(1e-3, state_bits=8)",
  "8-bit c+m": "rmsprop_jax.rmsprop(1e-3, state_bits=8, centered=True, momentum=0.9)",
}

WORKER = """
import json, sys, time
import jax, jax.numpy as jnp, optax
import rmsprop_jax
n, expr = int(sys.argv[1]), sys.argv[2]
params = {f"p{i:03d}": jax.ShapeDtypeStruct((256, 1024), jnp.float32) for i in range(n)}
opt = eval(expr)
state = jax.eval_shape(opt.init, params)
def step(g, p, s):
  u, s = opt.update(g, s, p)
  return optax.apply_updates(p, u), s
t0 = time.perf_counter()
lowered = jax.jit(step, donate_argnums=(1, 2)).lower(params, params, state)
t1 = time.perf_counter()
compiled = lowered.compile()
t2 = time.perf_counter()
temp = compiled.memory_analysis().temp_size_in_bytes / (n * 256 * 1024)
print("RESULT " + json.dumps({"lower_s": t1 - t0, "compile_s": t2 - t1, "temp_b_per_param": temp}))
"""

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_PASS = re.compile(r"HLO pass: (\S+) time: ([\d.]+) (us|ms|s) ")
_STAMP = re.compile(r"^I\d+ (\d+):(\d+):([\d.]+)")


def _stamp(line: str) -> float:
  m = _STAMP.match(line)
  return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3)) if m else float("nan")


def pass_times(log: str) -> collections.Counter:
  """Milliseconds per HLO pass (summed over its runs) and ``<verifier>``."""
  times: collections.Counter = collections.Counter()
  start = None
  for line in log.splitlines():
    m = _PASS.search(line)
    if m:
      times[m.group(1)] += float(m.group(2)) * _UNIT[m.group(3)]
    elif "Invariant checker hlo-verifier" in line:
      start = _stamp(line)
    elif "Invariant checker done" in line and start is not None:
      times["<verifier>"] += (_stamp(line) - start) * 1e3
      start = None
  return times


def run(name: str, leaves: int) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="hlo_pass_pipeline=1")
  proc = subprocess.run(
    [sys.executable, "-c", WORKER, str(leaves), CONFIGS[name]],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  )
  (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  out = json.loads(line[len("RESULT ") :])
  out["passes_ms"] = dict(pass_times(proc.stderr))
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--leaves", type=int, nargs="*", default=[100, 200])
  ap.add_argument("--top", type=int, default=6)
  ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
  args = ap.parse_args()
  for leaves in args.leaves:
    print(f"\n{leaves} leaves of 256x1024")
    print("config | lower s | compile s | HLO passes s | temp B/param | top passes (ms)")
    for name in args.configs:
      t = time.perf_counter()
      r = run(name, leaves)
      top = collections.Counter(r["passes_ms"]).most_common(args.top)
      print(
        f"{name} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | {sum(r['passes_ms'].values()) / 1e3:.2f}"
        f" | {r['temp_b_per_param']:.2f} | " + ", ".join(f"{k} {v:.0f}" for k, v in top),
        f"({time.perf_counter() - t:.0f} s)",
        flush=True,
      )


if __name__ == "__main__":
  main()
