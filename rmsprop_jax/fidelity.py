"""Fidelity of low-precision optimizer state: how far a run strays from float32's.

Each low-precision run is compared with its own framework's float32 run, from
the same initial weights and the same mini-batches: ours (8-bit state,
bfloat16 ``nu``) with our float32 run, bitsandbytes' ``RMSprop8bit`` with
``torch.optim.RMSprop``. All runs are PyTorch's RMSProp
(:func:`rmsprop_jax.presets.pytorch` on our side), plain, with momentum 0.9
and centered, on two problems:

* ``least_squares``: a noisy linear least-squares problem, one 512x256 weight
  matrix (131k params);
* ``digits_mlp``: the demo's 64-128-10 MLP on scikit-learn's bundled digits.

Reported per run, the mean over seeds: the params' relative L2 distance to
the float32 run after the last step, the final training loss relative to the
float32 run's, and the median milliseconds of one optimizer step (ours: the
jitted, donated update-and-apply; bitsandbytes: ``optimizer.step()``).

``python -m rmsprop_jax bench --cases fidelity`` prints the table. It needs
torch and scikit-learn; the bitsandbytes rows need ``bitsandbytes``
(``pip install 'rmsprop-jax[test]'``) and say so when it is missing.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import presets

PROBLEMS = ("least_squares", "digits_mlp")
VARIANTS: dict[str, dict[str, Any]] = {
  "plain": {},
  "momentum 0.9": {"momentum": 0.9},
  "centered": {"centered": True},
}
STORAGES: dict[str, dict[str, Any]] = {
  "8-bit": {"state_bits": 8, "min_quantize_size": 1},
  "bfloat16 nu": {"nu_dtype": jnp.bfloat16},
}
LR = 1e-3
ALPHA = 0.99
EPS = 1e-8
BATCH = 64
POINTS = 40  # distances recorded along a run (the curves)


# ----------------------------------------------------------------- problems


def _least_squares(seed: int, quick: bool) -> dict[str, Any]:
  d_in, d_out, n = (64, 128, 512) if quick else (512, 256, 2048)
  rng = np.random.default_rng(seed)
  w_true = rng.normal(size=(d_in, d_out)) / math.sqrt(d_in)
  x = rng.normal(size=(n, d_in))
  y = x @ w_true + 0.5 * rng.normal(size=(n, d_out))
  params = {"w": 0.01 * rng.normal(size=(d_in, d_out))}
  f32 = lambda a: np.asarray(a, np.float32)
  return {"params": [f32(params["w"])], "x": f32(x), "y": f32(y), "kind": "mse"}


def _digits_mlp(seed: int, quick: bool) -> dict[str, Any]:
  from rmsprop_jax.demo import init_mlp, load_digits

  x_tr, y_tr, _, _ = load_digits(seed)
  layers = init_mlp(jax.random.key(seed), (64, 128, 10))
  params = [np.asarray(a, np.float32) for layer in layers for a in (layer["w"], layer["b"])]
  return {"params": params, "x": np.asarray(x_tr, np.float32), "y": np.asarray(y_tr), "kind": "mlp"}


def make_problem(name: str, seed: int, quick: bool, steps: int) -> dict[str, Any]:
  """One problem's data, initial weights and batch order (``"least_squares"`` or ``"digits_mlp"``)."""
  prob = (_least_squares if name == "least_squares" else _digits_mlp)(seed, quick)
  rng = np.random.default_rng(1000 + seed)
  prob["batches"] = rng.integers(0, len(prob["x"]), size=(steps, BATCH))
  return prob


def _jax_loss(kind: str) -> Callable[..., jax.Array]:
  if kind == "mse":
    return lambda p, x, y: jnp.mean((x @ p[0] - y) ** 2)

  def mlp_loss(p, x, y):
    h = jax.nn.relu(x @ p[0] + p[1][None, :])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p[2] + p[3][None, :], y).mean()

  return mlp_loss


def _torch_loss(kind: str) -> Callable[..., Any]:
  import torch

  if kind == "mse":
    return lambda p, x, y: torch.mean((x @ p[0] - y) ** 2)
  return lambda p, x, y: torch.nn.functional.cross_entropy(torch.relu(x @ p[0] + p[1]) @ p[2] + p[3], y)


def _rel_dist(a: list[np.ndarray], b: list[np.ndarray]) -> float:
  num = sum(float(np.sum((np.asarray(u, np.float64) - np.asarray(v, np.float64)) ** 2)) for u, v in zip(a, b))
  den = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in b)
  return math.sqrt(num / den)


# ----------------------------------------------------------------- runners


def _record_at(steps: int) -> list[int]:
  every = max(1, steps // POINTS)
  return sorted({*range(every, steps + 1, every), steps})


def run_jax(opt: optax.GradientTransformation, prob: dict[str, Any]) -> dict[str, Any]:
  """Trains ``prob`` with ``opt``: params at the recorded steps, final loss, step times."""
  loss = _jax_loss(prob["kind"])
  x, y = jnp.asarray(prob["x"]), jnp.asarray(prob["y"])
  grad = jax.jit(lambda p, i: jax.grad(loss)(p, x[i], y[i]))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  params = [jnp.asarray(a) for a in prob["params"]]
  state = opt.init(params)
  batches = jnp.asarray(prob["batches"])
  record = set(_record_at(len(batches)))
  snaps, times = [], []
  for t in range(len(batches)):
    g = jax.block_until_ready(grad(params, batches[t]))
    t0 = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, g))
    times.append(time.perf_counter() - t0)
    if t + 1 in record:
      snaps.append([np.asarray(a) for a in params])
  return {"snapshots": snaps, "loss": float(loss(params, x, y)), "ms": 1e3 * float(np.median(times[1:]))}


def run_torch(make_opt: Callable[[list[Any]], Any], prob: dict[str, Any]) -> dict[str, Any]:
  """:func:`run_jax` for a torch optimizer ``make_opt(params)``."""
  import torch

  loss = _torch_loss(prob["kind"])
  x = torch.from_numpy(prob["x"])
  y = torch.from_numpy(prob["y"]).long() if prob["kind"] == "mlp" else torch.from_numpy(prob["y"])
  params = [torch.tensor(a, requires_grad=True) for a in prob["params"]]
  opt = make_opt(params)
  record = set(_record_at(len(prob["batches"])))
  snaps, times = [], []
  for t, idx in enumerate(prob["batches"]):
    i = torch.from_numpy(idx)
    opt.zero_grad()
    loss(params, x[i], y[i]).backward()
    t0 = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t0)
    if t + 1 in record:
      snaps.append([p.detach().numpy().copy() for p in params])
  with torch.no_grad():
    final = float(loss(params, x, y))
  return {"snapshots": snaps, "loss": final, "ms": 1e3 * float(np.median(times[1:]))}


def ours_opt(variant: str, storage: str | None, seed: int) -> optax.GradientTransformation:
  """Our PyTorch preset for ``variant`` (``VARIANTS``), float32 state if ``storage`` is None."""
  kw = dict(VARIANTS[variant])
  if storage is not None:
    kw |= STORAGES[storage] | {"seed": seed}
  return presets.pytorch(lr=LR, alpha=ALPHA, eps=EPS, **kw)


def torch_opt(variant: str, eight_bit: bool) -> Callable[[list[Any]], Any]:
  """``params -> optimizer``: ``torch.optim.RMSprop``, or bitsandbytes' ``RMSprop8bit``."""
  kw = dict(lr=LR, alpha=ALPHA, eps=EPS, **VARIANTS[variant])
  if not eight_bit:
    import torch

    return lambda ps: torch.optim.RMSprop(ps, **kw)
  import bitsandbytes as bnb

  return lambda ps: bnb.optim.RMSprop8bit(ps, min_8bit_size=1, **kw)


def bitsandbytes_available() -> str | None:
  """None where ``bitsandbytes`` imports, else why it does not."""
  try:
    import bitsandbytes  # noqa: F401
  except Exception as e:  # ImportError, or a broken native library
    return f"bitsandbytes not importable ({type(e).__name__}: {e})"
  return None


def compare(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
  """A run against its float32 reference: final distance, loss ratio - 1, ms per step, the curve."""
  curve = [_rel_dist(a, b) for a, b in zip(run["snapshots"], ref["snapshots"])]
  return {"distance": curve[-1], "loss_rel": run["loss"] / ref["loss"] - 1, "ms": run["ms"], "curve": curve}


# ----------------------------------------------------------------- driver


def run(
  quick: bool = False,
  seeds: int = 3,
  *,
  problems: Sequence[str] = PROBLEMS,
  variants: Sequence[str] = tuple(VARIANTS),
  log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Runs every problem, variant and storage, ``seeds`` seeds each.

  Args:
    quick: fewer steps (100 instead of 400) and a smaller least-squares
      problem (8k params): a smoke run.
    seeds: seeds per run (data, initial weights, batches and rounding bits);
      the table reports their means.
    problems: a subset of :data:`PROBLEMS`.
    variants: a subset of :data:`VARIANTS`' keys.
    log: optional callable for progress lines.

  Returns:
    A dict: ``"steps"``, ``"seeds"``, ``"curve_steps"`` (the steps the curves
    are recorded at), ``"peer"`` (None, or why bitsandbytes' rows are
    missing) and ``"rows"``: one dict per problem, implementation, storage and
    variant with ``distance``, ``loss_rel``, ``ms`` (means over seeds),
    ``curve`` (mean distance at ``curve_steps``), ``per_seed`` distances, and
    ``refused`` (the peer's error message) where the peer does not run it.
  """
  for name, given, known in (("problems", problems, PROBLEMS), ("variants", variants, tuple(VARIANTS))):
    unknown = [v for v in given if v not in known]
    if unknown:
      raise ValueError(f"{name} must be among {known}, got {unknown}")
  steps = 100 if quick else 400
  peer = bitsandbytes_available()
  rows: list[dict[str, Any]] = []
  for problem in problems:
    acc: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    refused: dict[tuple[str, str, str], str] = {}
    for seed in range(seeds):
      prob = make_problem(problem, seed, quick, steps)
      for variant in variants:
        ref = run_jax(ours_opt(variant, None, seed), prob)
        acc.setdefault(("ours", "float32", variant), []).append({**compare(ref, ref)})
        for storage in STORAGES:
          out = compare(run_jax(ours_opt(variant, storage, seed), prob), ref)
          acc.setdefault(("ours", storage, variant), []).append(out)
        tref = run_torch(torch_opt(variant, False), prob)
        acc.setdefault(("torch", "float32", variant), []).append({**compare(tref, tref)})
        if peer is None:
          key = ("bitsandbytes", "8-bit", variant)
          try:
            make = torch_opt(variant, True)
            out = compare(run_torch(make, prob), tref)
          except NotImplementedError as e:
            refused[key] = str(e)
          else:
            acc.setdefault(key, []).append(out)
        if log is not None:
          log(f"  fidelity {problem:<14} seed {seed} {variant}")
    for (impl, storage, variant), outs in acc.items():
      rows.append(
        {
          "problem": problem,
          "impl": impl,
          "storage": storage,
          "variant": variant,
          "distance": float(np.mean([o["distance"] for o in outs])),
          "loss_rel": float(np.mean([o["loss_rel"] for o in outs])),
          "ms": float(np.mean([o["ms"] for o in outs])),
          "curve": [float(v) for v in np.mean([o["curve"] for o in outs], axis=0)],
          "per_seed": [o["distance"] for o in outs],
        }
      )
    for (impl, storage, variant), why in refused.items():
      rows.append({"problem": problem, "impl": impl, "storage": storage, "variant": variant, "refused": why})
  order = {(i, s): k for k, (i, s) in enumerate(_ROW_ORDER)}
  rows.sort(
    key=lambda r: (
      PROBLEMS.index(r["problem"]),
      order[r["impl"], r["storage"]],
      list(VARIANTS).index(r["variant"]),
    )
  )
  return {"steps": steps, "seeds": seeds, "curve_steps": _record_at(steps), "peer": peer, "rows": rows}


_ROW_ORDER = [("ours", "float32"), ("torch", "float32"), ("ours", "8-bit"), ("bitsandbytes", "8-bit")]
_ROW_ORDER += [("ours", "bfloat16 nu")]


def format_table(result: dict[str, Any]) -> str:
  """The table of :func:`run`'s result, one line per run.

  Args:
    result: the dict :func:`run` returns.

  Returns:
    The table as text: a header, then per problem and run the distance to
    float32, the final loss vs float32 and the ms per step (or the peer's
    refusal).

  Example:
    >>> from rmsprop_jax import fidelity
    >>> row = dict(problem="digits_mlp", impl="ours", storage="8-bit", variant="plain")
    >>> row |= dict(distance=0.02, loss_rel=-0.019, ms=0.22)
    >>> res = {"steps": 400, "seeds": 3, "peer": None, "rows": [row]}
    >>> print(fidelity.format_table(res).splitlines()[-1])
    digits_mlp     ours, 8-bit               plain           2.00e-02       -1.90%    0.220
  """
  lines = [
    f"fidelity: relative L2 distance of the params to the same framework's float32 run after"
    f" {result['steps']} steps, final training loss vs float32, median ms per optimizer step;"
    f" mean of {result['seeds']} seed(s)",
    "",
    f"{'problem':<15}{'run':<26}{'variant':<14}{'distance':>10}{'loss vs f32':>13}{'ms/step':>9}",
  ]
  names = {"ours": "ours", "torch": "torch", "bitsandbytes": "bitsandbytes"}
  for r in result["rows"]:
    run_name = f"{names[r['impl']]}, {r['storage']}"
    head = f"{r['problem']:<15}{run_name:<26}{r['variant']:<14}"
    if "refused" in r:
      lines.append(f"{head}{'refused: ' + r['refused']:>32}")
      continue
    if r["storage"] == "float32":
      lines.append(f"{head}{'-':>10}{'-':>13}{r['ms']:>9.3f}")
      continue
    lines.append(f"{head}{r['distance']:>10.2e}{100 * r['loss_rel']:>+12.2f}%{r['ms']:>9.3f}")
  if result["peer"] is not None:
    lines.append(f"bitsandbytes rows missing: {result['peer']}")
  return "\n".join(lines)
