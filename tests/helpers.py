"""Small shared helpers: run an optax-style optimizer for a few steps."""

from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

PARAMS0 = {
  "w": np.array([[0.5, -1.2, 2.0], [0.3, 0.0, -0.7]], np.float32),
  "b": np.array([1.5, -0.25], np.float32),
}


def fixed_grads(steps: int, seed: int = 0, scale: float = 1.0):
  """A fixed sequence of gradient dicts shaped like PARAMS0 (float32)."""
  rng = np.random.default_rng(seed)
  return [
    {k: (scale * rng.normal(size=v.shape) * (1 + 0.1 * t)).astype(np.float32) for k, v in PARAMS0.items()}
    for t in range(steps)
  ]


def jax_param_grad(params):
  """JAX twin of reference.ParamGrad: grad of sum(p^2 / 2 + p^4 / 40)."""
  return jax.tree.map(lambda v: v + 0.1 * v**3, params)


def _wide(x):
  """float64 (complex128 for complex) NumPy copy of ``x``."""
  return np.asarray(x, np.complex128 if jnp.iscomplexobj(x) else np.float64)


def run(opt, grads, params0=PARAMS0, steps=None, jit=True):
  """Runs ``opt``; grads is a list of dicts or a callable params -> grads.

  Returns (list of update dicts as float64 numpy, final state).
  """
  params = jax.tree.map(jnp.asarray, params0)
  state = opt.init(params)
  update = jax.jit(opt.update) if jit else opt.update
  n = len(grads) if isinstance(grads, list) else steps
  out = []
  for t in range(n):
    g = grads[t] if isinstance(grads, list) else grads(params)
    g = jax.tree.map(jnp.asarray, g)
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(jax.tree.map(_wide, updates))
  return out, state


def assert_updates_close(actual, expected, rtol, atol):
  assert len(actual) == len(expected)
  for t, (a, e) in enumerate(zip(actual, expected)):
    for k in e:
      np.testing.assert_allclose(a[k], e[k], rtol=rtol, atol=atol, err_msg=f"step {t}, leaf {k}")


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(level=logging.DEBUG)
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@contextlib.contextmanager
def count_compilations():
  """Yields a list that collects one entry per XLA compilation in the block.

  Uses JAX's public compile logging (``jax.log_compiles``), nothing private.
  """
  handler = _Records()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  compiled: list[str] = []
  try:
    with jax.log_compiles():
      yield compiled
  finally:
    logger.removeHandler(handler)
    compiled.extend(m for m in handler.messages if m.startswith("Finished XLA compilation"))


def run_two_processes(worker, tmp_path, *args: str) -> list[dict]:
  """Runs ``worker PORT I tmp_path/pI.npz *args`` as processes 0 and 1 of a
  2-process JAX cluster on 127.0.0.1 and returns what each saved."""
  import os
  import socket
  import subprocess
  import sys

  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = str(sock.getsockname()[1])
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device per process
  env["JAX_PLATFORMS"] = "cpu"
  procs = [
    subprocess.Popen(
      [sys.executable, str(worker), port, str(i), str(tmp_path / f"p{i}.npz"), *args],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]
