"""Command line: ``python -m rmsprop_jax demo`` and ``python -m rmsprop_jax bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m rmsprop_jax",
    description="RMSProp for JAX/Optax: the demo and the benchmarks.",
  )
  sub = parser.add_subparsers(dest="command", required=True)

  demo = sub.add_parser(
    "demo",
    help="train an MLP on the digits data set with RMSProp and its rivals",
    description=(
      "Train a small MLP (plain JAX) on scikit-learn's bundled digits data with"
      " rmsprop (its state in float32, bfloat16 and 8 bits), centered rmsprop with"
      " momentum, the PyTorch preset, SGD, SGD with"
      " momentum, AdaGrad and Adam, from identical initial weights and batches."
      " Prints a table, writes OUT/results.json and OUT/loss_curves.png."
    ),
  )
  demo.add_argument(
    "--out",
    default="rmsprop_demo_out",
    help="folder for results.json and loss_curves.png (default: %(default)s)",
  )
  demo.add_argument(
    "--steps",
    type=int,
    default=1500,
    help="training steps per optimizer, batch size 64 (default: %(default)s)",
  )
  demo.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed for the data split, initial weights and batch order (default: %(default)s)",
  )
  demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

  bench = sub.add_parser(
    "bench",
    help="time rmsprop_jax against optax.rmsprop (and torch) on this machine",
    description=(
      "Benchmark cases in fresh, alternating processes, optax and ours timed in"
      " turn inside each; prints the median of the paired ours/optax ratios (and"
      " ours/torch), compile times, state bytes and the share of measured memory"
      " bandwidth. Without --cases: the step-time set (big_tree, big_tree_bf16,"
      " big_tree_8bit, many_leaves_scan, eager_update), a few minutes on two cores;"
      " the model-scale cases (init, compile, peak, step_8bit, train_step) and scale_out take"
      " longer and are named with --cases."
    ),
  )
  bench.add_argument(
    "--repeats",
    type=int,
    default=None,
    help="processes per case (torch: its own) (default: 5; 1 for the train_step cases)",
  )
  bench.add_argument(
    "--quick", action="store_true", help="tiny sizes and 1 repeat (a smoke run, numbers meaningless)"
  )
  bench.add_argument(
    "--cases",
    nargs="*",
    default=None,
    help=(
      "cases to run, or groups of them: init, compile, peak, step_8bit, train_step, all; fidelity"
      " (in this process: 8-bit and bfloat16 state, ours and bitsandbytes', against float32)"
      " (default: the step-time set)"
    ),
  )
  bench.add_argument("--json", default=None, help="also write the results to this JSON file")

  args = parser.parse_args(argv)
  if args.command == "demo":
    from rmsprop_jax import demo as demo_mod

    demo_mod.run(out=args.out, steps=args.steps, seed=args.seed, progress=not args.no_progress)
  else:
    from rmsprop_jax import bench as bench_mod

    bench_mod.main(repeats=args.repeats, quick=args.quick, cases=args.cases, json_path=args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
