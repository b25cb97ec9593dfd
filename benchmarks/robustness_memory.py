"""Compiled peak memory of value_and_update under each robustness option.

Peak = argument + output + temp - alias bytes of the compiled train step
(params and opt_state donated, updates applied inside the jit), on a 6-layer
1024x1024 tanh MLP with adam, B=256, k=8: the core's reference setup.

  PYTHONPATH=$PWD python benchmarks/robustness_memory.py
"""

import jax
import jax.numpy as jnp
import optax

import accum_jax

WIDTH, DEPTH, BATCH, K = 1024, 6, 256, 8


def init_params(key):
  keys = jax.random.split(key, DEPTH)
  return [{'w': jax.random.normal(k, (WIDTH, WIDTH)) / WIDTH**0.5,
           'b': jnp.zeros(WIDTH)} for k in keys]


def loss_fn(params, batch):
  h = batch['x']
  for layer in params:
    h = jnp.tanh(h @ layer['w'] + layer['b'])
  return jnp.mean((h - batch['y']) ** 2)


def peak_mib(fn, *args):
  return accum_jax.compiled_memory(fn, *args,
                                   donate_argnums=(0, 1)).peak_bytes / 2**20


def main():
  params = init_params(jax.random.key(0))
  batch = {'x': jnp.ones((BATCH, WIDTH)), 'y': jnp.zeros((BATCH, WIDTH))}
  def weighted(mb):
    return jnp.asarray(mb['x'].shape[0], jnp.float32)

  def step_for(tx, **kw):
    def step(params, opt_state, batch, **call_kw):
      loss, updates, opt_state = accum_jax.value_and_update(
          loss_fn, tx, **kw)(params, opt_state, batch, **call_kw)
      return optax.apply_updates(params, updates), opt_state, loss
    return step

  rows = []
  for policy in ('propagate', 'skip_microbatch', 'skip_step'):
    tx = accum_jax.accumulate(optax.adam(1e-3), K, nonfinite=policy)
    state = tx.init(params)
    rows.append((f'nonfinite={policy!r}',
                 peak_mib(step_for(tx), params, state, batch)))
    if policy == 'propagate':
      rows.append(('weight_fn (guarded)', peak_mib(
          step_for(tx, weight_fn=weighted), params, state, batch)))
      num_real = jnp.asarray(K, jnp.int32)
      rows.append(('num_real_microbatches', peak_mib(
          lambda p, s, b, r, tx=tx: step_for(tx)(p, s, b,
                                                  num_real_microbatches=r),
          params, state, batch, num_real)))

  # A hand-written scan with the same adam, for the ratio.
  adam = optax.adam(1e-3)

  def manual(params, opt_state, batch):
    reshaped = jax.tree.map(lambda x: x.reshape(BATCH // K, K, *x.shape[1:]),
                            batch)

    def body(acc, j):
      mb = jax.tree.map(lambda x: x[:, j], reshaped)
      loss, g = jax.value_and_grad(loss_fn)(params, mb)
      return jax.tree.map(jnp.add, acc, g), loss

    acc, losses = jax.lax.scan(
        body, jax.tree.map(jnp.zeros_like, params), jnp.arange(K))
    grads = jax.tree.map(lambda a: a / K, acc)
    updates, opt_state = adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses.mean()

  rows.append(('hand-written scan', peak_mib(manual, params, adam.init(params),
                                              batch)))
  for name, mib in rows:
    print(f'{name:28s} {mib:8.2f} MiB')


if __name__ == '__main__':
  main()
