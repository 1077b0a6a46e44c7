"""The benchmark harness: its arithmetic, and a tiny smoke run (no timing asserts)."""

import importlib.util
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from rmsprop_jax import bench

# big_tree: three processes, each timing optax and ours in three paired rounds.
OPTAX_ROUNDS = [[0.010, 0.011, 0.009], [0.012, 0.012, 0.013], [0.011, 0.010, 0.012]]
OURS_ROUNDS = [[0.009, 0.009, 0.009], [0.008, 0.009, 0.010], [0.010, 0.010, 0.011]]


def _fake_results():
  def runs(impl, times, **extra):
    return [dict(case="big_tree", impl=impl, time_s=t, **extra) for t in times]

  def paired(impl, rounds, **extra):  # as run_paired: time_s is the median of the rounds
    return [dict(r, round_s=rs) for r, rs in zip(runs(impl, map(statistics.median, rounds), **extra), rounds)]

  return {
    "bandwidth_Bps": 40e9,
    "cases": {
      "big_tree": {
        "optax": paired("optax", OPTAX_ROUNDS, compile_s=0.5, state_bytes=400, bytes_per_step=200_000_000),
        "ours": paired("ours", OURS_ROUNDS, compile_s=0.4, state_bytes=400, bytes_per_step=200_000_000),
        "torch": runs("torch", [0.030, 0.040, 0.035]),
      },
      "big_tree_bf16": {  # separate processes (no rounds): the ratio of medians
        "optax": runs(
          "optax", [0.010], state_bytes=400, bytes_per_step=200_000_000, xla_bytes_per_param=28.0
        ),
        "ours_bf16": runs(
          "ours_bf16", [0.008], state_bytes=200, bytes_per_step=160_000_000, xla_bytes_per_param=22.0
        ),
        "torch": [{"case": "big_tree_bf16", "impl": "torch", "skipped": "no CUDA here"}],
      },
    },
  }


def test_summary_ratio_is_the_median_of_paired_ratios_per_process():
  rows = {r["case"]: r for r in bench.summarize(_fake_results())}
  big = rows["big_tree"]
  assert big["median_s"] == {"optax": 0.011, "ours": 0.009, "torch": 0.035}
  # per process, the median of the rounds' ours/optax: (0.9, 0.818, 1.0), (0.667, 0.75, 0.769),
  # (0.909, 1.0, 0.917); not the ratio of the medians over processes, 0.009 / 0.011
  assert big["paired_ratios"] == pytest.approx([0.9, 0.75, 11 / 12])
  assert big["ratio_vs_optax"] == pytest.approx(0.9)
  assert big["ratio_spread"] == pytest.approx((11 / 12 - 0.75) / 0.9)
  assert big["speedup_vs_torch"] == pytest.approx(0.035 / 0.009)  # torch: a ratio of medians
  assert big["spread"]["optax"] == pytest.approx((0.012 - 0.010) / 0.011)
  assert big["pct_bandwidth"] == pytest.approx(100 * 2e8 / 0.009 / 40e9)
  assert big["compile_s"] == {"optax": 0.5, "ours": 0.4}
  bf16 = rows["big_tree_bf16"]
  assert bf16["ratio_vs_optax"] == pytest.approx(0.8)
  assert "ratio_spread" not in bf16 and "paired_ratios" not in bf16
  assert bf16["state_bytes_ratio"] == 0.5
  assert bf16["xla_bytes_ratio"] == pytest.approx(22 / 28)
  assert "speedup_vs_torch" not in bf16  # a skipped run is not a time


def test_paired_ratio_pairs_the_rounds_of_one_process():
  ours, optax = {"round_s": [1.0, 3.0, 2.0]}, {"round_s": [2.0, 2.0, 4.0]}
  assert bench.paired_ratio(ours, optax) == 0.5  # median of 0.5, 1.5, 0.5
  assert bench.paired_ratio({"time_s": 1.0}, optax) is None


def test_table_names_every_case_and_the_bandwidth():
  res = _fake_results()
  text = bench.format_table(bench.summarize(res), res)
  assert "40.0 GB/s" in text
  assert "big_tree " in text and "big_tree_bf16" in text
  assert "22.0/28.0 B" in text
  assert "19%" in text  # big_tree's ratio spread
  assert "paired" in text  # the footnote says how the ratio is measured
  assert "torch: no CUDA here" in text  # why a row has no torch ratio


def test_unknown_case_is_refused():
  with pytest.raises(ValueError, match="unknown case 'nope'"):
    bench.collect(cases=["nope"])


def test_without_cases_the_bench_runs_the_step_time_set_and_all_names_every_case():
  assert bench.expand_cases(None) == list(bench.DEFAULT_CASES)
  assert set(bench.DEFAULT_CASES) <= set(bench.CASES)
  assert not set(bench.DEFAULT_CASES) & (set(bench.SCALE_CASES) | set(bench.HOST_DEVICES))
  assert bench.expand_cases(["all"]) == list(bench.CASES)


def test_an_in_process_case_runs_here_and_prints_its_own_table(monkeypatch, capsys):
  seen = []

  def run(quick):
    seen.append(quick)
    return {"rows": [1, 2]}

  monkeypatch.setitem(
    bench.IN_PROCESS, "toy", bench.InProcessCase("a toy", run, lambda r: f"toy rows {r['rows']}")
  )
  result = bench.main(quick=True, cases=["toy"])
  assert seen == [True] and result["raw"]["in_process"] == {"toy": {"rows": [1, 2]}}
  assert result["rows"] == [] and "toy rows [1, 2]" in capsys.readouterr().out
  with pytest.raises(ValueError, match="already a case"):
    bench.register_in_process("big_tree", "taken", run, str)


@pytest.mark.parametrize("case", ["eager_update", "many_leaves_scan", "big_tree_bf16"])
def test_worker_runs_a_quick_case_in_process(case):
  impl = "ours_bf16" if case == "big_tree_bf16" else "ours"
  out = bench.run_case(case, impl, quick=True)
  assert out["time_s"] > 0 and out["state_bytes"] > 0


def test_paired_worker_builds_and_times_both_in_process():
  res = bench.run_paired("big_tree_bf16", ("optax", "ours_bf16"), quick=True, rounds=3, iters=2)
  assert set(res) == {"optax", "ours_bf16"}
  for out in res.values():
    assert len(out["round_s"]) == 3 and out["time_s"] == statistics.median(out["round_s"])
    assert out["compile_s"] > 0 and out["state_bytes"] > 0 and "bytes_per_step" in out
  assert bench.paired_ratio(res["ours_bf16"], res["optax"]) > 0
  with pytest.raises(ValueError, match="one implementation per process"):
    bench.run_paired("compile_600", ("optax", "ours"), quick=True)


def test_quick_bench_end_to_end_in_separate_processes(capsys):
  result = bench.main(quick=True, cases=["one_big_leaf"])
  (row,) = result["rows"]
  assert set(row["median_s"]) == {"optax", "ours"}
  assert len(row["paired_ratios"]) == 1 and row["ratio_spread"] == 0  # one process, paired
  ((optax,), (ours,)) = result["raw"]["cases"]["one_big_leaf"].values()
  assert len(optax["round_s"]) == len(ours["round_s"]) == 2 and "compile_s" in ours
  assert "one_big_leaf" in capsys.readouterr().out


# ----------------------------------------------------------------- model-scale cases


def test_case_groups_expand_to_their_cases_and_unknown_names_are_refused():
  assert bench.expand_cases(["init"]) == ["init_eager", "init_jit", "init_eager_cm", "init_jit_cm"]
  assert bench.expand_cases(["peak", "peak_bytes"]) == ["peak_bytes", "peak_bytes_momentum", "peak_bytes_cm"]
  assert len(bench.expand_cases(["step_8bit"])) == len(bench.OPTIONS)
  assert {bench.case_options(c) for c in bench.CASE_GROUPS["compile"]} == {"plain", "cm"}
  with pytest.raises(ValueError, match="unknown case 'nope'.*or a group"):
    bench.expand_cases(["init", "nope"])


def test_the_transformer_tree_has_56_leaves_and_99m_params():
  import math

  shapes = bench.transformer_shapes()
  assert len(shapes) == len(bench.transformer_shapes(quick=True)) == 56
  assert sum(math.prod(s) for s in shapes) == 99_128_320


@pytest.mark.parametrize("options", sorted(bench.OPTIONS))
def test_optax_equivalent_computes_our_float32_update(options):
  """The step-time cases compare like with like: optax with the same options is our float32 step."""
  import chex
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.ones(3)}
  ours, theirs = bench.make_opt("ours", options), bench.make_opt("optax", options)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  for t in range(3):
    g = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)), params)
    u_ours, s_ours = ours.update(g, s_ours, params)
    u_theirs, s_theirs = theirs.update(g, s_theirs, params)
    chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
  ("case", "impl"),
  [("init_eager", "ours_8bit"), ("init_jit_cm", "ours_bf16"), ("compile_200_leaves_cm", "ours_8bit")],
)
def test_quick_timed_scale_cases_run_in_process(case, impl):
  out = bench.run_case(case, impl, quick=True)
  assert out["time_s"] > 0 and out["n_leaves"] == len(bench.case_shapes(case, quick=True))
  if case.startswith("init_"):
    assert out["state_bytes"] > 0 and out["second_call_s"] > 0
  else:
    assert out["trace_lower_s"] + out["xla_compile_s"] == pytest.approx(out["time_s"])


def test_quick_peak_bytes_case_counts_state_and_allowed_copies():
  out = bench.run_case("peak_bytes_momentum", "ours_8bit", quick=True)
  # 64x64 weights quantized (one byte and a scale per 256 per moment), biases float32
  assert 2 < out["state_bytes_per_param"] < 2.2 and 1.9 < out["narrow_copy_bytes_per_param"] < 2.1
  for what in ("step", "train"):
    assert out[what]["peak"] >= out[what]["arguments"] + out[what]["temp"] - 1e-9
  assert out["train"]["arguments"] > out["state_bytes_per_param"] + 4  # params, state and the batch


def test_quick_8bit_step_case_times_optax_with_the_same_options():
  res = bench.run_paired("step_8bit_nesterov", ("optax", "ours_8bit"), quick=True, rounds=2, iters=2)
  assert set(res) == {"optax", "ours_8bit"}
  assert res["ours_8bit"]["state_bytes"] < res["optax"]["state_bytes"] / 3  # nu and trace in 8 bits
  assert bench.paired_ratio(res["ours_8bit"], res["optax"]) > 0


def test_scale_summary_gives_ratios_to_optax_and_the_train_step_target():
  def runs(case, times):
    return {impl: [{"case": case, "impl": impl, "time_s": t} for t in ts] for impl, ts in times.items()}

  peak = {
    "optax": {"state_bytes_per_param": 8.0, "narrow_copy_bytes_per_param": 0.0},
    "ours_8bit": {"state_bytes_per_param": 2.0, "narrow_copy_bytes_per_param": 2.0},
  }
  peak["optax"] |= {"step": {"peak": 16.0, "temp": 0.0}, "train": {"peak": 20.0, "temp": 4.0}}
  peak["ours_8bit"] |= {"step": {"peak": 11.0, "temp": 1.0}, "train": {"peak": 14.5, "temp": 4.5}}
  res = {
    "bandwidth_Bps": 40e9,
    "cases": {
      "init_jit": runs("init_jit", {"optax": [1.0, 2.0, 3.0], "ours_8bit": [3.0, 3.0, 3.0]}),
      "peak_bytes_momentum": {impl: [{"case": "peak_bytes_momentum", **r}] for impl, r in peak.items()},
    },
  }
  rows = {r["case"]: r for r in bench.summarize(res)}
  assert rows["init_jit"]["ratio_vs_optax"] == {"ours_8bit": 1.5}
  entry = rows["peak_bytes_momentum"]["peak"]["ours_8bit"]
  assert entry["train_target"] == 20.0 - (8.0 - 2.0) and entry["train_excess"] == 0.5
  text = bench.format_table(list(rows.values()), res)
  assert "3.00 s (1.50x)" in text and "peak_bytes_momentum" in text and "0.50" in text


# ----------------------------------------------------------------- scripts in benchmarks/

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_script(name):
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
  assert spec is not None and spec.loader is not None
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_low_precision_parity_runs_a_tiny_task(monkeypatch, tmp_path):
  """benchmarks/low_precision_parity.py, one seed, one optimizer, 20 steps: every storage and
  the control get a row against float32 (no target asserted at this size)."""
  mod = _load_script("low_precision_parity")
  monkeypatch.setattr(mod, "SEEDS", (0,))
  monkeypatch.setattr(mod, "STEPS", 20)
  monkeypatch.setattr(mod, "WINDOW", 10)
  monkeypatch.setattr(mod, "LR_DIVISORS", (1,))
  monkeypatch.setattr(mod, "TASKS", {"digits MLP": mod.TASKS["digits MLP"]})
  monkeypatch.setattr(mod, "OPTIMIZERS", {"rmsprop": mod.OPTIMIZERS["rmsprop"]})
  out = mod.main(tmp_path / "parity.json")
  cell = out["digits MLP"]["rmsprop"]
  assert {"float32", "bfloat16 nu", "8-bit", mod.CONTROL} <= set(cell)
  for storage in ("bfloat16 nu", "8-bit"):
    assert np.isfinite(cell[storage]["loss_vs_float32"]) and 0 <= cell[storage]["mean_accuracy"] <= 1
  assert json.loads((tmp_path / "parity.json").read_text())["method"]["steps"] == 20


def test_quant_codes_runs_its_block_maximum_section():
  """benchmarks/quant_codes.py --quick on one section: each way of computing the block maximum
  gets a row (the other sections take minutes even when quick)."""
  mod = _load_script("quant_codes")
  res = mod.main(["--quick", "--sections", "blockmax"])
  text = mod.SECTIONS["blockmax"][1](res["blockmax"])
  assert "qz.block_absmax" in text and res["blockmax"]["seconds"] > 0


def test_lowerings_measures_both_lowerings_of_one_step():
  """benchmarks/lowerings.py on one storage and option, tiny: both lowerings get their bytes,
  instructions and a paired time; the CPU lowering's temporaries are no more than the portable one's."""
  mod = _load_script("lowerings")
  out = mod.measure({"state_bits": 8, "momentum": 0.9}, 2, (64, 256), 2)
  for name in ("cpu", "portable"):
    assert out[name]["xla_B_per_param"] > 0 and out[name]["hlo_per_leaf"] > 0
  assert out["cpu"]["temp_B_per_param"] <= out["portable"]["temp_B_per_param"]
  assert out["time_cpu_over_portable"] > 0


# ----------------------------------------------------------------- the train step of a GPT


def test_train_step_is_a_named_group_outside_the_default_set():
  cases = bench.expand_cases(["train_step"])
  assert cases == list(bench.TRAIN_STEP_CASES) and len(cases) == 4
  assert not set(cases) & set(bench.DEFAULT_CASES)
  assert {bench.case_options(c) for c in cases} == {"plain", "cm"}
  assert all(bench.CASES[c][1] == bench.STORAGE_IMPLS for c in cases)


def test_the_gpt_has_148_leaves_unrolled_16_scanned_and_42m_params():
  import math

  from rmsprop_jax.bench import gpt

  cfg = bench.gpt_config()
  unrolled, scanned = gpt.leaf_shapes(cfg, scanned=False), gpt.leaf_shapes(cfg, scanned=True)
  assert (len(unrolled), len(scanned)) == (148, 16)
  n = sum(math.prod(s) for s in unrolled)
  assert n == sum(math.prod(s) for s in scanned) and 41e6 < n < 43e6
  assert bench.case_shapes("train_step_scanned_cm") == scanned


def test_the_scanned_gpt_is_the_unrolled_one_and_starts_at_log_vocab():
  """Stacking the unrolled layers gives the scanned model's loss; near-zero logits at init give
  a cross-entropy of log(vocab)."""
  import jax
  import jax.numpy as jnp

  from rmsprop_jax.bench import gpt

  cfg = gpt.QUICK
  params = gpt.init_params(jax.random.key(0), cfg, scanned=False)
  layers = [params.pop(f"layer{i:02d}") for i in range(cfg.layers)]
  stacked = dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
  rng = np.random.default_rng(0)
  tokens, targets = (jnp.asarray(rng.integers(0, cfg.vocab, (cfg.batch, cfg.context))) for _ in "xy")
  unrolled_loss = gpt.loss(
    dict(params, **{f"layer{i:02d}": p for i, p in enumerate(layers)}), tokens, targets, cfg
  )
  np.testing.assert_allclose(gpt.loss(stacked, tokens, targets, cfg), unrolled_loss, rtol=1e-5)
  assert abs(float(unrolled_loss) - np.log(cfg.vocab)) < 0.1


def test_quick_train_step_reports_compile_step_time_and_peak_against_optax():
  case = "train_step_scanned_cm"
  runs = {impl: [bench.run_case(case, impl, quick=True)] for impl in ("optax", "ours_8bit")}
  for impl, (out,) in runs.items():
    assert out["impl"] == impl and out["n_leaves"] == 16
    assert out["compile_s"] == pytest.approx(out["lower_s"] + out["xla_compile_s"])
    assert out["time_s"] == statistics.median(out["step_s"]) > 0 and len(out["step_s"]) == 2
    peak = out["peak_bytes_per_param"]
    assert peak["peak"] >= peak["arguments"] + peak["temp"] - 1e-9
    assert np.all(np.isfinite(out["losses"])) and out["losses"][-1] < out["losses"][0]  # it trains
  assert runs["ours_8bit"][0]["state_bytes"] < runs["optax"][0]["state_bytes"] / 3  # nu, mu, trace
  (row,) = bench.summarize({"cases": {case: runs}})
  ours, optax = runs["ours_8bit"][0], runs["optax"][0]
  assert row["ratio_vs_optax"]["compile"]["ours_8bit"] == ours["compile_s"] / optax["compile_s"]
  assert row["ratio_vs_optax"]["step"]["ours_8bit"] == ours["time_s"] / optax["time_s"]
  peak_ratio = ours["peak_bytes_per_param"]["peak"] / optax["peak_bytes_per_param"]["peak"]
  assert row["ratio_vs_optax"]["peak"]["ours_8bit"] == peak_ratio < 1
  text = bench.format_table([row], {"cases": {case: runs}})
  assert "train step" in text and f"({peak_ratio:.2f}x)" in text and "paired" not in text
