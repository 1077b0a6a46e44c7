"""The command line: demo smoke run and --help."""

import json
import subprocess
import sys

import pytest

from rmsprop_jax import __main__ as cli
from rmsprop_jax import demo


@pytest.mark.slow  # the demo end to end, every optimizer compiled: slow, run by CI
def test_demo_smoke_run_writes_results_and_plot(tmp_path, capsys):
  results = demo.run(out=str(tmp_path), steps=60, seed=1, progress=False)
  printed = capsys.readouterr().out
  names = set(demo.optimizers())
  assert set(results) == names
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert set(on_disk) == names
  for r in on_disk.values():
    assert {"final_loss", "test_accuracy", "compile_time_s", "train_time_s", "ms_per_step"} <= set(r)
    assert 0.0 <= r["test_accuracy"] <= 1.0
    assert len(r["loss_curve"]) == 60
    # 60 steps are a chunk of 50 and one of 10, both compiled before the clock starts
    assert r["ms_per_step"] == pytest.approx(1e3 * r["train_time_s"] / 60)
    assert r["compile_time_s"] > 0 and r["train_time_s"] > 0
  png = (tmp_path / "loss_curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
  assert width > 2 * height  # two panels side by side: the curves, and each storage against float32
  for column in ("test accuracy", "compile (s)", "train (s)", "ms/step"):
    assert column in printed
  assert "rmsprop 8-bit state" in printed
  # even 60 steps beat chance (0.1) by far
  assert results["rmsprop"]["test_accuracy"] > 0.5


@pytest.mark.slow
def test_demo_default_run_reaches_95_percent(tmp_path):
  results = demo.run(out=str(tmp_path), progress=False)
  assert results["rmsprop"]["test_accuracy"] >= 0.95
  assert results["pytorch preset"]["test_accuracy"] >= 0.95


def test_help_explains_every_demo_option():
  out = subprocess.run(
    [sys.executable, "-m", "rmsprop_jax", "demo", "--help"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  for flag in ("--out", "--steps", "--seed"):
    assert flag in out


def test_demo_refuses_zero_steps(tmp_path):
  with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
    demo.run(out=str(tmp_path), steps=0, progress=False)


def test_cli_parses_demo_arguments(monkeypatch):
  seen = {}
  monkeypatch.setattr(demo, "run", lambda **kw: seen.update(kw))
  assert cli.main(["demo", "--steps", "7", "--seed", "3", "--out", "x", "--no-progress"]) == 0
  assert seen == {"out": "x", "steps": 7, "seed": 3, "progress": False}
