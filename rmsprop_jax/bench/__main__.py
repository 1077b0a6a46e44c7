"""A bench worker: ``python -m rmsprop_jax.bench CASE IMPL [IMPL ...] [--quick]``, or ``--bandwidth``."""

import sys

from rmsprop_jax.bench.measure import cli

if __name__ == "__main__":
  cli(sys.argv[1:])
