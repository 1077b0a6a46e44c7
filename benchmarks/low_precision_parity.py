"""Training parity of low-precision optimizer state against float32 RMSProp.

Two tasks that need no download: the demo's digits MLP, and a small CNN on
the same 8x8 digits. For each optimizer (plain RMSProp, centered + momentum,
the PyTorch preset) and each storage of its state (float32, bfloat16 nu,
8-bit state), three seeds train from the same initial weights on the same
batches for 300 steps (long enough to reach 97% test accuracy, short enough
that the training loss is not yet ~0, where ratios of losses mean nothing);
the table gives the mean final training loss and test accuracy over the
seeds, their ratio and difference to float32, and the spread of the final
loss over the seeds ((max - min) / mean), the scale of noise to compare with.

Run: ``python benchmarks/low_precision_parity.py`` (a few minutes on 2 CPU
cores); writes ``benchmarks/low_precision_parity.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from rmsprop_jax.demo import init_mlp, load_digits, mlp

SEEDS = (0, 1, 2)
BATCH = 64

OPTIMIZERS = {
  "rmsprop": lambda **s: rmsprop_jax.rmsprop(1e-3, **s),
  "centered+momentum": lambda **s: rmsprop_jax.rmsprop(3e-4, centered=True, momentum=0.9, **s),
  "pytorch preset": lambda **s: rmsprop_jax.presets.pytorch(lr=1e-3, **s),
}
STORAGES = {
  "float32": {},
  "bfloat16 nu": dict(nu_dtype=jnp.bfloat16),
  "8-bit": dict(state_bits=8),
}


def init_cnn(key: jax.Array) -> dict[str, jax.Array]:
  """conv 3x3x16, conv 3x3x32 (stride 2), dense 512 -> 10 (He init)."""
  k1, k2, k3 = jax.random.split(key, 3)
  he = lambda k, shape, fan_in: jax.random.normal(k, shape) * jnp.sqrt(2.0 / fan_in)
  return {
    "c1": he(k1, (3, 3, 1, 16), 9),
    "b1": jnp.zeros(16),
    "c2": he(k2, (3, 3, 16, 32), 144),
    "b2": jnp.zeros(32),
    "w": he(k3, (4 * 4 * 32, 10), 512),
    "b": jnp.zeros(10),
  }


def cnn(params, x):
  x = x.reshape(-1, 8, 8, 1)
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.nn.relu(
    jax.lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn) + params["b1"]
  )
  x = jax.nn.relu(
    jax.lax.conv_general_dilated(x, params["c2"], (2, 2), "SAME", dimension_numbers=dn) + params["b2"]
  )
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


TASKS = {
  "digits MLP": (lambda key: init_mlp(key, (64, 128, 10)), mlp, 300),
  "digits CNN": (init_cnn, cnn, 300),
}


def _xent(model, params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(params, x), y).mean()


def run_task(task: str, opt: optax.GradientTransformation, data) -> tuple[np.ndarray, np.ndarray]:
  """Final training loss and test accuracy of each seed (vmapped over seeds)."""
  init, model, steps = TASKS[task]
  x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in data)

  def one(seed):
    params = init(jax.random.key(seed))
    idx = jax.random.randint(jax.random.key(seed + 1000), (steps, BATCH), 0, x_tr.shape[0])

    def step(carry, i):
      p, s = carry
      g = jax.grad(lambda p: _xent(model, p, x_tr[i], y_tr[i]))(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), idx)
    acc = jnp.mean(jnp.argmax(model(p, x_te), -1) == y_te)
    return _xent(model, p, x_tr, y_tr), acc

  loss, acc = jax.jit(jax.vmap(one))(jnp.asarray(SEEDS))
  return np.asarray(loss), np.asarray(acc)


def main(out: Path | None = None) -> dict:
  data = load_digits(0)
  results: dict = {}
  t0 = time.perf_counter()
  for task in TASKS:
    for name, make in OPTIMIZERS.items():
      for storage, kw in STORAGES.items():
        loss, acc = run_task(task, make(**kw), data)
        results.setdefault(task, {}).setdefault(name, {})[storage] = {
          "loss": loss.tolist(),
          "accuracy": acc.tolist(),
          "mean_loss": float(loss.mean()),
          "mean_accuracy": float(acc.mean()),
        }
  rows = [
    f"{'task':<12}{'optimizer':<20}{'storage':<13}{'train loss':>11}{'vs f32':>8}"
    f"{'test acc':>10}{'vs f32 (pts)':>14}{'seed spread':>13}"
  ]
  worst = {"loss_ratio": 0.0, "acc_points": 0.0}
  for task, by_opt in results.items():
    for name, by_storage in by_opt.items():
      ref = by_storage["float32"]
      spread = (max(ref["loss"]) - min(ref["loss"])) / ref["mean_loss"]
      ref["seed_spread"] = spread
      for storage, r in by_storage.items():
        ratio = r["mean_loss"] / ref["mean_loss"] - 1
        points = 100 * (r["mean_accuracy"] - ref["mean_accuracy"])
        r["loss_vs_float32"], r["accuracy_points_vs_float32"] = ratio, points
        if storage != "float32":
          worst["loss_ratio"] = max(worst["loss_ratio"], abs(ratio))
          worst["acc_points"] = max(worst["acc_points"], abs(points))
        own = (max(r["loss"]) - min(r["loss"])) / r["mean_loss"]
        rows.append(
          f"{task:<12}{name:<20}{storage:<13}{r['mean_loss']:>11.3e}{ratio:>+8.1%}"
          f"{r['mean_accuracy']:>10.4f}{points:>+14.2f}{own:>13.0%}"
        )
  print("\n".join(rows))
  print(
    f"\nworst |loss ratio - 1| {worst['loss_ratio']:.1%} (target <= 3%),"
    f" worst |accuracy difference| {worst['acc_points']:.2f} points (target <= 0.5);"
    f" {time.perf_counter() - t0:.0f} s"
  )
  results["worst"] = worst
  results["seeds"] = list(SEEDS)
  if out is not None:
    out.write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main(Path(__file__).with_name("low_precision_parity.json"))
