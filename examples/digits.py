"""Full batch vs accum_jax: a small Flax CNN on scikit-learn's digits.

Trains the same CNN from the same initialisation on the same shuffled batches
twice, side by side:

* **full batch**: ``jax.value_and_grad`` on the whole batch and
  ``state.apply_gradients`` (optax adam);
* **accumulate**: ``accum_jax.linen_train_step`` with
  ``tx=accum_jax.accumulate(adam, k)``: the batch is split into ``k``
  micro-batches inside one jitted step and adam is applied once.

It prints the per-epoch training loss and test accuracy of both and their
largest difference, the peak memory of each compiled train step (XLA's
``memory_analysis()``: arguments + outputs + temporaries - donated aliases),
and writes a PNG with the two loss curves and the memory bars.

The digits data ships with scikit-learn (1797 8x8 images, no download).

Usage::

  pip install ".[examples]"
  python examples/digits.py --k 8 --batch-size 256 --epochs 25 --out digits.png
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import accum_jax


class CNN(nn.Module):
  """Two 3x3 convolutions, a 2x2 average pool and two dense layers."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def load_data(seed):
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # (N, 8, 8, 1)
  return train_test_split(images, digits.target.astype(np.int32),
                          test_size=0.2, random_state=seed,
                          stratify=digits.target)


def peak_bytes(compiled):
  """Peak memory of a compiled step: arguments + outputs + temps - aliased."""
  return accum_jax.compiled_memory(compiled).peak_bytes


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--k', type=int, default=8,
                      help='number of micro-batches per step (default 8)')
  parser.add_argument('--batch-size', type=int, default=256,
                      help='effective batch size, a multiple of k (default 256)')
  parser.add_argument('--epochs', type=int, default=25,
                      help='epochs over the 1437 training images (default 25)')
  parser.add_argument('--lr', type=float, default=3e-3,
                      help='adam learning rate (default 3e-3)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='digits.png',
                      help='path of the PNG to write (default digits.png)')
  return parser.parse_args(argv)


def main(argv=None):
  """Trains both ways, prints and plots the comparison, returns the numbers."""
  args = parse_args(argv)
  start = time.perf_counter()
  x_train, x_test, y_train, y_test = load_data(args.seed)
  if args.batch_size > len(x_train):
    raise SystemExit(f'--batch-size {args.batch_size} is larger than the '
                     f'{len(x_train)} training images.')
  if args.batch_size % args.k:
    raise SystemExit(f'--batch-size {args.batch_size} must be a multiple of '
                     f'--k {args.k}.')
  steps_per_epoch = len(x_train) // args.batch_size  # drop the ragged tail

  model = CNN()
  # Jitted: an eager init compiles every small op on its own.
  params = jax.jit(model.init)(jax.random.key(args.seed), x_train[:1])['params']
  inner = optax.adam(args.lr)

  def loss_fn(params, batch):
    logits = model.apply({'params': params}, batch['x'])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['y']).mean()

  def full_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    return state.apply_gradients(grads=grads), loss

  def accum_step(state, batch):
    return accum_jax.linen_train_step(state, batch, loss_fn)

  def new_state(tx):  # own copy of the initial params: the steps donate them
    return jax.jit(lambda p: train_state.TrainState.create(
        apply_fn=model.apply, params=p, tx=tx))(params)

  states = {'full batch': new_state(inner),
            f'accumulate k={args.k}': new_state(
                accum_jax.accumulate(inner, args.k))}
  example = {'x': x_train[:args.batch_size], 'y': y_train[:args.batch_size]}
  steps, memory = {}, {}
  for (name, state), fn in zip(states.items(), (full_step, accum_step),
                               strict=True):
    # Compile ahead: the same executable trains and reports its memory.
    steps[name] = jax.jit(fn, donate_argnums=0).lower(state, example).compile()
    memory[name] = peak_bytes(steps[name])

  @jax.jit
  def accuracy(params):
    logits = model.apply({'params': params}, x_test)
    return jnp.mean(logits.argmax(-1) == y_test)

  print(f'digits: {len(x_train)} train / {len(x_test)} test images, batch '
        f'{args.batch_size} = {args.k} micro-batches of '
        f'{args.batch_size // args.k}, {steps_per_epoch} steps/epoch, '
        f'{args.epochs} epochs, devices: {jax.devices()}')
  names = list(states)
  history = {name: {'step_loss': [], 'loss': [], 'acc': []} for name in names}
  rng = np.random.default_rng(args.seed)
  bar = tqdm(range(1, args.epochs + 1), desc='epochs', unit='epoch')
  for epoch in bar:
    order = rng.permutation(len(x_train))
    losses = {name: [] for name in names}
    for i in range(steps_per_epoch):
      idx = order[i * args.batch_size:(i + 1) * args.batch_size]
      batch = {'x': x_train[idx], 'y': y_train[idx]}
      for name in names:  # same batch for both, interleaved
        states[name], loss = steps[name](states[name], batch)
        losses[name].append(loss)
    for name in names:
      step_loss = [float(v) for v in losses[name]]
      history[name]['step_loss'] += step_loss
      history[name]['loss'].append(float(np.mean(step_loss)))
      history[name]['acc'].append(float(accuracy(states[name].params)))
    a, b = (history[name] for name in names)
    bar.set_postfix(loss=f'{b["loss"][-1]:.4f}', acc=f'{b["acc"][-1]:.3f}')
    tqdm.write(f'epoch {epoch:3d}  loss {a["loss"][-1]:.6f} | '
               f'{b["loss"][-1]:.6f}  test acc {a["acc"][-1]:.4f} | '
               f'{b["acc"][-1]:.4f}  |dloss| '
               f'{abs(a["loss"][-1] - b["loss"][-1]):.1e}')
  bar.close()

  a, b = (history[name] for name in names)
  loss_diff = max(abs(x - y) for x, y in zip(a['step_loss'], b['step_loss'],
                                             strict=True))
  acc_diff = max(abs(x - y) for x, y in zip(a['acc'], b['acc'], strict=True))
  param_diff = max(float(np.max(np.abs(x - y))) for x, y in zip(
      jax.device_get(jax.tree.leaves(states[names[0]].params)),
      jax.device_get(jax.tree.leaves(states[names[1]].params)), strict=True))
  print(f'columns: {names[0]} | {names[1]}')
  print(f'final test accuracy: {a["acc"][-1]:.4f} | {b["acc"][-1]:.4f}')
  print(f'max difference over training: step loss {loss_diff:.2e}, test '
        f'accuracy {acc_diff:.4f}, final params {param_diff:.2e}')
  for name in names:
    print(f'peak step memory, {name}: {memory[name] / 2**20:.2f} MiB')
  print(f'accumulate / full batch memory: '
        f'{memory[names[1]] / memory[names[0]]:.3f}')

  write_plot(args, names, history, memory, loss_diff)
  print(f'wrote {args.out}; total time {time.perf_counter() - start:.1f} s')
  return {'history': history, 'memory': memory, 'loss_diff': loss_diff,
          'acc_diff': acc_diff, 'param_diff': param_diff}


def write_plot(args, names, history, memory, loss_diff):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_mem) = plt.subplots(
      1, 2, figsize=(10, 4), gridspec_kw={'width_ratios': [2, 1]})
  for name, style in zip(names, ({'lw': 3, 'alpha': 0.5},
                                 {'lw': 1.2, 'ls': '--', 'color': 'k'}),
                         strict=True):
    ax_loss.plot(np.arange(1, len(history[name]['step_loss']) + 1),
                 history[name]['step_loss'], label=name, **style)
  ax_loss.set_yscale('log')
  ax_loss.set_xlabel('optimizer step')
  ax_loss.set_ylabel('training loss (batch mean)')
  ax_loss.set_title(f'digits CNN, batch {args.batch_size}: max |loss difference| '
                    f'{loss_diff:.1e}')
  ax_loss.legend()
  mib = [memory[name] / 2**20 for name in names]
  bars = ax_mem.bar(['full batch', f'accumulate\nk={args.k}'], mib,
                    color=['tab:blue', 'tab:orange'])
  ax_mem.bar_label(bars, fmt='%.1f MiB')
  ax_mem.set_ylabel('peak step memory (MiB, XLA memory_analysis)')
  ax_mem.set_title(f'{jax.devices()[0].platform.upper()} step memory')
  ax_mem.set_ylim(0, max(mib) * 1.2)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  main()
