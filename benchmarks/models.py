"""The benchmark models: a parameter-heavy MLP, a padded Flax LM, a BN CNN.

Every model gives the same interface, so every contender can train it:

* ``loss_sum(params, batch, state, rng) -> (sum_loss, new_state)``: the sum of
  the per-example (MLP, CNN) or per-real-token (LM) losses of ``batch``, and
  the model's new non-trained state (BatchNorm statistics; ``{}`` if none).
* ``count(batch) -> scalar``: how many examples or real tokens that sum has.

The mean loss is ``sum_loss / count``. The hand-written loop differentiates
``sum_loss`` and divides once by the total count (MaxText's token-sum
weighting); accum_jax gets the mean loss with ``weight_fn=count`` for the LM,
whose micro-batches hold different numbers of real tokens, and no weight_fn
for the others, whose micro-batches are equally sized.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

# Every model tags its layer outputs with this name, so the remat rows can
# save only those and recompute the rest of each layer in the backward pass.
LAYER = 'layer'
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(LAYER)


class Model(NamedTuple):
  """A model, example data and its loss; see the module docstring."""

  name: str
  params: Any
  state: Any
  batch: dict
  loss_sum: Callable[..., Any]
  count: Callable[[Any], jax.Array]
  token_weighted: bool  # micro-batches differ in count: weight by it

  def mean_loss(self, params, batch, state, rng):
    total, new_state = self.loss_sum(params, batch, state, rng)
    return total / self.count(batch), new_state

  @property
  def weight_fn(self) -> Callable[[Any], jax.Array] | None:
    return self.count if self.token_weighted else None

  @property
  def param_bytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self.params))



def mlp(batch_size=64, width=512, depth=4, dtype=jnp.float32, seed=0):
  """A tanh MLP regressor: memory dominated by parameters and optimizer state."""
  rng = np.random.default_rng(seed)
  params = [
      {'w': jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width),
                        dtype),
       'b': jnp.zeros((width,), dtype)}
      for _ in range(depth)
  ]
  batch = {
      'x': jnp.asarray(rng.normal(size=(batch_size, width)), dtype),
      'y': jnp.asarray(rng.normal(size=(batch_size, width)), dtype),
  }

  def loss_sum(params, batch, state, rng):
    del rng
    h = batch['x']
    for layer in params:
      h = checkpoint_name(jnp.tanh(h @ layer['w'] + layer['b']), LAYER)
    err = (h - batch['y']).astype(jnp.float32)
    return jnp.sum(jnp.mean(err ** 2, axis=-1)), state

  def count(batch):
    return jnp.asarray(batch['x'].shape[0], jnp.float32)

  return Model(f'mlp{depth}x{width}', params, {}, batch, loss_sum, count,
               False)


class _Block(nn.Module):
  heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x, mask):
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype)(x)
    y = nn.SelfAttention(num_heads=self.heads, dtype=self.dtype,
                         param_dtype=self.dtype)(y, mask=mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype)(x)
    y = nn.Dense(4 * x.shape[-1], dtype=self.dtype, param_dtype=self.dtype)(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype,
                 param_dtype=self.dtype)(nn.gelu(y))
    return checkpoint_name(x + y, LAYER)


class _LM(nn.Module):
  vocab: int
  dim: int
  heads: int
  layers: int
  dtype: Any

  @nn.compact
  def __call__(self, tokens, valid):
    x = nn.Embed(self.vocab, self.dim, dtype=self.dtype,
                 param_dtype=self.dtype)(tokens)
    pos = self.param('pos', nn.initializers.normal(0.02),
                     (tokens.shape[-1], self.dim), self.dtype)
    x = x + pos
    mask = nn.combine_masks(nn.make_causal_mask(tokens),
                            nn.make_attention_mask(valid, valid))
    for _ in range(self.layers):
      x = _Block(self.heads, self.dtype)(x, mask)
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.dtype)(x)
    return nn.Dense(self.vocab, dtype=self.dtype, param_dtype=self.dtype)(x)


def lm(batch_size=32, seq_len=64, vocab=256, dim=64, heads=4, layers=2,
       dtype=jnp.float32, seed=0):
  """A causal Flax transformer LM on right-padded sequences.

  Every row has a random length in ``[seq_len // 4, seq_len]``; padding tokens
  carry no loss, so the loss is a token mean and micro-batches hold different
  numbers of real tokens (activation-dominated memory).
  """
  rng = np.random.default_rng(seed)
  lengths = rng.integers(seq_len // 4, seq_len + 1, size=batch_size)
  valid = np.arange(seq_len + 1)[None, :] < lengths[:, None] + 1
  tokens = np.where(valid, rng.integers(1, vocab, size=valid.shape), 0)
  batch = {'tokens': jnp.asarray(tokens, jnp.int32),
           'valid': jnp.asarray(valid)}
  module = _LM(vocab, dim, heads, layers, dtype)
  params = module.init(jax.random.key(seed), batch['tokens'][:1, :-1],
                       batch['valid'][:1, :-1])['params']

  def loss_sum(params, batch, state, rng):
    del rng
    inputs, targets = batch['tokens'][:, :-1], batch['tokens'][:, 1:]
    logits = module.apply({'params': params}, inputs, batch['valid'][:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(batch['valid'][:, 1:], nll, 0.0)), state

  def count(batch):
    return jnp.sum(batch['valid'][:, 1:]).astype(jnp.float32)

  return Model(f'lm{layers}x{dim}', params, {}, batch, loss_sum, count, True)


class _CNN(nn.Module):
  dtype: Any

  @nn.compact
  def __call__(self, x, train, rng):
    for features, stride in ((16, 1), (32, 2), (32, 1)):
      x = nn.Conv(features, (3, 3), strides=stride, dtype=self.dtype,
                  param_dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype,
                       param_dtype=self.dtype)(x)
      x = checkpoint_name(nn.relu(x), LAYER)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(0.1, deterministic=not train)(x, rng=rng)
    return nn.Dense(10, dtype=self.dtype, param_dtype=self.dtype)(x)


def cnn(batch_size=64, image=16, dtype=jnp.float32, seed=0):
  """A small CNN with BatchNorm (mutable statistics) and dropout (rng)."""
  rng = np.random.default_rng(seed)
  batch = {
      'x': jnp.asarray(rng.normal(size=(batch_size, image, image, 3)), dtype),
      'y': jnp.asarray(rng.integers(0, 10, size=batch_size), jnp.int32),
  }
  module = _CNN(dtype)
  variables = module.init(jax.random.key(seed), batch['x'][:1], False, None)
  params, state = variables['params'], variables['batch_stats']

  def loss_sum(params, batch, state, rng):
    logits, new = module.apply({'params': params, 'batch_stats': state},
                               batch['x'], True, rng, mutable=['batch_stats'])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch['y'][:, None], axis=-1)
    return jnp.sum(nll), new['batch_stats']

  def count(batch):
    return jnp.asarray(batch['x'].shape[0], jnp.float32)

  return Model('cnn', params, state, batch, loss_sum, count, False)


SIZES = {
    # Default: a CPU run of the whole grid in a few minutes.
    'small': {
        'mlp': dict(batch_size=64, width=512, depth=4),
        'lm': dict(batch_size=32, seq_len=64, dim=64, heads=4, layers=2),
        'cnn': dict(batch_size=64, image=16),
    },
    # CI smoke run.
    'tiny': {
        'mlp': dict(batch_size=32, width=128, depth=2),
        'lm': dict(batch_size=16, seq_len=16, dim=32, heads=2, layers=1),
        'cnn': dict(batch_size=16, image=8),
    },
    # The MLP of the core issue's targets (6 x 1024 x 1024, B=256), and larger
    # LM/CNN, for a GPU/TPU or a patient CPU.
    'large': {
        'mlp': dict(batch_size=256, width=1024, depth=6),
        'lm': dict(batch_size=64, seq_len=256, dim=256, heads=8, layers=4),
        'cnn': dict(batch_size=256, image=32),
    },
}

BUILDERS = {'mlp': mlp, 'lm': lm, 'cnn': cnn}


def make(name: str, size: str, dtype) -> Model:
  return BUILDERS[name](**SIZES[size][name], dtype=dtype)
