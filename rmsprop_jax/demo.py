"""The main job: RMSProp and its rivals train one MLP on the digits data set.

Every optimizer starts from the same initial weights and sees the same
mini-batches; each run is one ``lax.scan`` per chunk of steps, so what is
timed is the optimizer and the model, not Python.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import presets
from rmsprop_jax.alias import rmsprop

HIDDEN = 128
BATCH = 64
CHUNK = 50  # steps per compiled call (one progress-bar tick)


def optimizers() -> dict[str, optax.GradientTransformation]:
  """The line-up, each with a learning rate tuned for this problem."""
  return {
    "rmsprop": rmsprop(1e-3),
    "rmsprop bfloat16 state": rmsprop(1e-3, nu_dtype=jnp.bfloat16),
    "rmsprop 8-bit state": rmsprop(1e-3, state_bits=8),
    "rmsprop centered+momentum": rmsprop(3e-4, centered=True, momentum=0.9),
    "pytorch preset": presets.pytorch(lr=1e-3),
    "sgd": optax.sgd(0.1),
    "sgd+momentum": optax.sgd(0.03, momentum=0.9),
    "adagrad": optax.adagrad(0.05),
    "adam": optax.adam(1e-3),
  }


def _require(module: str):
  try:
    return __import__(module)
  except ImportError:
    raise SystemExit(f"The demo needs {module}: pip install 'rmsprop-jax[demo]'") from None


def load_digits(seed: int) -> tuple[np.ndarray, ...]:
  """scikit-learn's bundled 8x8 digits, standardised, split 75/25."""
  _require("sklearn")
  from sklearn.datasets import load_digits as sk_load
  from sklearn.model_selection import train_test_split

  x, y = sk_load(return_X_y=True)
  x_tr, x_te, y_tr, y_te = train_test_split(
    x.astype(np.float32), y, test_size=0.25, random_state=seed, stratify=y
  )
  mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
  return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
  """He-initialised dense layers."""
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    params.append({"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)})
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
  return x @ params[-1]["w"] + params[-1]["b"][None, :]


def loss_fn(params, x, y):
  logits = mlp(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_chunk(opt: optax.GradientTransformation) -> jax.stages.Wrapped:
  """A jitted function running CHUNK steps over the given batch indices."""

  @jax.jit
  def run_chunk(params, state, x, y, idx):
    def step(carry, batch_idx):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x[batch_idx], y[batch_idx])
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss

    (params, state), losses = jax.lax.scan(step, (params, state), idx)
    return params, state, losses

  return run_chunk


def train(opt, params, data, batches, bar=None) -> dict[str, Any]:
  """Trains from ``params`` on ``batches``; returns losses, accuracy and timings.

  Every chunk length the run needs is compiled before the clock starts, so
  ``compile_time_s`` is all of tracing and compiling and ``train_time_s`` only
  the steps (and fetching each chunk's losses).
  """
  x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in data)
  state = opt.init(params)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if jnp.ndim(x) > 0)
  run_chunk = make_chunk(opt)
  starts = range(0, len(batches), CHUNK)
  t0 = time.perf_counter()
  compiled = {}
  for start in starts:
    idx = batches[start : start + CHUNK]
    if len(idx) not in compiled:
      compiled[len(idx)] = run_chunk.lower(params, state, x_tr, y_tr, idx).compile()
  compile_s = time.perf_counter() - t0
  chunks = []
  t0 = time.perf_counter()
  for start in starts:
    idx = batches[start : start + CHUNK]
    params, state, chunk_losses = compiled[len(idx)](params, state, x_tr, y_tr, idx)
    chunks.append(np.asarray(chunk_losses))
    if bar is not None:
      bar.update(len(idx))
  train_s = time.perf_counter() - t0
  losses = np.concatenate(chunks)
  acc = float(jnp.mean(jnp.argmax(mlp(params, x_te), -1) == y_te))
  tail = max(1, len(losses) // 20)
  return {
    "final_loss": float(loss_fn(params, x_tr, y_tr)),
    "final_batch_loss_avg": float(losses[-tail:].mean()),
    "test_accuracy": acc,
    "compile_time_s": compile_s,
    "train_time_s": train_s,
    "ms_per_step": 1e3 * train_s / len(losses),
    "state_bytes": state_bytes,
    "loss_curve": [float(v) for v in losses],
  }


def run(
  out: str = "rmsprop_demo_out", steps: int = 1500, seed: int = 0, progress: bool = True
) -> dict[str, dict[str, Any]]:
  """Trains every optimizer, prints the table, writes results.json and a PNG.

  Args:
    out: output folder (created if needed).
    steps: training steps per optimizer.
    seed: seed of the data split, initial weights and batch order.
    progress: show a progress bar.

  Returns:
    The results dictionary written to ``out/results.json``.
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  data = load_digits(seed)
  n_train = len(data[0])
  rng = np.random.default_rng(seed)
  batches = jnp.asarray(rng.integers(0, n_train, size=(steps, BATCH)))
  params0 = init_mlp(jax.random.key(seed), (data[0].shape[1], HIDDEN, 10))
  opts = optimizers()
  bar = None
  if progress:
    tqdm = _require("tqdm").tqdm
    bar = tqdm(total=steps * len(opts), unit="step", desc="training", leave=False)
  results = {}
  for name, opt in opts.items():
    if bar is not None:
      bar.set_postfix_str(name)
    results[name] = train(opt, params0, data, batches, bar)
  if bar is not None:
    bar.close()
  out_dir = Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.json").write_text(json.dumps(results, indent=1))
  plot(results, out_dir / "loss_curves.png")
  print(table(results))
  print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'loss_curves.png'}")
  return results


def table(results: dict[str, dict[str, Any]]) -> str:
  """One row per optimizer; compile time and training time (steps only) apart."""
  head = (
    f"{'optimizer':<28}{'final train loss':>17}{'test accuracy':>15}{'state (KiB)':>13}"
    f"{'compile (s)':>13}{'train (s)':>11}{'ms/step':>9}"
  )
  rows = [head, "-" * len(head)]
  for name, r in results.items():
    rows.append(
      f"{name:<28}{r['final_loss']:>17.3e}{r['test_accuracy']:>15.3f}{r['state_bytes'] / 1024:>13.1f}"
      f"{r['compile_time_s']:>13.2f}{r['train_time_s']:>11.2f}{r['ms_per_step']:>9.3f}"
    )
  rows.append("compile: trace + XLA compile of each optimizer's training loop; train: the steps alone")
  return "\n".join(rows)


# The storages of one optimizer: a line style and a colour each, the same in both panels (in
# the left one their curves overlap).
FLOAT32 = "rmsprop"
STORAGES = {FLOAT32: ("-", "C0"), "rmsprop bfloat16 state": ("--", "C1"), "rmsprop 8-bit state": (":", "C2")}
OTHERS = ["C3", "C4", "C5", "C6", "C7", "C8", "C9"]


def _smooth(curve, k: int) -> np.ndarray:
  return np.convolve(np.asarray(curve), np.ones(k) / k, mode="valid")


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
  """Left: smoothed training-loss curves, log scale. Right: each storage against float32."""
  _require("matplotlib")
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(next(iter(results.values()))["loss_curve"])
  k = max(1, n // 60)
  steps = np.arange(n - k + 1) + k - 1
  with plt.rc_context({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 10}):
    fig, (ax, rel) = plt.subplots(1, 2, figsize=(13, 5.2), dpi=100, width_ratios=(1.35, 1))
    others = iter(OTHERS * len(results))
    for name, r in results.items():
      style, color = STORAGES.get(name) or ("-", next(others))
      lw = 2.4 if name in STORAGES else 1.4
      ax.plot(steps, _smooth(r["loss_curve"], k), style, color=color, label=name, lw=lw)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mini-batch, smoothed)")
    ax.set_title("Digits MLP: same initialisation, same batches")
    ax.grid(alpha=0.3, which="both")
    ax.legend(ncols=2)

    if FLOAT32 in results:
      base = _smooth(results[FLOAT32]["loss_curve"], k)
      rel.axhline(0.0, color="0.4", lw=1.0)
      for name, (style, color) in STORAGES.items():
        if name != FLOAT32 and name in results:
          ratio = _smooth(results[name]["loss_curve"], k) / base
          label = name.removeprefix("rmsprop ")
          rel.plot(steps, 100 * (ratio - 1), style, color=color, lw=2.2, label=label)
      rel.set_xlabel("step")
      rel.set_ylabel("loss vs float32 state (%)")
      rel.set_title("rmsprop: each storage against float32")
      rel.grid(alpha=0.3)
      rel.legend()
    else:
      rel.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
