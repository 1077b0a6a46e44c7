"""A GPT-like decoder in plain JAX, the model of the bench's ``train_step`` cases.

Pre-norm blocks (layer norm, causal multi-head attention, layer norm, a GELU
MLP of 4x the width), learned position embeddings and an output head tied to
the token embedding. The layers are either leaves of their own (``layer00``,
``layer01``, ...: 12 leaves each) or stacked along a leading axis and run by
``lax.scan`` (``layers``: 12 leaves in all), as models are written to compile
once per layer kind.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class GPTConfig(NamedTuple):
  """Sizes of the model and its batch.

  Attributes:
    layers: decoder blocks.
    d_model: width of the residual stream.
    heads: attention heads (``d_model`` divisible by it).
    vocab: token ids.
    context: tokens per sequence.
    batch: sequences per step.
  """

  layers: int = 12
  d_model: int = 512
  heads: int = 8
  vocab: int = 8192
  context: int = 128
  batch: int = 4


# Tiny sizes of the same structure: a smoke run in seconds.
QUICK = GPTConfig(layers=2, d_model=64, heads=4, vocab=256, context=16, batch=2)


def _layer_params(key: jax.Array, d: int) -> dict[str, jax.Array]:
  kq, kk, kv, ko, k1, k2 = jax.random.split(key, 6)
  dense = lambda k, n, m: jax.random.normal(k, (n, m), jnp.float32) * (1.0 / math.sqrt(n))
  return {
    "ln1_scale": jnp.ones(d),
    "ln1_bias": jnp.zeros(d),
    "wq": dense(kq, d, d),
    "wk": dense(kk, d, d),
    "wv": dense(kv, d, d),
    "wo": dense(ko, d, d),
    "ln2_scale": jnp.ones(d),
    "ln2_bias": jnp.zeros(d),
    "w1": dense(k1, d, 4 * d),
    "b1": jnp.zeros(4 * d),
    "w2": dense(k2, 4 * d, d),
    "b2": jnp.zeros(d),
  }


def init_params(key: jax.Array, cfg: GPTConfig, scanned: bool) -> dict[str, Any]:
  """The model's parameters (call it under ``jax.jit``, as models are initialised).

  Args:
    key: a PRNG key.
    cfg: the sizes.
    scanned: stack the layers along a leading axis (for :func:`loss`'s ``lax.scan``).

  Returns:
    ``{"tok_emb", "pos_emb", "lnf_scale", "lnf_bias"}`` and ``layer00`` ... or ``layers``.
  """
  k_tok, k_pos, k_layers = jax.random.split(key, 3)
  d = cfg.d_model
  params: dict[str, Any] = {
    "tok_emb": jax.random.normal(k_tok, (cfg.vocab, d), jnp.float32) * 0.02,
    "pos_emb": jax.random.normal(k_pos, (cfg.context, d), jnp.float32) * 0.02,
    "lnf_scale": jnp.ones(d),
    "lnf_bias": jnp.zeros(d),
  }
  keys = jax.random.split(k_layers, cfg.layers)
  if scanned:
    params["layers"] = jax.vmap(lambda k: _layer_params(k, d))(keys)
  else:
    for i in range(cfg.layers):
      params[f"layer{i:02d}"] = _layer_params(keys[i], d)
  return params


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale[None, None] + bias[None, None]


def _block(p: dict[str, jax.Array], x: jax.Array, heads: int) -> jax.Array:
  """One pre-norm decoder block on ``x`` of shape (batch, context, d_model)."""
  b, t, d = x.shape
  h = _layer_norm(x, p["ln1_scale"], p["ln1_bias"])
  split = lambda w: (h @ w).reshape(b, t, heads, d // heads)
  q, k, v = split(p["wq"]), split(p["wk"]), split(p["wv"])
  logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // heads)
  causal = jnp.tril(jnp.ones((1, 1, t, t), bool))
  att = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
  x = x + jnp.einsum("bhqk,bkhc->bqhc", att, v).reshape(b, t, d) @ p["wo"]
  h = _layer_norm(x, p["ln2_scale"], p["ln2_bias"])
  return x + jax.nn.gelu(h @ p["w1"] + p["b1"][None, None]) @ p["w2"] + p["b2"][None, None]


def loss(params: dict[str, Any], tokens: jax.Array, targets: jax.Array, cfg: GPTConfig) -> jax.Array:
  """Mean next-token cross-entropy of ``targets`` given ``tokens`` (both (batch, context) ids).

  The layers run unrolled (``layer00`` ...) or under ``lax.scan`` (``layers``),
  as :func:`init_params` made them.
  """
  x = params["tok_emb"][tokens] + params["pos_emb"][None, : tokens.shape[1]]
  if "layers" in params:
    x = jax.lax.scan(lambda h, p: (_block(p, h, cfg.heads), None), x, params["layers"])[0]
  else:
    for i in range(cfg.layers):
      x = _block(params[f"layer{i:02d}"], x, cfg.heads)
  x = _layer_norm(x, params["lnf_scale"], params["lnf_bias"])
  logits = x @ params["tok_emb"].T
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def leaf_shapes(cfg: GPTConfig, scanned: bool) -> list[tuple[int, ...]]:
  """The shapes of :func:`init_params`'s leaves (nothing allocated)."""
  tree = jax.eval_shape(lambda k: init_params(k, cfg, scanned), jax.random.key(0))
  return [tuple(x.shape) for x in jax.tree.leaves(tree)]
