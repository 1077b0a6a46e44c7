"""Benchmarks: ours against ``optax.rmsprop`` (and torch's RMSprop) on this machine.

``python -m rmsprop_jax bench`` runs ``DEFAULT_CASES`` (the step-time cases the
README quotes); ``--cases`` names others or groups of them (``init``,
``compile``, ``peak``, ``step_8bit``, ``train_step``, ``all``). Each case runs in several fresh
processes. Whole processes of the same program differ widely on a shared
machine, so the ratio against optax is paired: each process builds
optax and ours, then times them in turn, round after round, reversing the order
every other round and from one process to the next; a process's ratio is the
median of its rounds' ratios, and the reported ratio the median of the
processes' ratios, with their spread. First compiles, first inits and
``scale_out`` (8 host devices) run one implementation per process; torch always
runs in processes of its own. Also reported: each implementation's median time
over processes and its spread, compile times, state bytes, XLA's bytes per
parameter and the share of the streaming bandwidth measured in the same run.

The modules: :mod:`~rmsprop_jax.bench.cases` (case names, trees, optimizers),
:mod:`~rmsprop_jax.bench.measure` (timing, the worker processes, ``collect``),
:mod:`~rmsprop_jax.bench.report` (``summarize``, ``format_table``). A case that
runs in the driver's process and prints its own table is added with
:func:`register_in_process`.
"""

from __future__ import annotations

import json
from typing import Any

from rmsprop_jax import fidelity as _fidelity
from rmsprop_jax.bench.cases import (
  CASE_GROUPS,
  CASE_REPEATS,
  CASES,
  DEFAULT_CASES,
  DETERMINISTIC,
  HOST_DEVICES,
  IN_PROCESS,
  OPTIONS,
  SCALE_CASES,
  STEP_8BIT_CASES,
  STORAGE_IMPLS,
  TRAIN_STEP_CASES,
  UNPAIRED,
  InProcessCase,
  case_options,
  case_shapes,
  conv_net_shapes,
  expand_cases,
  gpt_config,
  make_opt,
  make_tree,
  mlp_shapes,
  register_in_process,
  transformer_shapes,
)
from rmsprop_jax.bench.measure import (
  collect,
  measure_bandwidth,
  median_time,
  run_case,
  run_paired,
  scale_out_table,
  state_bytes_per_device,
)
from rmsprop_jax.bench.report import format_table, paired_ratio, summarize
from rmsprop_jax.xla_stats import xla_bytes_accessed

__all__ = [
  "CASES",
  "CASE_GROUPS",
  "CASE_REPEATS",
  "DEFAULT_CASES",
  "DETERMINISTIC",
  "HOST_DEVICES",
  "IN_PROCESS",
  "OPTIONS",
  "SCALE_CASES",
  "STEP_8BIT_CASES",
  "STORAGE_IMPLS",
  "TRAIN_STEP_CASES",
  "UNPAIRED",
  "InProcessCase",
  "case_options",
  "case_shapes",
  "collect",
  "conv_net_shapes",
  "expand_cases",
  "format_table",
  "gpt_config",
  "main",
  "make_opt",
  "make_tree",
  "measure_bandwidth",
  "median_time",
  "mlp_shapes",
  "paired_ratio",
  "register_in_process",
  "run_case",
  "run_paired",
  "scale_out_table",
  "state_bytes_per_device",
  "summarize",
  "transformer_shapes",
  "xla_bytes_accessed",
]

register_in_process(
  "fidelity",
  "8-bit and bfloat16 state, ours and bitsandbytes', each against its own float32 run",
  lambda quick: _fidelity.run(quick=quick, log=print),
  _fidelity.format_table,
)


def main(
  repeats: int | None = None,
  quick: bool = False,
  cases: list[str] | None = None,
  json_path: str | None = None,
) -> dict[str, Any]:
  """Entry point of ``python -m rmsprop_jax bench``: runs, prints the tables, keeps the JSON.

  Args:
    repeats: processes per case (torch: as many of its own); None: ``CASE_REPEATS`` (1 for the
      train step), else ``DEFAULT_REPEATS`` (5).
    quick: tiny trees and one process per case: a smoke run, its numbers meaningless.
    cases: case or group names; ``DEFAULT_CASES`` when None.
    json_path: where to write ``{"rows": ..., "raw": ...}``, if anywhere.

  Returns:
    ``{"rows": summarize(raw), "raw": collect(...)}``.
  """
  results = collect(repeats=repeats, quick=quick, cases=cases)
  rows = summarize(results)
  print()
  print(format_table(rows, results))
  if json_path:
    with open(json_path, "w") as f:
      json.dump({"rows": rows, "raw": results}, f, indent=1)
  return {"rows": rows, "raw": results}
