"""Run the model-scale cases of the bench (issue 20) and keep their results.

    python benchmarks/run_scale.py --out benchmarks/results_cpu_2core_2026-12-03.json
    python benchmarks/run_scale.py --groups peak --repeats 1 --out /tmp/peak.json

Each group (init, compile, peak, step_8bit) is one ``python -m rmsprop_jax bench``
run, whose workers are fresh processes, one per implementation and repeat
(paired optax / ours for step_8bit); the rows and raw runs of all groups are
written to one JSON file, and each group's table is printed as it finishes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rmsprop_jax import bench

GROUPS = {
  "init": bench.CASE_GROUPS["init"],
  "compile": tuple(c for c in bench.CASE_GROUPS["compile"] if c in bench.SCALE_CASES),
  "peak": bench.CASE_GROUPS["peak"],
  "step_8bit": bench.CASE_GROUPS["step_8bit"],
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--groups", nargs="*", default=list(GROUPS), choices=list(GROUPS))
  parser.add_argument("--repeats", type=int, default=3, help="processes per implementation (peak: always 1)")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  merged: dict = {"rows": [], "raw": {"cases": {}, "bandwidth_Bps": None}, "groups": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for group in args.groups:
      part = Path(tmp) / f"{group}.json"
      cmd = [
        sys.executable,
        "-m",
        "rmsprop_jax",
        "bench",
        "--repeats",
        str(args.repeats),
        "--json",
        str(part),
      ]
      cmd += ["--quick"] if args.quick else []
      subprocess.run(cmd + ["--cases", *GROUPS[group]], check=True)
      result = json.loads(part.read_text())
      merged["rows"] += result["rows"]
      merged["raw"]["cases"] |= result["raw"]["cases"]
      merged["raw"]["bandwidth_Bps"] = result["raw"]["bandwidth_Bps"]
      merged["groups"][group] = list(GROUPS[group])
      Path(args.out).write_text(json.dumps(merged, indent=1))  # after each group: a partial run is kept
  print()
  print(bench.format_table(merged["rows"], merged["raw"]))
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
