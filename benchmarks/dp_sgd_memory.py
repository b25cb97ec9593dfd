"""DP-SGD step: per-example clipping over the full batch vs. accum_jax.

The reference step computes every example's gradient with ``jax.vmap`` and
aggregates them with ``optax.contrib.differentially_private_aggregate``
(noise off, to compare numbers), then adam. The accum_jax step clips each
example's gradient inside its micro-batch (``per_example_fn``), so only one
micro-batch's per-example gradients are live. Peak = argument + output +
temp - alias bytes of the compiled step (params and opt_state donated), on
an MLP 784-256-256-10 with B=256 (one example's gradient: 1.07 MB). Then
the gradients of both, noise off, are compared.

  PYTHONPATH=$PWD python benchmarks/dp_sgd_memory.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import accum_jax

SIZES, BATCH, CLIP, KS = (784, 256, 256, 10), 256, 1.0, (1, 4, 16, 64)


def init_params(key):
  keys = jax.random.split(key, len(SIZES) - 1)
  return [{'w': jax.random.normal(k, (m, n)) / m**0.5, 'b': jnp.zeros(n)}
          for k, m, n in zip(keys, SIZES[:-1], SIZES[1:])]


def loss_fn(params, x, y):
  h = x
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer['w'] + layer['b'])
  logits = h @ params[-1]['w'] + params[-1]['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def clip(grads):
  return optax.clip_by_global_norm(CLIP).update(grads, optax.EmptyState())[0]


def full_batch_step(tx):
  def step(params, opt_state, x, y):
    per_example = jax.vmap(jax.grad(loss_fn), (None, 0, 0))(
        params, x[:, None], y[:, None])
    updates, opt_state = tx.update(per_example, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def accum_step(tx):
  update = accum_jax.value_and_update(loss_fn, tx, batch_argnums=(1, 2),
                                      per_example_fn=clip)

  def step(params, opt_state, x, y):
    _, updates, opt_state = update(params, opt_state, x, y)
    return optax.apply_updates(params, updates), opt_state
  return step


def micro_grad_step(tx, k):
  """optax.microbatching.micro_grad's per-example transform, then adam."""
  grad = optax.microbatching.micro_grad(
      loss_fn, batch_argnums=(1, 2), microbatch_size=BATCH // k,
      accumulator=optax.microbatching.AccumulationType.MEAN,
      transform_fn=clip)

  def step(params, opt_state, x, y):
    grads, _ = grad(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def mib(fn, *args) -> str:
  m = accum_jax.compiled_memory(fn, *args, donate_argnums=(0, 1))
  return f'{m.peak_bytes / 2**20:.1f} | {m.temp_bytes / 2**20:.1f}'


def main():
  params = init_params(jax.random.key(0))
  kx, ky = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (BATCH, SIZES[0]))
  y = jax.random.randint(ky, (BATCH,), 0, SIZES[-1])
  ref_tx = optax.chain(optax.contrib.differentially_private_aggregate(
      CLIP, 0.0, jax.random.key(0)), optax.adam(1e-3))
  ref = full_batch_step(ref_tx)
  print('| step | peak MiB | temp MiB |\n| --- | --- | --- |')
  print('| full batch: vmap(grad) + differentially_private_aggregate | '
        f'{mib(ref, params, ref_tx.init(params), x, y)} |')
  for k in KS:
    tx = accum_jax.accumulate(optax.adam(1e-3), k)
    print(f'| accum_jax per_example_fn=clip, k={k} | '
          f'{mib(accum_step(tx), params, tx.init(params), x, y)} |')
  adam = optax.adam(1e-3)
  for k in KS:
    print(f'| optax.microbatching.micro_grad(transform_fn=clip), '
          f'microbatch_size={BATCH // k} | '
          f'{mib(micro_grad_step(adam, k), params, adam.init(params), x, y)} |')
  dp = optax.contrib.differentially_private_aggregate(CLIP, 0.0,
                                                      jax.random.key(0))
  per_example = jax.vmap(jax.grad(loss_fn), (None, 0, 0))(
      params, x[:, None], y[:, None])
  want, _ = dp.update(per_example, dp.init(params))
  for k in KS:
    _, got = jax.jit(accum_jax.value_and_grad(
        loss_fn, k, batch_argnums=(1, 2), per_example_fn=clip))(params, x, y)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    scale = max(float(np.max(np.abs(np.asarray(b))))
                for b in jax.tree.leaves(want))
    print(f'k={k}: max |gradient - differentially_private_aggregate| = '
          f'{diff:.1e} (largest entry {scale:.1e})')

if __name__ == '__main__':
  main()
