"""An adaptive batch size from the gradient noise scale, with one compiled step.

Trains the same MLP on scikit-learn's digits three ways, for the same number
of examples:

* **small k**: a fixed batch of ``--small-k`` micro-batches;
* **largest k**: a fixed batch of ``--max-k`` micro-batches;
* **adaptive**: one step compiled for ``--max-k`` micro-batches, of which
  ``num_real_microbatches = adaptive_num_microbatches(noise_scale(state))``
  are computed: the batch follows the simple noise scale ``b_simple``
  (McCandlish et al. 2018). Padding micro-batches are not computed, so the
  step compiles once (asserted) and a small batch costs a small step.

Every run uses ``accumulate(adam, max_k, track_noise_scale=True)``; the fixed
runs pass their ``num_real_microbatches`` too. It plots the test loss against
the examples seen, and the noise scale over training, and writes a PNG.

Usage::

  python examples/adaptive_batch.py --out docs/adaptive_batch.png
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import accum_jax


def load_data(seed):
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  return train_test_split(x, digits.target.astype(np.int32), test_size=0.2,
                          random_state=seed, stratify=digits.target)


def init_params(key, sizes=(64, 128, 128, 10)):
  keys = jax.random.split(key, len(sizes) - 1)
  return [{'w': jax.random.normal(k, (a, b)) / np.sqrt(a), 'b': jnp.zeros(b)}
          for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def logits_of(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'])
  return x @ params[-1]['w'] + params[-1]['b']


def loss_fn(params, batch):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_of(params, batch['x']), batch['y']).mean()


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rows', type=int, default=8,
                      help='rows of one micro-batch (default 8)')
  parser.add_argument('--small-k', type=int, default=2)
  parser.add_argument('--max-k', type=int, default=32)
  parser.add_argument('--examples', type=int, default=60_000,
                      help='training examples each run sees (default 60000)')
  parser.add_argument('--eval-every', type=int, default=2000,
                      help='examples between test-loss evaluations')
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='adaptive_batch.png')
  return parser.parse_args(argv)


def main(argv=None):
  """Trains the three runs, plots them, returns their histories."""
  args = parse_args(argv)
  start = time.perf_counter()
  x_train, x_test, y_train, y_test = load_data(args.seed)
  k_max, rows = args.max_k, args.rows
  tx = accum_jax.accumulate(optax.adam(args.lr), k_max,
                            track_noise_scale=True, noise_scale_decay=0.95)
  traces = []

  def step(params, opt_state, batch, num_real):
    traces.append(1)  # runs once per compilation
    loss, updates, opt_state = accum_jax.value_and_update(loss_fn, tx)(
        params, opt_state, batch, num_real_microbatches=num_real)
    est = accum_jax.noise_scale(opt_state)
    next_k = accum_jax.adaptive_num_microbatches(
        est, rows, k_max, min_microbatches=2, warmup_windows=5,
        warmup_microbatches=args.small_k)
    return optax.apply_updates(params, updates), opt_state, loss, est, next_k

  step = jax.jit(step, donate_argnums=(0, 1))
  test_loss = jax.jit(lambda p: loss_fn(p, {'x': x_test, 'y': y_test}))

  def batch_of(idx, k):
    """``k`` micro-batches of fresh rows, laid out for the strided split of
    ``k_max`` (micro-batch ``j`` is rows ``j, j + k_max, ...``); the rest is
    padding, never computed."""
    micro = np.zeros((k_max, rows), np.int64)
    micro[:k] = idx.reshape(k, rows)
    order = micro.T.reshape(-1)
    return {'x': x_train[order], 'y': y_train[order]}

  runs = {f'small k={args.small_k} (batch {args.small_k * rows})': 'small',
          f'largest k={k_max} (batch {k_max * rows})': 'max',
          'adaptive k (from b_simple)': 'adaptive'}
  history = {}
  for name, kind in runs.items():
    params = init_params(jax.random.key(args.seed))
    opt_state = jax.jit(tx.init)(params)  # fresh buffers: the step donates
    rng = np.random.default_rng(args.seed)
    k = {'small': args.small_k, 'max': k_max}.get(kind, args.small_k)
    seen, stream = 0, np.empty(0, np.int64)
    h = {'examples': [0], 'test_loss': [float(test_loss(params))],
         'b_simple': [], 'k': [], 'at': []}
    while seen < args.examples:
      if len(stream) < k * rows:  # epochs of shuffled rows, no repeats
        stream = np.concatenate([stream, rng.permutation(len(x_train))])
      idx, stream = stream[:k * rows], stream[k * rows:]
      params, opt_state, _, est, next_k = step(
          params, opt_state, batch_of(idx, k), jnp.int32(k))
      seen += k * rows
      h['k'].append(k)
      h['at'].append(seen)
      h['b_simple'].append(float(est.b_simple))
      if seen // args.eval_every > h['examples'][-1] // args.eval_every:
        h['examples'].append(seen)
        h['test_loss'].append(float(test_loss(params)))
      if kind == 'adaptive':
        k = int(next_k)
    history[name] = h
    print(f'{name:32s} steps {len(h["k"]):5d}  final test loss '
          f'{h["test_loss"][-1]:.4f}  last b_simple {h["b_simple"][-1]:.1f}')
  # One compiled step ran every batch size of the three runs.
  assert len(traces) == 1, len(traces)
  print(f'the step compiled {len(traces)} time(s)')
  write_plot(args, history)
  print(f'wrote {args.out}; total time {time.perf_counter() - start:.1f} s')
  return {'history': history, 'traces': len(traces)}


def write_plot(args, history):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_noise) = plt.subplots(1, 2, figsize=(11, 4))
  for name, h in history.items():
    ax_loss.plot(h['examples'], h['test_loss'],
                 label=f'{name}: {len(h["k"])} steps')
    if not name.startswith('small'):  # two micro-batches: too noisy to show
      ax_noise.plot(h['at'], h['b_simple'], label=f'b_simple, {name}')
  adaptive = history['adaptive k (from b_simple)']
  ax_noise.step(adaptive['at'], np.asarray(adaptive['k']) * args.rows,
                where='post', color='k', lw=1, ls='--',
                label='adaptive batch (rows)')
  ax_loss.set_yscale('log')
  ax_loss.set_xlabel('training examples seen')
  ax_loss.set_ylabel('test loss')
  ax_loss.set_title('digits MLP, adam: loss per example seen')
  ax_loss.legend()
  ax_noise.set_yscale('log')
  ax_noise.set_xlabel('training examples seen')
  ax_noise.set_ylabel('examples')
  ax_noise.set_title('gradient noise scale b_simple (EMA over windows)')
  ax_noise.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  plt.close(fig)


if __name__ == '__main__':
  main()
