"""The benchmark harness: its arithmetic, and a tiny smoke run (no timing asserts)."""

import pytest

from rmsprop_jax import bench


def _fake_results():
  def runs(impl, times, **extra):
    return [dict(case="big_tree", impl=impl, time_s=t, **extra) for t in times]

  return {
    "bandwidth_Bps": 40e9,
    "cases": {
      "big_tree": {
        "optax": runs(
          "optax", [0.010, 0.012, 0.011], compile_s=0.5, state_bytes=400, bytes_per_step=200_000_000
        ),
        "ours": runs(
          "ours", [0.009, 0.008, 0.010], compile_s=0.4, state_bytes=400, bytes_per_step=200_000_000
        ),
        "torch": runs("torch", [0.030, 0.040, 0.035]),
      },
      "big_tree_bf16": {
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


def test_summary_ratios_are_medians_of_processes():
  rows = {r["case"]: r for r in bench.summarize(_fake_results())}
  big = rows["big_tree"]
  assert big["median_s"] == {"optax": 0.011, "ours": 0.009, "torch": 0.035}
  assert big["ratio_vs_optax"] == pytest.approx(0.009 / 0.011)
  assert big["speedup_vs_torch"] == pytest.approx(0.035 / 0.009)
  assert big["spread"]["optax"] == pytest.approx((0.012 - 0.010) / 0.011)
  assert big["pct_bandwidth"] == pytest.approx(100 * 2e8 / 0.009 / 40e9)
  assert big["compile_s"] == {"optax": 0.5, "ours": 0.4}
  bf16 = rows["big_tree_bf16"]
  assert bf16["ratio_vs_optax"] == pytest.approx(0.8)
  assert bf16["state_bytes_ratio"] == 0.5
  assert bf16["xla_bytes_ratio"] == pytest.approx(22 / 28)
  assert "speedup_vs_torch" not in bf16  # a skipped run is not a time


def test_table_names_every_case_and_the_bandwidth():
  res = _fake_results()
  text = bench.format_table(bench.summarize(res), res)
  assert "40.0 GB/s" in text
  assert "big_tree " in text and "big_tree_bf16" in text
  assert "22.0/28.0 B" in text
  assert "torch: no CUDA here" in text  # why a row has no torch ratio


def test_unknown_case_is_refused():
  with pytest.raises(ValueError, match="unknown case 'nope'"):
    bench.collect(cases=["nope"])


@pytest.mark.parametrize("case", ["eager_update", "many_leaves_scan", "big_tree_bf16"])
def test_worker_runs_a_quick_case_in_process(case):
  impl = "ours_bf16" if case == "big_tree_bf16" else "ours"
  out = bench.run_case(case, impl, quick=True)
  assert out["time_s"] > 0 and out["state_bytes"] > 0


def test_quick_bench_end_to_end_in_separate_processes(capsys):
  result = bench.main(quick=True, cases=["one_big_leaf"])
  (row,) = result["rows"]
  assert set(row["median_s"]) == {"optax", "ours"}
  assert "one_big_leaf" in capsys.readouterr().out
