"""The bench's cases: their names, trees and optimizers.

A case names what is timed or counted (``CASES``: description, the
implementations compared, the target ratio ours / optax), the leaf shapes of
its tree (:func:`case_shapes`) and the options its optimizers are built with
(:func:`case_options`, a key of ``OPTIONS``). ``make_opt`` builds an
implementation: ``optax`` (``optax.rmsprop``, or a chain of optax's own
transformations where it has no such option) or ours in a storage (``ours``
float32, ``ours_bf16``, ``ours_8bit``).

In-process cases (``IN_PROCESS``) run in the driver's own process and print
a table of their own; :func:`register_in_process` adds one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import rmsprop
from rmsprop_jax.bench import gpt

Case = tuple[str, tuple[str, ...], str]  # description, implementations, target ours / optax

# The step-time cases: each times optax and ours in turn inside fresh processes.
CASES: dict[str, Case] = {
  "big_tree": ("conv-net-like tree (16M params), jitted step, donated", ("optax", "ours", "torch"), "<= 1.0"),
  "big_tree_bf16": ("same, ours with nu_dtype=bfloat16", ("optax", "ours_bf16"), "<= 0.85"),
  "big_tree_8bit": ("same, ours with state_bits=8", ("optax", "ours_8bit"), "<= 1.0"),
  "many_leaves_scan": ("600 leaves x 1,000 params, per step inside lax.scan", ("optax", "ours"), "<= 1.0"),
  "many_leaves_step": ("600 leaves x 1,000 params, one jitted step per call", ("optax", "ours"), "-"),
  "compile_600": ("compile time of the 600-leaf jitted step", ("optax", "ours"), "<= 1.0"),
  "eager_update": ("un-jitted update, 100 leaves x 20k params", ("optax", "ours"), "<= 0.15"),
  "one_big_leaf": ("one 16M-param leaf, jitted step, donated", ("optax", "ours"), "<= 1.0"),
  "scale_out": (
    "8 host devices, data-parallel step, state replicated vs sharded over data (ZeRO-1)",
    ("replicated", "zero1"),
    "-",
  ),
}

# What ``python -m rmsprop_jax bench`` runs without ``--cases``: the README's step-time
# table, the quick set. The model-scale and multi-device cases are named explicitly.
DEFAULT_CASES: tuple[str, ...] = (
  "big_tree",
  "big_tree_bf16",
  "big_tree_8bit",
  "many_leaves_scan",
  "eager_update",
)

# Option sets, by the suffix of a case's name: ours and optax's equivalent are
# built with the same options.
OPTIONS: dict[str, dict[str, Any]] = {
  "plain": {},
  "momentum": {"momentum": 0.9},
  "nesterov": {"momentum": 0.9, "nesterov": True},
  "centered": {"centered": True},
  "cm": {"centered": True, "momentum": 0.9},
  "wd_coupled": {"weight_decay": 1e-2},
  "wd_decoupled": {"weight_decay": 1e-2, "weight_decay_mode": "decoupled"},
  "eps_outside": {"eps_in_sqrt": False},
  "lr_after_momentum": {"momentum": 0.9, "lr_inside_momentum": False},
  "bias_correction": {"bias_correction": True},
}

# Each storage of ours against optax.rmsprop (float32) with the same options.
STORAGE_IMPLS = ("optax", "ours", "ours_bf16", "ours_8bit")


def _scale_cases() -> dict[str, Case]:
  """Model-scale cases, plain and centered with momentum (``_cm``); peak bytes also with momentum."""
  out: dict[str, Case] = {}
  for suffix, with_ in (("", ""), ("_cm", ", centered+momentum")):
    out[f"init_eager{suffix}"] = (
      f"first eager opt.init(params), 99M params in 56 transformer leaves made under jit{with_}",
      STORAGE_IMPLS,
      "<= 1.5",
    )
    out[f"init_jit{suffix}"] = (f"first jax.jit(opt.init)(params), same tree{with_}", STORAGE_IMPLS, "<= 1.5")
    for n in (200, 600):
      out[f"compile_{n}_leaves{suffix}"] = (
        f"trace + compile of the donated step, {n} leaves of 256x1024{with_}",
        STORAGE_IMPLS,
        "<= 1.5 (float32 <= 1.0)",
      )
  for suffix, name in (("", "plain"), ("_momentum", "momentum"), ("_cm", "cm")):
    out[f"peak_bytes{suffix}"] = (
      f"peak bytes per param (memory_analysis), optimizer step and MLP train step, {name}",
      STORAGE_IMPLS,
      "train: <= optax - state saved + 0.3 (+ copy)",
    )
  return out


SCALE_CASES: dict[str, Case] = _scale_cases()
STEP_8BIT_CASES: dict[str, Case] = {
  f"step_8bit_{name}": (
    f"conv-net tree (16M params), donated step, 8-bit state vs optax float32, {name}",
    ("optax", "ours_8bit"),
    "<= 1.3",
  )
  for name in OPTIONS
}
# The whole train step of a GPT-like model (``bench.gpt``), its layers unrolled or under
# ``lax.scan``, plain and centered with momentum (``_cm``).
TRAIN_STEP_CASES: dict[str, Case] = {
  f"train_step_{layout}{suffix}": (
    f"whole jitted, donated train step of a 42M-param GPT, {what}{with_}",
    STORAGE_IMPLS,
    "compile <= 1.3, step <= 1.0" if layout == "scanned" else "compile <= 1.15, step <= 1.0",
  )
  for layout, what in (
    ("unscanned", "12 layers unrolled (148 leaves)"),
    ("scanned", "12 layers under lax.scan (16 leaves)"),
  )
  for suffix, with_ in (("", ""), ("_cm", ", centered+momentum"))
}
CASES |= SCALE_CASES | STEP_8BIT_CASES | TRAIN_STEP_CASES

# Names that select several cases at once (``--cases init step_8bit``).
CASE_GROUPS: dict[str, tuple[str, ...]] = {
  group: tuple(c for c in CASES if c.startswith(prefix))
  for group, prefix in (
    ("init", "init_"),
    ("compile", "compile_"),
    ("peak", "peak_bytes"),
    ("step_8bit", "step_8bit_"),
    ("train_step", "train_step_"),
  )
}
CASE_GROUPS["all"] = tuple(CASES)

# Cases that need several devices, and how many: their workers (and only
# theirs) run on that many host CPU devices (--xla_force_host_platform_device_count).
HOST_DEVICES: dict[str, int] = {"scale_out": 8}

# Cases run one implementation per fresh process: a first compile (or a first
# init), and the multi-device case. Every other case times its JAX
# implementations paired, in one process; torch always runs in processes of its own.
UNPAIRED: frozenset[str] = frozenset({"compile_600", *HOST_DEVICES, *SCALE_CASES, *TRAIN_STEP_CASES})

# Processes per implementation when ``--repeats`` is not given. A train-step
# process compiles a 42M-param model (10-60 s on two cores): one process per
# implementation keeps the 16 of them under 10 minutes; ``--repeats 3`` for a median.
DEFAULT_REPEATS = 5
CASE_REPEATS: dict[str, int] = dict.fromkeys(TRAIN_STEP_CASES, 1)

# Cases whose numbers are deterministic (bytes, not times): one process each.
DETERMINISTIC: frozenset[str] = frozenset(c for c in SCALE_CASES if c.startswith("peak_bytes"))


class InProcessCase(NamedTuple):
  """A case that runs in the driver's process and prints its own table.

  Attributes:
    what: a one-line description.
    run: ``run(quick)`` measures and returns JSON-serialisable results.
    table: ``table(results)`` formats them for the bench's printout.
  """

  what: str
  run: Callable[[bool], dict[str, Any]]
  table: Callable[[dict[str, Any]], str]


# Name -> in-process case; ``expand_cases`` accepts these names too.
IN_PROCESS: dict[str, InProcessCase] = {}


def register_in_process(
  name: str, what: str, run: Callable[[bool], dict[str, Any]], table: Callable[[dict[str, Any]], str]
) -> None:
  """Adds an in-process case, selected by ``--cases NAME``.

  Args:
    name: the case's name (not a name of ``CASES`` or ``CASE_GROUPS``).
    what: a one-line description.
    run: ``run(quick) -> results``; import heavy or optional dependencies inside it.
    table: ``table(results) -> str``, printed after the other cases' tables.

  Example:
    >>> from rmsprop_jax import bench
    >>> bench.register_in_process("toy", "a toy", lambda quick: {"n": 1}, lambda r: f"toy: {r['n']}")
    >>> bench.expand_cases(["toy"])
    ['toy']
    >>> del bench.IN_PROCESS["toy"]
  """
  if name in CASES or name in CASE_GROUPS:
    raise ValueError(f"name {name!r} is already a case or a group")
  IN_PROCESS[name] = InProcessCase(what, run, table)


def expand_cases(cases: list[str] | None) -> list[str]:
  """Case names, ``DEFAULT_CASES`` for None, each group name (``CASE_GROUPS``) replaced by its cases."""
  out: list[str] = []
  for c in DEFAULT_CASES if cases is None else cases:
    for case in CASE_GROUPS.get(c, (c,)):
      if case not in CASES and case not in IN_PROCESS:
        known = sorted([*CASES, *IN_PROCESS])
        raise ValueError(f"unknown case {case!r}; choose from {known} or a group {sorted(CASE_GROUPS)}")
      if case not in out:
        out.append(case)
  return out


def case_options(case: str) -> str:
  """The option set (a key of ``OPTIONS``) a case builds its optimizers with."""
  if case.startswith("step_8bit_"):
    return case[len("step_8bit_") :]
  for suffix, name in (("_cm", "cm"), ("_momentum", "momentum")):
    if (case in SCALE_CASES or case in TRAIN_STEP_CASES) and case.endswith(suffix):
      return name
  return "plain"


# ----------------------------------------------------------------- trees


def conv_net_shapes(quick: bool = False) -> list[tuple[int, ...]]:
  """Leaf shapes of a ResNet-like model (16.2M params in 57 leaves): 3x3 convs, norm scales and
  biases, a head."""
  widths, depth = ((8, 16, 32, 64), 2) if quick else ((64, 128, 256, 512), 4)
  shapes: list[tuple[int, ...]] = [(7, 7, 3, widths[0])]
  prev = widths[0]
  for i, w in enumerate(widths):
    n = depth + (2 if i == len(widths) - 1 else 0)
    for _ in range(n):
      shapes += [(3, 3, prev, w), (w,), (w,)]
      prev = w
  shapes += [(prev, 1000), (1000,)]
  return shapes


def transformer_shapes(quick: bool = False) -> list[tuple[int, ...]]:
  """56 leaves of a 6-layer transformer (99.1M params): embedding, per layer a
  norm scale, q/k/v/o projections, a norm scale, the MLP (with its bias), and a
  final norm scale."""
  vocab, d, ffn, layers = (512, 64, 256, 6) if quick else (23040, 1024, 4096, 6)
  shapes: list[tuple[int, ...]] = [(vocab, d)]
  for _ in range(layers):
    shapes += [(d,), (d, d), (d, d), (d, d), (d, d), (d,), (d, ffn), (ffn,), (ffn, d)]
  return shapes + [(d,)]


def mlp_shapes(quick: bool = False) -> list[tuple[int, ...]]:
  """An MLP of 6 layers of 2048x2048 (25.2M params), weights and biases."""
  width = 64 if quick else 2048
  return [s for _ in range(6) for s in ((width, width), (width,))]


def case_shapes(case: str, quick: bool = False) -> list[tuple[int, ...]]:
  """The leaf shapes of a case's tree; ``quick``: a tiny tree of the same kind."""
  if case.startswith("big_tree") or case == "scale_out":
    return conv_net_shapes(quick)
  if case in ("many_leaves_scan", "many_leaves_step", "compile_600"):
    return [(1000,)] * (60 if quick else 600)
  if case == "eager_update":
    return [(20_000,)] * (10 if quick else 100)
  if case == "one_big_leaf":
    return [(1 << 14 if quick else 1 << 24,)]
  if case.startswith("step_8bit_"):  # quick: a few quantized leaves and a bias
    return [(64, 256), (64, 256), (256,)] if quick else conv_net_shapes()
  if case.startswith("init_"):
    return transformer_shapes(quick)
  if case.startswith("compile_") and case in SCALE_CASES:
    n = int(case.split("_")[1])
    return [(16, 64) if quick else (256, 1024)] * (n // 10 if quick else n)
  if case.startswith("peak_bytes"):
    return mlp_shapes(quick)
  if case in TRAIN_STEP_CASES:
    return gpt.leaf_shapes(gpt_config(quick), scanned="_scanned" in case)
  raise ValueError(f"unknown case {case!r}; choose from {sorted(CASES)}")


def gpt_config(quick: bool = False) -> gpt.GPTConfig:
  """The train step's model: 12 layers, d_model 512, 8 heads, vocab 8192, context 128, batch 4
  (``quick``: 2 layers of width 64)."""
  return gpt.QUICK if quick else gpt.GPTConfig()


def make_tree(shapes: list[tuple[int, ...]], dtype: Any = "float32", seed: int = 0) -> dict[str, jax.Array]:
  """Standard-normal leaves ``p000``, ``p001``, ... drawn with NumPy (``jax.random`` would
  compile once per shape)."""
  rng = np.random.default_rng(seed)
  return {
    f"p{i:03d}": jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype=jnp.dtype(dtype))
    for i, s in enumerate(shapes)
  }


def abstract_tree(shapes: list[tuple[int, ...]]) -> dict[str, jax.ShapeDtypeStruct]:
  """The float32 leaves of :func:`make_tree` as ``jax.ShapeDtypeStruct`` s (nothing allocated)."""
  return {f"p{i:03d}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}


# ----------------------------------------------------------------- optimizers

STORAGES: dict[str, dict[str, Any]] = {
  "ours": {},
  "ours_bf16": {"nu_dtype": jnp.bfloat16},
  "ours_8bit": {"state_bits": 8},
}
LEARNING_RATE = 1e-3


def make_opt(impl: str, options: str = "plain") -> optax.GradientTransformation:
  """An implementation with the named ``OPTIONS``: ``optax`` (float32) or ours in a storage.

  Args:
    impl: ``optax``, ``ours`` (float32 state), ``ours_bf16`` (``nu_dtype=jnp.bfloat16``) or
      ``ours_8bit`` (``state_bits=8``).
    options: a key of ``OPTIONS``.

  Returns:
    The optimizer, learning rate ``1e-3``. ``optax`` computes our float32 step: ``optax.rmsprop``
    where it has the option, PyTorch's order (learning rate after the buffer) and weight decay as
    chains of optax's own transformations.
  """
  kw = OPTIONS[options]
  if impl == "optax":
    return _optax_equivalent(kw)
  if impl not in STORAGES:
    raise ValueError(f"impl must be 'optax' or one of {sorted(STORAGES)}, got {impl!r}")
  return rmsprop(LEARNING_RATE, **kw, **STORAGES[impl])


def _optax_equivalent(kw: dict[str, Any]) -> optax.GradientTransformation:
  """optax's float32 RMSProp with the options ``kw`` of :func:`rmsprop_jax.rmsprop`."""
  lr = LEARNING_RATE
  kw = dict(kw)
  wd = kw.pop("weight_decay", 0.0)
  mode = kw.pop("weight_decay_mode", "coupled")
  if kw.pop("lr_inside_momentum", True):
    core = optax.rmsprop(lr, **kw)
  else:  # the buffer accumulates unscaled steps, the learning rate scales its output
    momentum, nesterov = kw.pop("momentum"), kw.pop("nesterov", False)
    scale = optax.scale_by_stddev if kw.pop("centered", False) else optax.scale_by_rms
    core = optax.chain(scale(**kw), optax.trace(momentum, nesterov), optax.scale(-lr))
  if not wd:
    return core
  if mode == "coupled":
    return optax.chain(optax.add_decayed_weights(wd), core)
  return optax.chain(core, optax.add_decayed_weights(-lr * wd))


def scale_out_opt() -> optax.GradientTransformation:
  """The optimizer of ``scale_out``: ``rmsprop(1e-3, momentum=0.9)``, two copies of the model."""
  return rmsprop(LEARNING_RATE, momentum=0.9)


def n_params(shapes: list[tuple[int, ...]]) -> int:
  """The parameters of a tree of these leaf shapes."""
  return sum(math.prod(s) for s in shapes)
