"""The bench's summaries and tables: from the raw runs of ``collect`` to rows and text.

:func:`summarize` turns the runs of each case into one row (medians over
processes, their spread, the paired ratio ours / optax, bytes);
:func:`format_table` prints the rows, then each in-process case's own table.
"""

from __future__ import annotations

import statistics
from typing import Any

from rmsprop_jax.bench import cases as cs

Runs = dict[str, list[dict[str, Any]]]  # per implementation, one dict of numbers per process
Row = dict[str, Any]
NAN = float("nan")

FOOTNOTE = (
  "ours/optax: paired, optax and ours built and timed in turn, round after round, in one"
  " process; per process the median of the rounds' ratios, then the median over processes"
  " (compile_600: ratio of medians over processes, one implementation per process);"
  " ratio spread: (max-min)/median of the per-process ratios; spread: (max-min)/median of"
  " the per-process times; % bw: minimal bytes of a step / time / triad bandwidth;"
  " vs torch: torch.optim.RMSprop(foreach=True) time / ours (medians over processes of"
  " their own); XLA bytes: bytes read and written per parameter per step by XLA's cost"
  " analysis of the compiled step (deterministic)."
)


def paired_ratio(ours: dict[str, Any], optax: dict[str, Any]) -> float | None:
  """One process's ratio ours / optax: the median of the ratios of its rounds (None if unpaired)."""
  if "round_s" not in ours or "round_s" not in optax:
    return None
  return statistics.median(a / b for a, b in zip(ours["round_s"], optax["round_s"]))


def ours_key(impls: Any) -> str:
  """Which of our implementations (a key of ``impls``) a case compares with optax."""
  return next((k for k in ("ours_bf16", "ours_8bit") if k in impls), "ours")


def _first(runs: Runs, key: str) -> dict[str, Any]:
  """Per implementation, ``key`` of its first process, where it has one."""
  return {i: rs[0][key] for i, rs in runs.items() if rs and key in rs[0]}


def _median_of(runs: Runs, key: str) -> dict[str, float]:
  """Per implementation, the median over processes of ``key``, where it has one."""
  return {i: statistics.median([r[key] for r in rs]) for i, rs in runs.items() if rs and key in rs[0]}


def _row(case: str, runs: Runs) -> Row:
  """The case, its target, and each implementation's median time over processes and spread."""
  med, spread = {}, {}
  for impl, rs in runs.items():
    ts = [r["time_s"] for r in rs if "time_s" in r]
    if ts:
      med[impl] = statistics.median(ts)
      spread[impl] = (max(ts) - min(ts)) / med[impl] if med[impl] else 0.0
  return {
    "case": case,
    "what": cs.CASES[case][0],
    "target": cs.CASES[case][2],
    "median_s": med,
    "spread": spread,
  }


def _summarize_step(case: str, runs: Runs, bandwidth: float) -> Row:
  """A step-time case: the paired ratio, vs torch, % of bandwidth, compile, state and XLA bytes."""
  row = _row(case, runs)
  med = row["median_s"]
  ours = ours_key(med)
  maybe = [paired_ratio(a, b) for a, b in zip(runs.get(ours, []), runs.get("optax", []))]
  pairs = [r for r in maybe if r is not None]
  if pairs and len(pairs) == len(maybe):  # each process's paired ratio; their median
    row["ratio_vs_optax"] = statistics.median(pairs)
    row["paired_ratios"] = pairs
    row["ratio_spread"] = (max(pairs) - min(pairs)) / row["ratio_vs_optax"]
  elif "optax" in med and ours in med:  # separate processes: the ratio of medians
    row["ratio_vs_optax"] = med[ours] / med["optax"]
  if "torch" in med and ours in med:
    row["speedup_vs_torch"] = med["torch"] / med[ours]
  if "bytes_per_step" in runs[ours][0]:
    row["pct_bandwidth"] = 100 * runs[ours][0]["bytes_per_step"] / med[ours] / bandwidth
    row["pct_bandwidth_optax"] = 100 * runs["optax"][0]["bytes_per_step"] / med["optax"] / bandwidth
  for key, ratio_key in (("xla_bytes_per_param", "xla_bytes_ratio"), ("state_bytes", "state_bytes_ratio")):
    per = _first(runs, key)
    if per:
      row[key] = per
      if "optax" in per and ours in per:
        row[ratio_key] = per[ours] / per["optax"]
  if comp := _median_of(runs, "compile_s"):
    row["compile_s"] = comp
  return row


def _summarize_scale(case: str, runs: Runs) -> Row:
  """A model-scale case: per storage its numbers and the ratio to optax's."""
  row = _row(case, runs)
  if case.startswith("peak_bytes"):
    # Deterministic: the first process's numbers. The train-step target: optax's
    # float32 peak minus the state bytes ours saves.
    per = {impl: rs[0] for impl, rs in runs.items() if rs}
    opt = per.get("optax")
    row["peak"] = {}
    for impl, r in per.items():
      entry = {"step": r["step"]["peak"], "train": r["train"]["peak"], "step_temp": r["step"]["temp"]}
      entry |= {"state": r["state_bytes_per_param"], "copy": r["narrow_copy_bytes_per_param"]}
      if opt is not None:
        saved = opt["state_bytes_per_param"] - r["state_bytes_per_param"]
        entry["train_target"] = opt["train"]["peak"] - saved
        entry["train_excess"] = r["train"]["peak"] - entry["train_target"]
      row["peak"][impl] = entry
    return row
  med = row["median_s"]
  if "optax" in med:
    row["ratio_vs_optax"] = {impl: t / med["optax"] for impl, t in med.items() if impl != "optax"}
  for key in ("second_call_s", "trace_lower_s", "xla_compile_s", "xla_constant_folding_warnings"):
    if vals := _median_of(runs, key):
      row[key] = vals
  return row


def _summarize_train(case: str, runs: Runs) -> Row:
  """A train-step case: per implementation the medians over processes of compile, step time
  and peak bytes per param; per storage of ours, each over optax's."""
  row = _row(case, runs)
  row["compile_s"] = _median_of(runs, "compile_s")
  row["lower_s"] = _median_of(runs, "lower_s")
  row["step_s"] = row["median_s"]
  row["peak_bytes_per_param"] = {
    i: statistics.median(r["peak_bytes_per_param"]["peak"] for r in rs) for i, rs in runs.items() if rs
  }
  row["ratio_vs_optax"] = {
    what: {i: v / per["optax"] for i, v in per.items() if i != "optax"}
    for what, per in (
      ("compile", row["compile_s"]),
      ("step", row["step_s"]),
      ("peak", row["peak_bytes_per_param"]),
    )
    if "optax" in per
  }
  return row


def _summarize_scale_out(case: str, runs: Runs) -> Row:
  row = _row(case, runs)
  row["state_bytes_per_device"] = _first(runs, "state_bytes_per_device")
  row["params_bytes_per_device"] = runs["replicated"][0]["params_bytes_per_device"]
  row["compile_s"] = _median_of(runs, "compile_s")
  row["ratio_zero1_vs_replicated"] = row["median_s"]["zero1"] / row["median_s"]["replicated"]
  sb = row["state_bytes_per_device"]
  row["state_bytes_ratio"] = sb["zero1"] / sb["replicated"]
  if "by_devices" in runs["zero1"][0]:
    row["by_devices"] = runs["zero1"][0]["by_devices"]
  return row


def summarize(results: dict[str, Any]) -> list[Row]:
  """One row per case run in processes: medians, spreads, ratios ours / optax and ours / torch."""
  rows = []
  for case, runs in results["cases"].items():
    if case in cs.HOST_DEVICES:
      rows.append(_summarize_scale_out(case, runs))
    elif case in cs.SCALE_CASES:
      rows.append(_summarize_scale(case, runs))
    elif case in cs.TRAIN_STEP_CASES:
      rows.append(_summarize_train(case, runs))
    else:
      rows.append(_summarize_step(case, runs, results["bandwidth_Bps"]))
  return rows


def _format_steps(rows: list[Row]) -> list[str]:
  lines = [
    f"{'case':<18}{'ours (ms)':>11}{'optax (ms)':>12}{'ours/optax':>12}{'ratio spread':>14}{'target':>9}"
    f"{'spread':>8}{'% bw':>7}{'vs torch':>10}{'compile ours/optax (s)':>24}{'state ours/optax':>18}"
    f"{'XLA bytes ours/optax':>22}",
  ]
  for r in rows:
    med = r["median_s"]
    ours = ours_key(med)
    comp = r.get("compile_s", {})
    comp_s = f"{comp.get(ours, NAN):.2f}/{comp.get('optax', NAN):.2f}" if comp else "-"
    sb = r.get("state_bytes_ratio")
    xb = r.get("xla_bytes_per_param", {})
    xb_s = f"{xb[ours]:.1f}/{xb['optax']:.1f} B" if ours in xb and "optax" in xb else "-"
    rs_s = f"{r['ratio_spread'] * 100:.0f}%" if "ratio_spread" in r else "-"
    torch_s = f"{r['speedup_vs_torch']:.1f}x" if "speedup_vs_torch" in r else "-"
    sb_s = f"{sb:.2f}" if sb else "-"
    spread = max(r["spread"].values()) * 100
    lines.append(
      f"{r['case']:<18}{med.get(ours, NAN) * 1e3:>11.3f}{med.get('optax', NAN) * 1e3:>12.3f}"
      f"{r.get('ratio_vs_optax', NAN):>12.3f}{rs_s:>14}{r['target']:>9}{spread:>7.0f}%"
      f"{r.get('pct_bandwidth', NAN):>7.0f}{torch_s:>10}{comp_s:>24}{sb_s:>18}{xb_s:>22}"
    )
  return lines


def _format_scale(rows: list[Row]) -> list[str]:
  """The model-scale rows: times and ratios per storage, then peak bytes."""
  impls = cs.STORAGE_IMPLS
  lines: list[str] = []
  timed = [r for r in rows if not r["case"].startswith("peak_bytes")]
  if timed:
    lines += [
      "",
      "model scale: seconds (median over processes) and ratio to optax.rmsprop with the same options",
      f"{'case':<24}" + "".join(f"{i:>20}" for i in impls) + f"{'target':>26}",
    ]
    for r in timed:
      med, ratio = r["median_s"], r.get("ratio_vs_optax", {})
      cells = [
        f"{med.get(i, NAN):.2f} s" + ("" if i == "optax" else f" ({ratio.get(i, NAN):.2f}x)") for i in impls
      ]
      lines.append(f"{r['case']:<24}" + "".join(f"{c:>20}" for c in cells) + f"{r['target']:>26}")
    for r in timed:
      warned = {i: n for i, n in r.get("xla_constant_folding_warnings", {}).items() if n}
      if warned:
        lines.append(f"  XLA constant-folding warnings in {r['case']}: {warned}")
  peaks = [r for r in rows if r["case"].startswith("peak_bytes")]
  if peaks:
    lines += [
      "",
      "peak bytes per param (arguments + temporaries + outputs not aliased, memory_analysis):",
      f"{'case':<20}{'impl':<11}{'state':>7}{'step':>8}{'step temp':>11}{'train':>8}"
      f"{'train target':>14}{'excess':>8}{'copy allowed':>14}",
    ]
    for r in peaks:
      for impl, e in r["peak"].items():
        lines.append(
          f"{r['case']:<20}{impl:<11}{e['state']:>7.2f}{e['step']:>8.2f}{e['step_temp']:>11.2f}"
          f"{e['train']:>8.2f}{e.get('train_target', NAN):>14.2f}{e.get('train_excess', NAN):>8.2f}"
          f"{e['copy']:>14.2f}"
        )
    lines.append(
      "  train target: optax's float32 train-step peak minus the state bytes saved; excess: ours"
      " minus target (allowed: 0.3 plus one copy of the narrow moments)"
    )
  return lines


def _format_train(rows: list[Row]) -> list[str]:
  """The train-step rows: per implementation compile, step time and peak, each with its ratio to optax."""
  if not rows:
    return []
  lines = [
    "",
    "train step (42M-param GPT, batch 4 x 128): medians over processes, one implementation per"
    " process; (ratio to optax.rmsprop with the same options)",
    f"{'case':<24}{'impl':<11}{'compile (s)':>18}{'step (s)':>18}{'peak (B/param)':>20}{'spread':>8}",
  ]
  for r in rows:
    for impl in r["step_s"]:
      cells = [
        f"{r[key][impl]:{fmt}}"
        + ("" if impl == "optax" else f" ({r['ratio_vs_optax'].get(what, {}).get(impl, NAN):.2f}x)")
        for what, key, fmt in (
          ("compile", "compile_s", ".2f"),
          ("step", "step_s", ".3f"),
          ("peak", "peak_bytes_per_param", ".2f"),
        )
      ]
      lines.append(
        f"{r['case']:<24}{impl:<11}{cells[0]:>18}{cells[1]:>18}{cells[2]:>20}{r['spread'][impl] * 100:>7.0f}%"
      )
    lines.append(f"  target: {r['target']}")
  lines.append(
    "  compile: lower + compile of the donated step; step: median of the timed steps after a warm-up;"
    " peak: memory_analysis arguments + temporaries + outputs - aliased; spread: (max-min)/median"
    " of the step times over processes"
  )
  return lines


def _format_scale_out(r: Row) -> list[str]:
  med, sb = r["median_s"], r["state_bytes_per_device"]
  lines = [
    "",
    f"{r['case']}: {r['what']} (rmsprop momentum=0.9)",
    f"  {'state':<11}{'step (ms)':>11}{'spread':>8}{'state MB / device':>19}"
    f"{'params MB / device':>20}{'compile (s)':>13}",
  ]
  for impl in ("replicated", "zero1"):
    lines.append(
      f"  {impl:<11}{med[impl] * 1e3:>11.2f}{r['spread'][impl] * 100:>7.0f}%"
      f"{sb[impl] / 1e6:>19.2f}{r['params_bytes_per_device'] / 1e6:>20.2f}{r['compile_s'][impl]:>13.2f}"
    )
  lines.append(
    f"  zero1 / replicated: step time {r['ratio_zero1_vs_replicated']:.2f},"
    f" state bytes per device {r['state_bytes_ratio']:.3f}"
  )
  by = r.get("by_devices")
  if by:
    ns = list(next(iter(by["zero1"].values())))
    lines.append(
      f"  state MB per device with ZeRO-1 ({by['n_params'] / 1e6:.1f}M params,"
      f" {by['params_bytes_per_device'] / 1e6:.1f} MB of params per device):"
    )
    lines.append(f"  {'devices':<20}" + "".join(f"{n:>9}" for n in ns) + f"{'replicated':>12}")
    for name, per in by["zero1"].items():
      cells = "".join(f"{per[n] / 1e6:>9.2f}" for n in ns)
      lines.append(f"  {name:<20}{cells}{by['replicated'][name] / 1e6:>12.2f}")
  return lines


def format_table(rows: list[Row], results: dict[str, Any]) -> str:
  """The printout of a run: the step-time table, scale out, model scale, then the in-process cases."""
  lines: list[str] = []
  special = {*cs.HOST_DEVICES, *cs.SCALE_CASES, *cs.TRAIN_STEP_CASES}
  steps = [r for r in rows if r["case"] not in special]
  if "bandwidth_Bps" in results:
    lines += [f"streaming bandwidth (XLA triad, this run): {results['bandwidth_Bps'] / 1e9:.1f} GB/s", ""]
  if steps:
    lines += _format_steps(steps)
  skipped = sorted(
    {r["skipped"] for runs in results["cases"].values() for r in runs.get("torch", []) if "skipped" in r}
  )
  lines += [f"torch: {why}" for why in skipped]
  lines += [line for r in rows if r["case"] in cs.HOST_DEVICES for line in _format_scale_out(r)]
  lines += _format_scale([r for r in rows if r["case"] in cs.SCALE_CASES])
  lines += _format_train([r for r in rows if r["case"] in cs.TRAIN_STEP_CASES])
  if any(r["case"] not in cs.TRAIN_STEP_CASES for r in rows):
    lines += ["", FOOTNOTE]
  for name, res in results.get("in_process", {}).items():
    lines += ["", cs.IN_PROCESS[name].table(res)]
  return "\n".join(lines)
