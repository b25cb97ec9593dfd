"""Quickstart: the same training run full-batch and with accum_jax, side by side.

A small MLP regresses a synthetic target. One run takes full-batch adamw steps
(with gradient clipping and a learning-rate schedule); the other takes the same
steps with the batch split into k micro-batches by
``accum_jax.value_and_update``. The losses and parameters match to float32
round-off, while the accumulated step holds the activations of one
micro-batch at a time.

Run: python examples/quickstart.py [--k 8] [--batch-size 512] [--steps 50]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import accum_jax


def init_params(key, sizes):
  params = []
  for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1),
                              zip(sizes[:-1], sizes[1:])):
    params.append({'w': jax.random.normal(k, (n_in, n_out)) / jnp.sqrt(n_in),
                   'b': jnp.zeros(n_out)})
  return params


def loss_fn(params, batch):
  h = batch['x']
  for layer in params[:-1]:
    h = jax.nn.gelu(h @ layer['w'] + layer['b'])
  pred = h @ params[-1]['w'] + params[-1]['b']
  return jnp.mean((pred - batch['y']) ** 2)


def make_data(key, n, d):
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (n, d))
  y = jnp.sin(x @ jax.random.normal(kw, (d, 1)))
  return {'x': x, 'y': y}


def peak_mib(step, *args):
  compiled = step.lower(*args).compile()
  return accum_jax.compiled_memory(compiled).peak_bytes / 2**20


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--k', type=int, default=8, help='micro-batches per step')
  parser.add_argument('--batch-size', type=int, default=512)
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--width', type=int, default=256)
  args = parser.parse_args()

  key = jax.random.key(0)
  params = init_params(key, [32, args.width, args.width, 1])
  warmup = max(1, min(5, args.steps // 5))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 3e-3, warmup, max(args.steps, warmup + 1))
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=1e-2))
  tx = accum_jax.accumulate(optimizer, num_microbatches=args.k)

  def full_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates), opt_state

  def accum_step(params, opt_state, batch):
    loss, updates, opt_state = accum_jax.value_and_update(loss_fn, tx)(
        params, opt_state, batch)
    return loss, optax.apply_updates(params, updates), opt_state

  full_step = jax.jit(full_step, donate_argnums=(0, 1))
  accum_step = jax.jit(accum_step, donate_argnums=(0, 1))

  data_key = jax.random.key(1)
  batch0 = make_data(data_key, args.batch_size, 32)
  p_full, s_full = params, optimizer.init(params)
  p_acc, s_acc = jax.tree.map(jnp.copy, params), tx.init(params)
  mem_full = peak_mib(full_step, p_full, s_full, batch0)
  mem_acc = peak_mib(accum_step, p_acc, s_acc, batch0)

  print(f'accum_jax {accum_jax.__version__} | jax {jax.__version__} | '
        f'{jax.devices()[0].device_kind} | batch {args.batch_size} = '
        f'{args.k} x {args.batch_size // args.k}')
  print(f'{"step":>5} {"full-batch loss":>16} {"accumulated loss":>17} '
        f'{"|diff|":>9}')
  max_diff = 0.0
  start = time.perf_counter()
  for t in range(args.steps):
    batch = make_data(jax.random.fold_in(data_key, t), args.batch_size, 32)
    loss_full, p_full, s_full = full_step(p_full, s_full, batch)
    loss_acc, p_acc, s_acc = accum_step(p_acc, s_acc, batch)
    diff = abs(float(loss_full) - float(loss_acc))
    max_diff = max(max_diff, diff)
    if t % max(1, args.steps // 10) == 0 or t == args.steps - 1:
      print(f'{t:>5} {float(loss_full):>16.6f} {float(loss_acc):>17.6f} '
            f'{diff:>9.2e}')
  elapsed = time.perf_counter() - start
  param_diff = max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(jax.tree.leaves(p_full),
                                   jax.tree.leaves(p_acc)))
  print(f'max |loss diff| over {args.steps} steps: {max_diff:.2e}; '
        f'max |param diff| at the end: {param_diff:.2e}')
  print(f'compiled peak step memory: full batch {mem_full:.2f} MiB, '
        f'accumulated (k={args.k}) {mem_acc:.2f} MiB')
  print(f'{args.steps} steps of both in {elapsed:.1f} s')
  ok = max_diff < 1e-4 and param_diff < 1e-4
  print('losses match: full-batch and accumulated training agree' if ok
        else 'MISMATCH between full-batch and accumulated training')
  raise SystemExit(0 if ok else 1)


if __name__ == '__main__':
  main()
