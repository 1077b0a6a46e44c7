"""Run the benchmark suite and keep its results next to this script.

    python benchmarks/run_bench.py                 # all cases, 5 processes each
    python benchmarks/run_bench.py --quick         # smoke run, tiny sizes
    python benchmarks/run_bench.py --cases big_tree eager_update --repeats 9

Equivalent to ``python -m rmsprop_jax bench --json benchmarks/results_<device>.json``
(``results_cpu_<cores>core.json``, ``results_gpu_<device kind>.json``);
the cases and the method are in ``rmsprop_jax/bench.py``.
"""

import argparse
import os
import re
from pathlib import Path

import jax

from rmsprop_jax import bench

if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--cases", nargs="*", default=None)
  args = parser.parse_args()
  device = jax.devices()[0]
  if device.platform == "cpu":
    tag = f"cpu_{os.cpu_count()}core"
  else:  # e.g. results_gpu_nvidia_h100_80gb_hbm3.json
    tag = f"{device.platform}_" + re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_")
  tag += "_quick" if args.quick else ""
  out = Path(__file__).with_name(f"results_{tag}.json")
  bench.main(repeats=args.repeats, quick=args.quick, cases=args.cases, json_path=str(out))
  print(f"\nwrote {out}")
