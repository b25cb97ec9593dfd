"""The token-weighting trap, on a small Flax language model with padding.

A language-model batch holds sequences of different lengths, padded to a
common length, and the loss is the mean over the *real* tokens of the whole
batch. Split the batch into micro-batches and average the micro-batches' own
token means, and short-sequence micro-batches count as much as long ones: the
loss and gradient are no longer the full batch's (the bug transformers#34191
fixed in Hugging Face's trainer). Weighting each micro-batch by its number of
real tokens (``weight_fn``) gives back the full-batch numbers exactly.

This script computes, on one padded batch, the full-batch token-mean loss and
gradient, then the micro-batched ones both ways, and prints the differences;
then it trains three copies of the model for a few steps (full batch,
``accum_jax.linen_train_step`` with and without ``weight_fn``) and prints how
far each accumulated copy ends from the full-batch one.

Usage::

  python examples/lm_token_weighting.py --k 4 --steps 20
"""

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import accum_jax

VOCAB = 48
PAD = 0


class TinyLM(nn.Module):
  """A causal convolutional language model: token i sees tokens <= i.

  Embeddings, two causal 1-D convolutions (left padding only) with residual
  connections, and a head over the vocabulary. Sequences are right-padded,
  so with causal convolutions padding never reaches a real position.
  """
  dim: int = 32
  width: int = 3

  @nn.compact
  def __call__(self, tokens, mask):
    x = nn.Embed(VOCAB, self.dim)(tokens) * mask[..., None]
    for _ in range(2):
      h = nn.Conv(self.dim, (self.width,), padding=((self.width - 1, 0),))(x)
      x = (x + nn.gelu(h)) * mask[..., None]
    return nn.Dense(VOCAB)(x)


def make_batch(rng, batch_size, max_len):
  """Counting sequences with a random start and step, right-padded.

  Lengths vary from 3 to ``max_len`` so micro-batches hold very different
  numbers of real tokens. ``mask`` marks the real target positions.
  """
  lengths = rng.integers(3, max_len + 1, batch_size)
  starts = rng.integers(1, VOCAB, batch_size)
  steps = rng.integers(1, 4, batch_size)
  pos = np.arange(max_len + 1)
  seq = 1 + (starts[:, None] - 1 + steps[:, None] * pos) % (VOCAB - 1)
  seq = np.where(pos[None] <= lengths[:, None], seq, PAD)
  real = (pos[None, 1:] <= lengths[:, None]).astype(np.float32)
  return {'inputs': seq[:, :-1].astype(np.int32),
          'targets': seq[:, 1:].astype(np.int32), 'mask': real}


def token_mean_loss(params, batch, apply_fn):
  """Mean cross-entropy over the real tokens of ``batch``."""
  logits = apply_fn({'params': params}, batch['inputs'], batch['mask'])
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['targets'])
  return jnp.sum(losses * batch['mask']) / jnp.maximum(batch['mask'].sum(), 1)


def num_tokens(microbatch):
  return microbatch['mask'].sum()


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                             strict=True))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--k', type=int, default=4,
                      help='number of micro-batches (default 4)')
  parser.add_argument('--batch-size', type=int, default=32,
                      help='sequences per batch, a multiple of k (default 32)')
  parser.add_argument('--max-len', type=int, default=32,
                      help='padded sequence length (default 32)')
  parser.add_argument('--steps', type=int, default=20,
                      help='training steps for the comparison (default 20)')
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args(argv)


def main(argv=None):
  """Runs the comparison, prints it, and returns the numbers as a dict."""
  args = parse_args(argv)
  rng = np.random.default_rng(args.seed)
  model = TinyLM()
  batch = make_batch(rng, args.batch_size, args.max_len)
  # Jitted: an eager init compiles every small op on its own.
  params = jax.jit(model.init)(jax.random.key(args.seed), batch['inputs'][:1],
                               batch['mask'][:1])['params']
  loss_fn = functools.partial(token_mean_loss, apply_fn=model.apply)
  k = args.k

  tokens = accum_jax.split_batch(batch['mask'], k).sum(axis=(1, 2))
  print(f'batch of {args.batch_size} sequences padded to {args.max_len}, '
        f'k={k} micro-batches (rows j, j+k, ...); real tokens per '
        f'micro-batch: {tokens.astype(int).tolist()}')

  full_loss, full_grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
  mean_of_means = jax.jit(accum_jax.value_and_grad(loss_fn, k))
  weighted = jax.jit(accum_jax.value_and_grad(loss_fn, k,
                                              weight_fn=num_tokens))
  results = {'full_loss': float(full_loss)}
  print(f'{"":34s}{"loss":>10s}{"|loss - full|":>15s}{"max |grad - full|":>19s}')
  print(f'{"full batch (token mean)":34s}{float(full_loss):10.6f}')
  for name, fn in (('mean of micro-batch means', mean_of_means),
                   ('token-weighted (weight_fn)', weighted)):
    loss, grads = fn(params, batch)
    key = 'unweighted' if fn is mean_of_means else 'weighted'
    results[f'{key}_loss_diff'] = abs(float(loss) - float(full_loss))
    results[f'{key}_grad_diff'] = max_abs_diff(grads, full_grads)
    print(f'{name:34s}{float(loss):10.6f}'
          f'{results[f"{key}_loss_diff"]:15.2e}'
          f'{results[f"{key}_grad_diff"]:19.2e}')

  # Training: the same batches for three copies of the model.
  inner = optax.adam(3e-3)

  def new_state(tx):  # a fresh copy of the initial params for each run
    return jax.jit(lambda p: train_state.TrainState.create(
        apply_fn=model.apply, params=p, tx=tx))(params)

  @jax.jit
  def full_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    return state.apply_gradients(grads=grads), loss

  @functools.partial(jax.jit, static_argnums=2)
  def accum_step(state, batch, weight):
    return accum_jax.linen_train_step(
        state, batch, loss_fn, weight_fn=num_tokens if weight else None)

  full = new_state(inner)
  unweighted = new_state(accum_jax.accumulate(inner, k))
  weighted_state = new_state(accum_jax.accumulate(inner, k))
  for _ in range(args.steps):
    batch = make_batch(rng, args.batch_size, args.max_len)
    full, full_loss = full_step(full, batch)
    unweighted, _ = accum_step(unweighted, batch, False)
    weighted_state, _ = accum_step(weighted_state, batch, True)
  results['train_unweighted_param_diff'] = max_abs_diff(unweighted.params,
                                                        full.params)
  results['train_weighted_param_diff'] = max_abs_diff(weighted_state.params,
                                                      full.params)
  print(f'after {args.steps} adam steps, max |params - full-batch params|: '
        f'mean of means {results["train_unweighted_param_diff"]:.2e}, '
        f'token-weighted {results["train_weighted_param_diff"]:.2e} '
        f'(final full-batch loss {float(full_loss):.4f})')
  return results


if __name__ == '__main__':
  main()
