"""Optimizer state from and to PyTorch and Keras: port a run, not just the code.

A run ported with :mod:`rmsprop_jax.presets` alone restarts RMSProp from zero:
the second moment, the momentum buffer and the step count are lost, and the
first steps after the port are too large. :func:`from_torch` and
:func:`from_keras` carry the state across; :func:`to_torch` and
:func:`to_keras` carry it back. The state maps one to one:

==================================  =========================  ============================
:class:`~rmsprop_jax.RMSPropState`  ``torch.optim.RMSprop``    ``keras.optimizers.RMSprop``
==================================  =========================  ============================
``count``                           ``step`` (per parameter)   ``iterations``
``nu``                              ``square_avg``             ``velocity``
``mu`` (centered)                   ``grad_avg``               ``average_gradient``
``trace`` (momentum)                ``momentum_buffer``        ``-momentum``
==================================  =========================  ============================

Each buffer holds what the matching preset's ``trace`` holds: torch's the
unscaled steps ``g / (sqrt(v) + eps)`` (the learning rate multiplies its
output), Keras's the learning-rate-scaled steps it subtracts from the weights.
``trace`` holds steps as updates, to be added: hence Keras's sign.

The parameters are matched by position: the leaves of ``params`` in
``jax.tree.leaves`` order are the framework's parameters in its order (torch:
the param groups' parameters, group after group; Keras: the variables the
optimizer was built with). torch and Keras are imported only by the functions
that take their optimizers.

Smaller state: :func:`from_torch` and :func:`from_keras` take the keywords of
:class:`~rmsprop_jax.StorageOptions` (``state_bits=8``,
``nu_dtype=jnp.bfloat16``, ...). The framework's float32 moments are then
stored that way (rounded to nearest, once; centered 8-bit state keeps
``nu - mu**2``, computed in float64), and the run continues with the smaller
state. Without them the state is float32, bit for bit the framework's.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import presets, quantize
from rmsprop_jax.diagnostics import dequantize_state
from rmsprop_jax.quantize import QuantizedArray
from rmsprop_jax.storage import StorageOptions, Stored, is_centered_variance
from rmsprop_jax.transform import RMSPropState

if TYPE_CHECKING:
  from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = ["from_keras", "from_torch", "to_keras", "to_torch"]

LearningRate: TypeAlias = optax.ScalarOrSchedule | Sequence[optax.ScalarOrSchedule] | None

_LR_RTOL = 1e-5  # a float32 schedule against the framework's float64 value


class _Slots(NamedTuple):
  """One parameter's state as NumPy arrays; None where the framework has none."""

  nu: np.ndarray | None = None
  mu: np.ndarray | None = None
  trace: np.ndarray | None = None


class _Moments(NamedTuple):
  """One parameter's state read from ours, as NumPy arrays (None: no such buffer)."""

  nu: np.ndarray
  mu: np.ndarray | None
  trace: np.ndarray | None


class _Group(NamedTuple):
  """Parameters (by position) that share one preset."""

  settings: tuple[tuple[str, Any], ...]  # preset keyword arguments but the lr
  learning_rate: optax.ScalarOrSchedule
  positions: list[int]


# ---------------------------------------------------------------------------
# Framework-neutral: positions, groups, and states built or read by position.
# ---------------------------------------------------------------------------


def _leaves_and_paths(params: optax.Params) -> tuple[list[jax.Array], list[str], jax.tree_util.PyTreeDef]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [f"params{jax.tree_util.keystr(path)}" for path, _ in flat]
  return [jnp.asarray(leaf) for _, leaf in flat], paths, treedef


def _check_positions(
  kind: str,
  shapes: Sequence[Sequence[int] | None],
  leaves: Sequence[jax.Array | np.ndarray],
  paths: Sequence[str] | None = None,
) -> None:
  """The framework's parameters and ours (``params``, or the state), one to one."""
  ours = "params" if paths is not None else "the state"
  if len(shapes) != len(leaves):
    raise ValueError(
      f"{ours} has {len(leaves)} parameters but the {kind} has {len(shapes)};"
      " they are matched by position (jax.tree.leaves order)"
    )
  for i, (shape, leaf) in enumerate(zip(shapes, leaves)):
    if shape is not None and tuple(shape) != leaf.shape:
      where = f"position {i} ({paths[i]})" if paths is not None else f"position {i}"
      raise ValueError(
        f"{where}: the {kind}'s parameter has shape {tuple(shape)}, but {ours} has shape {leaf.shape}"
      )


def _merge_groups(groups: list[_Group]) -> list[_Group]:
  """Groups with the same settings and learning rate become one."""
  merged: dict[tuple[tuple[tuple[str, object], ...], optax.ScalarOrSchedule], _Group] = {}
  for g in groups:
    key = (g.settings, g.learning_rate)
    if key in merged:
      merged[key].positions.extend(g.positions)
    else:
      merged[key] = g._replace(positions=list(g.positions))
  return list(merged.values())


def _build(
  make: Callable[[_Group], optax.GradientTransformation],
  groups: Sequence[_Group],
  labels: Sequence[str],
  treedef: jax.tree_util.PyTreeDef,
) -> optax.GradientTransformation:
  """One preset, or ``optax.multi_transform`` over one preset per group."""
  if len(groups) == 1:
    return make(groups[0])
  leaf_labels: list[str | None] = [None] * treedef.num_leaves
  for label, g in zip(labels, groups):
    for i in g.positions:
      leaf_labels[i] = label
  return optax.multi_transform(
    {label: make(g) for label, g in zip(labels, groups)},
    jax.tree.unflatten(treedef, leaf_labels),
  )


def _type_name(x: object) -> str:
  return f"{type(x).__module__}.{type(x).__qualname__}"


def _is_rms(x: object) -> bool:
  return isinstance(x, RMSPropState)


def _is_masked(x: object) -> bool:
  return isinstance(x, optax.MaskedNode)


_StateLeaf: TypeAlias = Stored | optax.MaskedNode  # a position multi_transform masks out: a MaskedNode


def _flat(tree: optax.Updates) -> tuple[list[_StateLeaf], jax.tree_util.PyTreeDef]:
  """Leaves by position; a masked-out position (multi_transform) is a MaskedNode,
  an 8-bit moment one QuantizedArray."""
  return jax.tree.flatten(tree, is_leaf=lambda x: _is_masked(x) or isinstance(x, QuantizedArray))


def _state_leaf(value: np.ndarray | None, like: Stored) -> Stored:
  """``value`` stored as ``like`` is (dtype, 8-bit codes and their map, sharding); None: ``like``.

  Narrower storage rounds to nearest: one rounding of the ported value.
  """
  if value is None:
    return like
  if isinstance(like, QuantizedArray):
    signed = like.codes.dtype == jnp.int8
    q = quantize.quantize(jnp.asarray(value, jnp.float32), signed=signed, code=like.code)
    return QuantizedArray(
      jax.device_put(q.codes, like.codes.sharding), jax.device_put(q.scale, like.scale.sharding), q.code
    )
  return jax.device_put(jnp.asarray(value, dtype=like.dtype), like.sharding)


def _fill(state: optax.OptState, slots: Sequence[_Slots], count: int) -> optax.OptState:
  """``state`` with every RMSPropState's leaves replaced by ``slots``."""

  def fill_one(st: RMSPropState) -> RMSPropState:
    nus, treedef = _flat(st.nu)
    mus = _flat(st.mu)[0] if st.mu is not None else [None] * len(nus)
    traces = _flat(st.trace)[0] if st.trace is not None else [None] * len(nus)
    out: dict[str, list[_StateLeaf | None]] = {"nu": [], "mu": [], "trace": []}
    for nu, mu, trace, s in zip(nus, mus, traces, slots):
      if _is_masked(nu):
        out["nu"].append(nu)
        out["mu"].append(mu)
        out["trace"].append(trace)
        continue
      nu_value = s.nu
      if is_centered_variance(nu, mu) and s.nu is not None:
        # Centered 8-bit state keeps nu - mu**2 in nu's place (see the update).
        mu_value = np.zeros_like(s.nu) if s.mu is None else s.mu
        wide = np.asarray(s.nu, np.float64) - np.square(np.asarray(mu_value, np.float64))
        nu_value = np.maximum(wide, 0).astype(np.float32)
      out["nu"].append(_state_leaf(nu_value, nu))
      out["mu"].append(None if mu is None else _state_leaf(s.mu, mu))
      out["trace"].append(None if trace is None else _state_leaf(s.trace, trace))
    tree = lambda name, old: None if old is None else jax.tree.unflatten(treedef, out[name])
    return RMSPropState(
      count=jnp.asarray(count, st.count.dtype),
      nu=tree("nu", st.nu),
      mu=tree("mu", st.mu),
      trace=tree("trace", st.trace),
    )

  return jax.tree.map(lambda x: fill_one(x) if _is_rms(x) else x, state, is_leaf=_is_rms)


def _init_state(
  opt: optax.GradientTransformation,
  leaves: list[jax.Array],
  treedef: jax.tree_util.PyTreeDef,
  slots: list[_Slots],
  count: int,
) -> optax.OptState:
  return _fill(opt.init(jax.tree.unflatten(treedef, leaves)), slots, count)


def _numpy(x: Any) -> np.ndarray:
  """A state array (JAX, NumPy, a Keras backend's tensor) as a writable NumPy array, bfloat16 widened."""
  arr = np.array(jax.device_get(x))
  return arr if arr.dtype.kind in "fc" else arr.astype(np.float32)


class _Read(NamedTuple):
  """Our state by position, as the framework's side needs it."""

  slots: list[_Moments]
  counts: list[int]


def _read(opt: optax.GradientTransformation, state: optax.OptState) -> _Read:
  """Every position's ``nu``, ``mu``, ``trace`` and ``count`` from ``state``."""
  found = [s for s in jax.tree.leaves(state, is_leaf=_is_rms) if _is_rms(s)]
  if not found:
    raise ValueError("state must contain an RMSPropState, found none")
  n = None
  by_position: dict[int, tuple[_Moments, int]] = {}
  treedef = None
  for st in found:
    st = dequantize_state(st)  # 8-bit codes, bfloat16 nu: float32 moments
    try:
      count = int(np.asarray(st.count))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      raise ValueError("state.count must be a concrete value, not a tracer (call outside jit)") from None
    nu, treedef = _flat(st.nu)
    if n is None:
      n = len(nu)
    elif len(nu) != n:
      raise ValueError(f"the RMSPropStates in state cover {n} and {len(nu)} parameters")
    mu = _flat(st.mu)[0] if st.mu is not None else [None] * n
    trace = _flat(st.trace)[0] if st.trace is not None else [None] * n
    for i, (a, b, c) in enumerate(zip(nu, mu, trace)):
      if _is_masked(a):
        continue
      if i in by_position:
        raise ValueError(f"position {i} has state in two RMSPropStates")
      moments = _Moments(_numpy(a), None if b is None else _numpy(b), None if c is None else _numpy(c))
      by_position[i] = moments, count
  assert n is not None and treedef is not None  # found is not empty
  missing = [i for i in range(n) if i not in by_position]
  if missing:
    raise ValueError(f"positions {missing} have no RMSPropState in state")
  slots = [by_position[i][0] for i in range(n)]
  _check_belongs(opt, state, treedef, slots)
  return _Read(slots, [by_position[i][1] for i in range(n)])


def _check_belongs(
  opt: optax.GradientTransformation,
  state: optax.OptState,
  treedef: jax.tree_util.PyTreeDef,
  slots: list[_Moments],
) -> None:
  """``state`` has the structure ``opt.init`` gives for params shaped like it."""
  like = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s.nu.shape, jnp.float32) for s in slots])
  expected: jax.tree_util.PyTreeDef = jax.tree.structure(jax.eval_shape(opt.init, like))
  got = jax.tree.structure(state)
  if expected != got:
    raise ValueError(
      f"state does not belong to opt: opt.init gives a state of structure {expected}, got {got}"
    )


# ---------------------------------------------------------------------------
# Learning rates.
# ---------------------------------------------------------------------------


def _lr_value(lr: optax.ScalarOrSchedule, count: int) -> float:
  return float(lr(jnp.asarray(count, jnp.int32))) if callable(lr) else float(lr)


def _check_lr(given: optax.ScalarOrSchedule, count: int, current: float, where: str) -> None:
  """``given`` (a float or schedule) goes on at the framework's current lr."""
  value = _lr_value(given, count)
  if np.isclose(value, current, rtol=_LR_RTOL, atol=0.0):
    return
  hint = ""
  if callable(given):
    hint = (
      f" A schedule is called with the number of steps taken ({count} here): write it"
      " for the whole run, or shift it (lambda n: schedule(n - offset))."
    )
  raise ValueError(
    f"learning_rate{f'({count})' if callable(given) else ''} is {value:.6g}, but {where} is"
    f" {current:.6g}, so the port would not continue the run.{hint} To change the"
    f" learning rate on purpose, set {where} first."
  )


def _per_group(learning_rate: LearningRate, n_groups: int) -> list[optax.ScalarOrSchedule | None]:
  if isinstance(learning_rate, Sequence) and not isinstance(learning_rate, str):
    if len(learning_rate) != n_groups:
      raise ValueError(
        f"learning_rate has {len(learning_rate)} entries, but the optimizer has {n_groups} param groups"
      )
    return list(learning_rate)
  return [learning_rate] * n_groups


def _hashable_lr(lr: optax.ScalarOrSchedule) -> optax.ScalarOrSchedule:
  return lr if callable(lr) else float(lr)


# ---------------------------------------------------------------------------
# PyTorch.
# ---------------------------------------------------------------------------

_TORCH_KEYS = ("alpha", "eps", "weight_decay", "momentum", "centered", "maximize")


class _TorchView(NamedTuple):
  groups: list[dict[str, Any]]  # hyperparameters of each param group
  group_of: list[int]  # the group of each position
  shapes: list[tuple[int, ...] | None]  # None: not known (a state_dict, no state)
  states: list[Mapping[str, Any] | None]  # torch's state of each position


def _torch_view(optimizer: Any) -> _TorchView:
  """The hyperparameters and state of a torch RMSprop or of its state_dict()."""
  torch = sys.modules.get("torch")
  live = False
  if torch is not None and isinstance(optimizer, torch.optim.Optimizer):
    if not isinstance(optimizer, torch.optim.RMSprop):
      raise TypeError(f"optimizer must be a torch.optim.RMSprop, got {_type_name(optimizer)}")
    live = True
  if not live and not (isinstance(optimizer, Mapping) and {"state", "param_groups"} <= set(optimizer)):
    raise TypeError(
      f"optimizer must be a torch.optim.RMSprop or its state_dict(), got {_type_name(optimizer)}"
    )
  sd = optimizer.state_dict() if live else optimizer
  groups: list[dict[str, Any]] = []
  group_of: list[int] = []
  states: list[Mapping[str, Any] | None] = []
  shapes: list[tuple[int, ...] | None]
  for gi, group in enumerate(sd["param_groups"]):
    missing = [k for k in ("lr", *_TORCH_KEYS) if k not in group]
    if missing:
      raise TypeError(
        f"optimizer must be the state_dict() of a torch.optim.RMSprop, but param_groups[{gi}]"
        f" has no {missing} (keys: {sorted(group)})"
      )
    groups.append(group)
    for index in group["params"]:
      group_of.append(gi)
      states.append(sd["state"].get(index) or None)
  for i, st in enumerate(states):
    if st is not None and "square_avg" not in st:
      raise TypeError(
        "optimizer must be (the state_dict() of) a torch.optim.RMSprop, but the"
        f" state of parameter {i} has no 'square_avg' (keys: {sorted(st)})"
      )
  if live:
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    shapes = [tuple(p.shape) for p in tensors]
    complex_ = [i for i, p in enumerate(tensors) if p.is_complex()]
  else:
    shapes = [None if st is None else tuple(st["square_avg"].shape) for st in states]
    complex_ = [i for i, st in enumerate(states) if st is not None and st["square_avg"].is_complex()]
  if complex_:
    raise ValueError(
      f"parameters {complex_} are complex: torch's RMSprop treats their real and"
      " imaginary parts as separate entries (a complex square_avg), RMSPropState"
      " keeps one real second moment per entry, so this cannot be ported"
    )
  return _TorchView(groups, group_of, shapes, states)


def _torch_numpy(t: Any) -> np.ndarray:
  """A torch tensor's values as a NumPy array (a copy; bfloat16 widened)."""
  t = t.detach().cpu()
  try:
    return np.array(t.numpy())
  except (TypeError, RuntimeError):
    return np.array(t.float().numpy())


def _torch_steps(view: _TorchView) -> list[int | None]:
  return [None if st is None else int(round(float(st["step"]))) for st in view.states]


def _torch_groups(view: _TorchView, learning_rate: LearningRate, count: int) -> list[_Group]:
  """One validated group per torch param group, with its learning rate."""
  groups: list[_Group] = []
  for gi, (group, lr) in enumerate(zip(view.groups, _per_group(learning_rate, len(view.groups)))):
    where = f"param_groups[{gi}]['lr']"
    current = float(group["lr"])
    if lr is None:
      lr = current
    else:
      _check_lr(lr, count, current, where)
    g = _Group(
      tuple((k, group[k]) for k in _TORCH_KEYS),
      _hashable_lr(lr),
      [i for i, owner in enumerate(view.group_of) if owner == gi],
    )
    try:
      _torch_preset(g)
    except (TypeError, ValueError) as e:
      raise type(e)(f"param_groups[{gi}]: {e}") from e
    groups.append(g)
  return groups


def _torch_preset(
  g: _Group, lr: optax.ScalarOrSchedule | None = None, storage: StorageOptions | None = None
) -> optax.GradientTransformation:
  return presets.pytorch(lr=g.learning_rate if lr is None else lr, **dict(g.settings), **(storage or {}))


def _check_count_irrelevant(groups: list[_Group], steps: list[int | None], count: int) -> None:
  """Torch counts steps per parameter, RMSPropState once: refuse when it matters.

  Torch's RMSprop has no bias correction and its learning rate lives in the
  param group (a schedule is checked against it at the shared count), so the
  count does not change a torch update today. In case a preset ever reads it,
  a one-entry probe per group compares the update (at the group's current
  learning rate) at each parameter's own count with the one at the shared count.
  """
  for gi, g in enumerate(groups):
    own = sorted({s for s in (steps[i] for i in g.positions) if s is not None} - {count})
    if not own:
      continue
    opt = _torch_preset(g, lr=_lr_value(g.learning_rate, count))
    p = jnp.full((1,), 0.5, jnp.float32)
    state = opt.init(p)
    probe = [
      opt.update(jnp.full((1,), 0.3, jnp.float32), _fill(state, [_Slots(np.full((1,), 0.2))], c), p)[0]
      for c in (count, *own)
    ]
    if any(not np.array_equal(probe[0], q) for q in probe[1:]):
      raise ValueError(
        f"the parameters' step counts differ (param_groups[{gi}] has parameters at steps"
        f" {own}, the maximum is {count}); RMSPropState keeps one count, and this"
        " optimizer's update depends on it, so the port would not continue the run"
      )


def from_torch(
  optimizer: Any,
  params: optax.Params,
  *,
  learning_rate: LearningRate = None,
  **storage: Unpack[StorageOptions],
) -> tuple[optax.GradientTransformationExtraArgs, optax.OptState]:
  r"""A ``torch.optim.RMSprop`` mid-run as an optax optimizer and its state.

  Reads each param group's hyperparameters and each parameter's
  ``square_avg``, ``momentum_buffer``, ``grad_avg`` and ``step``, and returns
  :func:`rmsprop_jax.presets.pytorch` with the same settings and a state from
  which it continues torch's trajectory:

  .. math::

    \nu = \mathtt{square\_avg}, \quad \mu = \mathtt{grad\_avg},

    b = \mathtt{momentum\_buffer}, \quad t = \max_i \mathtt{step}_i

  Several param groups with different hyperparameters become one
  ``optax.multi_transform`` over one preset per group (labels
  ``"param_group_0"``, ...). A parameter torch has not stepped yet (no state)
  starts from zero, as in torch. Torch counts steps per parameter, we count
  once: the count is their maximum (the count never enters torch's update;
  if it ever entered ours, differing counts are refused).

  Args:
    optimizer: a live ``torch.optim.RMSprop``, or its ``state_dict()`` (whose
      param groups carry the constructor's settings). Not modified.
    params: the JAX parameters, a pytree whose leaves in ``jax.tree.leaves``
      order are the torch parameters in the order of the param groups (group
      after group). NumPy or JAX arrays; the state gets their dtypes.
    learning_rate: None (default) continues with each group's current ``lr``,
      a constant. A torch ``lr_scheduler`` lives outside the optimizer, so to
      keep a schedule pass it here as an optax schedule (one for all groups,
      or a sequence with one per group): it is called with the number of steps
      taken, which continues from torch's ``step``, so a schedule written for
      the whole run resumes where torch's scheduler (stepped once per
      optimizer step) is, e.g. ``StepLR(opt, 30, 0.1)`` is
      ``optax.exponential_decay(lr, 30, 0.1, staircase=True)``. Its value at
      the current step must equal the group's ``lr`` (rtol 1e-5), else this
      raises: a shifted schedule is caught before it runs.
    **storage: the state's storage, the keywords of
      :class:`~rmsprop_jax.StorageOptions`, to which the ported moments are
      rounded once (see :mod:`rmsprop_jax.interop`).

  Returns:
    ``(opt, state)``: the optimizer and its state, ready for
    ``opt.update(grads, state, params)``.

  Raises:
    TypeError: ``optimizer`` is not a torch RMSprop (or its state_dict()).
    ValueError: a count or shape mismatch between the torch parameters and
      ``params`` (naming the position and both shapes), complex parameters,
      a hyperparameter the preset refuses (naming the param group), or a
      ``learning_rate`` that does not continue the run.

  Example:
    >>> import pytest; torch = pytest.importorskip("torch")
    >>> import numpy as np
    >>> from rmsprop_jax import interop
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> topt = torch.optim.RMSprop([w], lr=0.01, momentum=0.9)
    >>> for _ in range(3):
    ...   topt.zero_grad(); (w ** 2).sum().backward(); topt.step()
    >>> opt, state = interop.from_torch(topt, {"w": w.detach().numpy()})
    >>> print(state.count, state.nu["w"].round(4))  # torch's square_avg
    3 [0.0934 0.421 ]

  References:
    https://pytorch.org/docs/stable/generated/torch.optim.RMSprop.html
  """
  storage = presets._storage(storage)
  view = _torch_view(optimizer)
  leaves, paths, treedef = _leaves_and_paths(params)
  _check_positions("torch optimizer", view.shapes, leaves, paths)
  steps = _torch_steps(view)
  count = max([s for s in steps if s is not None], default=0)
  groups = _torch_groups(view, learning_rate, count)
  _check_count_irrelevant(groups, steps, count)
  groups = _merge_groups(groups)
  labels = [f"param_group_{view.group_of[g.positions[0]]}" for g in groups]
  opt = _build(lambda g: _torch_preset(g, storage=storage), groups, labels, treedef)

  def slots(st: Mapping[str, Any] | None) -> _Slots:
    if st is None:
      return _Slots()
    get = lambda k: _torch_numpy(st[k]) if k in st else None
    return _Slots(get("square_avg"), get("grad_avg"), get("momentum_buffer"))

  return opt, _init_state(opt, leaves, treedef, [slots(st) for st in view.states], count)


def to_torch(opt: optax.GradientTransformation, state: optax.OptState, optimizer: Any) -> None:
  """Loads our state into a live ``torch.optim.RMSprop``, so a run can go back.

  Writes each parameter's ``square_avg``, ``grad_avg``, ``momentum_buffer``
  and ``step`` through ``optimizer.load_state_dict``; the optimizer's
  hyperparameters (and any lr scheduler) stay as they are, and its parameters
  are not touched: copy the JAX params into the model yourself.

  Args:
    opt: the optimizer ``state`` belongs to (what :func:`from_torch`
      returned, or any optimizer built from presets); used to check that
      ``state`` is its state.
    state: an :class:`~rmsprop_jax.RMSPropState`, or a state containing one or several
      (``optax.chain``, ``optax.multi_transform``, ...), whose parameters in
      ``jax.tree.leaves`` order are the torch parameters in param-group order.
    optimizer: the ``torch.optim.RMSprop`` to load into; its groups' momentum
      and centered settings must match the state's buffers.

  Raises:
    TypeError: ``optimizer`` is not a live torch RMSprop.
    ValueError: a count or shape mismatch (naming the position and both
      shapes), or a momentum buffer or centered average present on one side
      only.

  Example:
    >>> import pytest; torch = pytest.importorskip("torch")
    >>> import jax.numpy as jnp
    >>> from rmsprop_jax import interop, presets
    >>> opt = presets.pytorch(lr=0.01)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = opt.update(params, opt.init(params), params)[1]
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> topt = torch.optim.RMSprop([w], lr=0.01)
    >>> interop.to_torch(opt, state, topt)
    >>> topt.state[w]["square_avg"], topt.state[w]["step"]
    (tensor([0.0100, 0.0400]), tensor(1.))
  """
  torch = sys.modules.get("torch")
  if torch is None or not isinstance(optimizer, torch.optim.RMSprop):
    raise TypeError(f"optimizer must be a live torch.optim.RMSprop, got {_type_name(optimizer)}")
  view = _torch_view(optimizer)
  ours = _read(opt, state)
  _check_positions("torch optimizer", view.shapes, [s.nu for s in ours.slots])
  scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
  sd = optimizer.state_dict()
  new_state: dict[int, dict[str, Any]] = {}
  indices = [i for group in sd["param_groups"] for i in group["params"]]
  for i, (index, gi, s, count) in enumerate(zip(indices, view.group_of, ours.slots, ours.counts)):
    group = view.groups[gi]
    _check_buffer(
      i,
      "momentum buffer",
      group["momentum"] > 0,
      s.trace,
      f"param_groups[{gi}] has momentum={group['momentum']}",
    )
    _check_buffer(
      i,
      "centered average",
      bool(group["centered"]),
      s.mu,
      f"param_groups[{gi}] has centered={group['centered']}",
    )
    entry = {"step": torch.tensor(float(count), dtype=scalar_dtype), "square_avg": torch.from_numpy(s.nu)}
    if s.trace is not None:
      entry["momentum_buffer"] = torch.from_numpy(s.trace)
    if s.mu is not None:
      entry["grad_avg"] = torch.from_numpy(s.mu)
    new_state[index] = entry
  optimizer.load_state_dict({"state": new_state, "param_groups": sd["param_groups"]})


def _check_buffer(i: int, what: str, framework_has: bool, ours: np.ndarray | None, setting: str) -> None:
  """A momentum buffer or centered average exists on both sides or on neither."""
  if framework_has and ours is None:
    raise ValueError(
      f"position {i}: {setting}, but the state has no {what}; build both with the same settings"
    )
  if not framework_has and ours is not None:
    raise ValueError(
      f"position {i}: the state has a {what}, but {setting}; build both with the same settings"
    )


# ---------------------------------------------------------------------------
# Keras 3.
# ---------------------------------------------------------------------------

# RMSprop.build's names for its variables (add_optimizer_variables names one
# "<the parameter's path>_<kind>"), by the field of our state each one fills.
_KERAS_SLOTS = {"nu": "velocity", "trace": "momentum", "mu": "average_gradient"}


class _Keras:
  """A ``keras.optimizers.RMSprop``, read and written by the port through here alone.

  Public Keras 3 API wherever Keras has some: the constructor's settings
  (``rho``, ``momentum``, ...), ``built``, ``iterations``, ``learning_rate``,
  ``variables`` and their names, ``exclude_from_weight_decay``. Where Keras
  has none, the private attribute itself, read without a default by
  :meth:`_private`: a Keras release that renames it makes the port fail,
  naming it, instead of porting another run (weight decay on the variables
  Keras exempts, a constant learning rate for a schedule).
  """

  def __init__(self, optimizer: Any):
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(optimizer, keras.optimizers.RMSprop):
      raise TypeError(f"optimizer must be a keras.optimizers.RMSprop, got {_type_name(optimizer)}")
    for name, bad in (
      ("use_ema", optimizer.use_ema),
      ("gradient_accumulation_steps", optimizer.gradient_accumulation_steps),
    ):
      if bad:
        raise ValueError(
          f"{name}={bad!r} cannot be ported: the optimizer state carries no"
          " model-weight EMA or gradient accumulators (build the Keras optimizer"
          " without it)"
        )
    self.keras = keras
    self.optimizer = optimizer

  def _unsupported(self, what: str) -> RuntimeError:
    return RuntimeError(
      f"{what} in Keras {self.keras.__version__}, so rmsprop_jax.interop cannot tell what"
      " this optimizer would do; it reads Keras 3's RMSprop (3.5 and later) and this release"
      " is not one it knows"
    )

  def _private(self, name: str, purpose: str) -> Any:
    """``optimizer.<name>``, read because Keras has no public way to get ``purpose``."""
    try:
      return getattr(self.optimizer, name)
    except AttributeError:
      raise self._unsupported(
        f"keras.optimizers.RMSprop has no attribute {name!r} (read for {purpose}, which Keras"
        " has no public accessor for)"
      ) from None

  @property
  def count(self) -> int:
    return int(np.asarray(self.optimizer.iterations))

  @functools.cached_property
  def built_with(self) -> list[Any]:
    """The variables a built optimizer was built with: our parameters, by position."""
    variables = self._private("_trainable_variables", "the variables the optimizer was built with")
    overwritten = [i for i, v in enumerate(variables) if v.overwrite_with_gradient]
    if overwritten:
      raise ValueError(
        f"the optimizer's variables at positions {overwritten} have overwrite_with_gradient=True:"
        " Keras replaces them by their gradient instead of taking an RMSprop step, which"
        " cannot be ported"
      )
    return list(variables)

  def slots(self) -> dict[str, list[Any]]:
    """Each field's variables, in the order of the variables the optimizer was built with.

    Every variable must be accounted for (the iteration count, the learning
    rate, one variable of each kind RMSprop keeps per parameter), so that a
    Keras that keeps more or renames one fails instead of losing it.
    """
    opt = self.optimizer
    n = len(self.built_with) if opt.built else 0
    found: dict[str, list[Any]] = {field: [] for field in _KERAS_SLOTS}
    unknown = []
    for v in opt.variables:
      field = next((f for f, kind in _KERAS_SLOTS.items() if v.name.endswith(f"_{kind}")), None)
      if field is not None:
        found[field].append(v)
      elif not (v is opt.iterations or v.name == "learning_rate"):
        unknown.append(v.name)
    expected = {"nu": n, "trace": n if opt.momentum > 0 else 0, "mu": n if opt.centered else 0}
    if unknown or any(len(found[f]) != expected[f] for f in found):
      kept = ", ".join(f"{len(found[f])} '*_{kind}'" for f, kind in _KERAS_SLOTS.items())
      others = f" and others named {unknown}" if unknown else ""
      raise self._unsupported(
        f"the optimizer (momentum={opt.momentum}, centered={opt.centered}) has {kept}"
        f" variables{others}, not one velocity per parameter with a momentum (if"
        " momentum > 0) and an average_gradient (if centered)"
      )
    return found

  def excluded(self, n: int) -> list[bool]:
    """Which of the ``n`` parameters ``exclude_from_weight_decay`` exempts from weight decay."""
    opt = self.optimizer
    if opt.weight_decay is None:
      return [False] * n
    if not opt.built:
      if self._exclusion_set():
        raise ValueError(
          "exclude_from_weight_decay is set but the optimizer is not built, so it is"
          " not known which parameters it exempts; call optimizer.build(variables) first"
        )
      return [False] * n
    uses = self._private("_use_weight_decay", "whether a variable gets weight decay")
    return [not uses(v) for v in self.built_with]

  def _exclusion_set(self) -> bool:
    """Whether ``exclude_from_weight_decay()`` was called on the optimizer.

    Keras has no getter for it and writes it to private attributes: which
    ones is found by calling the public setter on a fresh optimizer, so that
    no private name is assumed here.
    """
    probe = self.keras.optimizers.RMSprop(name="rmsprop_jax_probe")
    before = set(vars(probe))
    probe.exclude_from_weight_decay(var_names=["probe"])
    written = set(vars(probe)) - before
    if not written:
      raise self._unsupported("exclude_from_weight_decay() sets no attribute of a fresh RMSprop")
    return bool(written & set(vars(self.optimizer)))

  def learning_rate(self, learning_rate: optax.ScalarOrSchedule | None) -> optax.ScalarOrSchedule:
    """The preset's learning rate: ``learning_rate`` if given (checked), else Keras's."""
    opt = self.optimizer
    if learning_rate is not None:
      _check_lr(learning_rate, self.count, float(np.asarray(opt.learning_rate)), "optimizer.learning_rate")
      return _hashable_lr(learning_rate)
    # The public `learning_rate` is the schedule's value at `iterations`, not the schedule.
    schedule = self._private("_learning_rate", "the learning-rate schedule itself")
    if not callable(schedule) or isinstance(schedule, self.keras.Variable):
      return float(np.asarray(opt.learning_rate))
    if not isinstance(schedule, self.keras.optimizers.schedules.LearningRateSchedule):
      raise ValueError(
        "the Keras learning_rate is a callable; pass learning_rate= (a float or"
        " an optax schedule of the iteration count)"
      )
    backend = self.keras.backend.backend()
    if backend != "jax":
      raise ValueError(
        f"the Keras learning_rate is a {type(schedule).__name__}, which JAX can"
        f" call only on Keras's JAX backend (this is {backend!r});"
        " pass learning_rate= an optax schedule of the iteration count, e.g."
        " optax.exponential_decay(...) for ExponentialDecay"
      )

    def keras_schedule(count: jax.Array) -> jax.Array:
      """The Keras schedule itself: on the JAX backend it is a JAX function."""
      return schedule(count)

    return keras_schedule

  def groups(self, lr: optax.ScalarOrSchedule, n: int) -> tuple[list[str], list[_Group]]:
    """One group, or two when ``exclude_from_weight_decay`` exempts some parameters."""
    opt = self.optimizer
    settings = {
      "rho": opt.rho,
      "momentum": opt.momentum,
      "epsilon": opt.epsilon,
      "centered": opt.centered,
      "clipnorm": opt.clipnorm,
      "clipvalue": opt.clipvalue,
      "global_clipnorm": opt.global_clipnorm,
    }
    excluded = self.excluded(n)
    if any(excluded) and opt.global_clipnorm is not None:
      raise ValueError(
        "global_clipnorm with exclude_from_weight_decay cannot be ported: one"
        " global clip would be split between the two groups"
      )
    by_label = {
      "weight_decay": [i for i, e in enumerate(excluded) if not e],
      "no_weight_decay": [i for i, e in enumerate(excluded) if e],
    }
    wd = {"weight_decay": opt.weight_decay, "no_weight_decay": None}
    labels = [k for k, positions in by_label.items() if positions] or ["weight_decay"]
    return labels, [
      _Group(tuple({**settings, "weight_decay": wd[k]}.items()), lr, by_label[k]) for k in labels
    ]


def _keras_values(found: dict[str, list[Any]], field: str, n: int) -> list[np.ndarray | None]:
  """One kind of Keras variable as our state's values (None: start from zero)."""
  sign = -1 if field == "trace" else 1  # Keras subtracts its buffer, we add ours
  return [sign * _numpy(v.value) for v in found[field]] or [None] * n


def _keras_preset(g: _Group, storage: StorageOptions | None = None) -> optax.GradientTransformation:
  return presets.keras(learning_rate=g.learning_rate, **dict(g.settings), **(storage or {}))


def from_keras(
  optimizer: Any,
  params: optax.Params,
  *,
  learning_rate: optax.ScalarOrSchedule | None = None,
  **storage: Unpack[StorageOptions],
) -> tuple[optax.GradientTransformationExtraArgs, optax.OptState]:
  r"""A Keras 3 ``keras.optimizers.RMSprop`` mid-run as an optax optimizer and state.

  Reads the optimizer's settings, its ``iterations`` and its variables
  ``velocity``, ``momentum`` and ``average_gradient``, and returns
  :func:`rmsprop_jax.presets.keras` with the same settings (clipping and
  decoupled weight decay included) and a state from which it continues the
  Keras trajectory:

  .. math::

    t = \mathtt{iterations}, \quad \nu = \mathtt{velocity},

    \mu = \mathtt{average\_gradient}, \quad b = -\mathtt{momentum}

  Keras calls a ``LearningRateSchedule`` with ``iterations``, the number of
  steps taken, which is our count: on Keras's JAX backend the schedule itself
  becomes the preset's schedule and continues exactly. Parameters that
  ``exclude_from_weight_decay`` exempts get a preset without weight decay
  (an ``optax.multi_transform`` with labels ``"weight_decay"`` and
  ``"no_weight_decay"``). ``loss_scale_factor`` only unscales the gradients
  Keras receives: feed ``opt`` the gradients of the unscaled loss.

  Args:
    optimizer: a ``keras.optimizers.RMSprop`` (built or not; an unbuilt one
      has no state yet and starts from zero). Not modified.
    params: the JAX parameters, a pytree whose leaves in ``jax.tree.leaves``
      order are the variables the optimizer was built with, in that order
      (e.g. ``[v.value for v in model.trainable_variables]``). The state gets
      their dtypes.
    learning_rate: None (default) takes the optimizer's: its constant, or its
      schedule (JAX backend only). A float or an optax schedule of the
      iteration count replaces it; its value at the current iteration must
      equal Keras's current learning rate (rtol 1e-5).
    **storage: the state's storage, the keywords of
      :class:`~rmsprop_jax.StorageOptions`, to which the ported moments are
      rounded once (see :mod:`rmsprop_jax.interop`).

  Returns:
    ``(opt, state)``, ready for ``opt.update(grads, state, params)`` (pass
    ``params`` when weight decay is set).

  Raises:
    TypeError: ``optimizer`` is not a Keras RMSprop.
    RuntimeError: a Keras release that keeps the optimizer's state or
      settings where this module does not read them (naming the attribute
      or variables and the Keras version).
    ValueError: a count or shape mismatch (naming the position and both
      shapes), ``use_ema`` or ``gradient_accumulation_steps``, a callable
      learning rate, or a ``learning_rate`` that does not continue the run.

  Example:
    >>> import os; _ = os.environ.setdefault("KERAS_BACKEND", "jax")
    >>> import pytest; keras = pytest.importorskip("keras")
    >>> import numpy as np
    >>> from rmsprop_jax import interop
    >>> w = keras.Variable(np.array([1.0, -2.0], np.float32))
    >>> kopt = keras.optimizers.RMSprop(learning_rate=0.01, momentum=0.9)
    >>> for _ in range(3):
    ...   kopt.apply([2 * w.value], [w])
    >>> opt, state = interop.from_keras(kopt, [np.asarray(w.value)])
    >>> print(state.count, state.nu[0].round(3))  # Keras's velocity
    3 [0.998 4.161]

  References:
    https://keras.io/api/optimizers/rmsprop/
  """
  storage = presets._storage(storage)
  keras = _Keras(optimizer)
  leaves, paths, treedef = _leaves_and_paths(params)
  lr = keras.learning_rate(learning_rate)
  found = keras.slots()
  if optimizer.built:
    _check_positions("Keras optimizer", [tuple(v.shape) for v in keras.built_with], leaves, paths)
  labels, groups = keras.groups(lr, len(leaves))
  opt = _build(lambda g: _keras_preset(g, storage=storage), groups, labels, treedef)
  slots = [_Slots(*s) for s in zip(*(_keras_values(found, f, len(leaves)) for f in _Slots._fields))]
  return opt, _init_state(opt, leaves, treedef, slots, keras.count)


def to_keras(opt: optax.GradientTransformation, state: optax.OptState, optimizer: Any) -> None:
  """Loads our state into a built Keras 3 ``keras.optimizers.RMSprop``.

  Assigns ``iterations`` and each parameter's ``velocity``, ``momentum`` and
  ``average_gradient``; the optimizer's settings and the model's variables
  are not touched (assign the JAX params to the model yourself).

  Args:
    opt: the optimizer ``state`` belongs to (what :func:`from_keras`
      returned, or any optimizer built from presets); used to check that
      ``state`` is its state.
    state: an :class:`~rmsprop_jax.RMSPropState`, or a state containing one or several,
      whose parameters in ``jax.tree.leaves`` order are the optimizer's
      variables in order; all with one count (Keras keeps one).
    optimizer: a built ``keras.optimizers.RMSprop`` (trained, or
      ``optimizer.build(variables)``) whose momentum and centered settings
      match the state.

  Raises:
    TypeError: ``optimizer`` is not a Keras RMSprop.
    RuntimeError: a Keras release that keeps the optimizer's state or
      settings where this module does not read them (naming the attribute
      or variables and the Keras version).
    ValueError: the optimizer is not built, a count or shape mismatch, a
      buffer on one side only, or several different counts.

  Example:
    >>> import os; _ = os.environ.setdefault("KERAS_BACKEND", "jax")
    >>> import pytest; keras = pytest.importorskip("keras")
    >>> import jax.numpy as jnp, numpy as np
    >>> from rmsprop_jax import interop, presets
    >>> opt = presets.keras(learning_rate=0.01)
    >>> params = [jnp.array([1.0, -2.0])]
    >>> state = opt.update(params, opt.init(params), params)[1]
    >>> w = keras.Variable(np.array([1.0, -2.0], np.float32))
    >>> kopt = keras.optimizers.RMSprop(learning_rate=0.01)
    >>> kopt.build([w])
    >>> interop.to_keras(opt, state, kopt)
    >>> int(kopt.iterations), np.asarray(kopt.variables[2].value)
    (1, array([0.1, 0.4], dtype=float32))
  """
  keras = _Keras(optimizer)
  if not optimizer.built:
    raise ValueError("optimizer must be built (optimizer.build(variables)) before its state is loaded")
  ours = _read(opt, state)
  found = keras.slots()
  _check_positions("Keras optimizer", [tuple(v.shape) for v in keras.built_with], [s.nu for s in ours.slots])
  if len(set(ours.counts)) > 1:
    raise ValueError(
      f"Keras keeps one iteration count, but the state has several: {sorted(set(ours.counts))}"
    )
  for i, s in enumerate(ours.slots):
    _check_buffer(
      i,
      "momentum buffer",
      optimizer.momentum > 0,
      s.trace,
      f"the optimizer has momentum={optimizer.momentum}",
    )
    _check_buffer(
      i,
      "centered average",
      bool(optimizer.centered),
      s.mu,
      f"the optimizer has centered={optimizer.centered}",
    )
  for i, s in enumerate(ours.slots):
    found["nu"][i].assign(s.nu)
    if s.trace is not None:
      found["trace"][i].assign(-s.trace)
    if s.mu is not None:
      found["mu"][i].assign(s.mu)
  optimizer.iterations.assign(ours.counts[0])
