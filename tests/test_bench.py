"""The benchmark harness: its arithmetic, and a tiny smoke run (no timing asserts)."""

import statistics

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
