"""Compiled peak memory of every in-step path against its hand-written twin.

The README's train step, as users run it: one jitted function
``params, opt_state, batch -> (loss, new_params, new_opt_state)`` doing
``accum_jax.value_and_update(loss_fn, tx, ...)`` then ``optax.apply_updates``,
params and opt_state donated, on a parameter-heavy model (6 x 1024 x 1024 tanh
MLP, float32, adam, batch 64, k = 8), where one parameter-sized buffer more is
what decides whether a model fits.

The twin is the loop one would write by hand: the strided split (reshape to
``(B // k, k, ...)``, index axis 1), a fresh float32 zeros carry,
``acc + w * grad`` in a ``lax.scan``, divide once, ``inner.update``,
``apply_updates``; selects only, no ``lax.cond``. Nothing is run: every figure
is XLA's ``memory_analysis()`` of the compiled step (see
:func:`accum_jax.compiled_memory`).

  python -m benchmarks.memory_paths            # the table
  python -m benchmarks.memory_paths --no-apply # steps returning the updates
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import optax

import accum_jax

MIB = 2 ** 20
DONATE = (0, 1)


def setup(width=1024, depth=6, batch_size=64):
  params = [{'w': jax.ShapeDtypeStruct((width, width), jnp.float32),
             'b': jax.ShapeDtypeStruct((width,), jnp.float32)}
            for _ in range(depth)]
  batch = {'x': jax.ShapeDtypeStruct((batch_size, width), jnp.float32),
           'y': jax.ShapeDtypeStruct((batch_size, width), jnp.float32)}
  return params, batch


def loss_fn(params, batch):
  h = batch['x']
  for layer in params:
    h = jnp.tanh(h @ layer['w'] + layer['b'])
  return jnp.mean((h - batch['y']) ** 2)


def weight_fn(microbatch):
  """A data-dependent weight, like a count of real tokens."""
  return jnp.sum(microbatch['x'][:, 0] > 0).astype(jnp.float32)


def accum_step(inner, k, *, apply=True, weighted=False, ragged=False,
               nonfinite='propagate', noise=False, cross_step=True,
               norms=False):
  tx = accum_jax.accumulate(inner, k, nonfinite=nonfinite,
                            track_noise_scale=noise, cross_step=cross_step,
                            track_norms=norms)
  grad_step = accum_jax.value_and_update(
      loss_fn, tx, weight_fn=weight_fn if weighted else None)

  def step(params, opt_state, batch, *num_real):
    kwargs = {'num_real_microbatches': num_real[0]} if ragged else {}
    loss, updates, opt_state = grad_step(params, opt_state, batch, **kwargs)
    if not apply:
      return loss, updates, opt_state
    return loss, optax.apply_updates(params, updates), opt_state

  return step, tx.init


def twin_step(inner, k, *, apply=True, weighted=False, ragged=False,
              norms=False, noise=False):
  """The hand-written loop: selects only, no ``lax.cond``. With ``norms``
  it also returns the norms of the mean gradient and of the updates, as a
  trainer that logs them does; with ``noise``, the sum of each micro-batch
  gradient's squared norm, as a hand-written noise scale estimator takes
  it."""

  def step(params, opt_state, batch, *num_real):
    xs = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]),
                      batch)

    def body(carry, j):
      acc, w_sum, l_sum, sq_sum = carry
      mb = jax.tree.map(
          lambda x: jax.lax.dynamic_index_in_dim(x, j, 1, keepdims=False), xs)
      loss, grads = jax.value_and_grad(loss_fn)(params, mb)
      w = weight_fn(mb) if weighted else jnp.ones([], jnp.float32)
      if ragged:
        w = jnp.where(j < num_real[0], w, 0.0)
      if noise:
        sq_sum = sq_sum + optax.tree.norm(grads, squared=True)
      acc = jax.tree.map(lambda a, g: a + w * g, acc, grads)
      return (acc, w_sum + w, l_sum + w * loss, sq_sum), None

    init = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            jnp.zeros([]), jnp.zeros([]), jnp.zeros([]))
    (acc, w_sum, l_sum, sq_sum), _ = jax.lax.scan(
        body, init, jnp.arange(k, dtype=jnp.int32))
    if weighted or ragged:
      w_sum = jnp.where(w_sum > 0, w_sum, 1.0)
    grads = jax.tree.map(lambda a: a / w_sum, acc)
    updates, opt_state = inner.update(grads, opt_state, params)
    loss = l_sum / w_sum
    if norms:
      loss = (loss, optax.tree.norm(grads), optax.tree.norm(updates))
    if noise:
      loss = (loss, sq_sum, optax.tree.norm(acc, squared=True))
    if not apply:
      return loss, updates, opt_state
    return loss, optax.apply_updates(params, updates), opt_state

  return step, inner.init


def full_batch_step(inner, *, apply=True):
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = inner.update(grads, opt_state, params)
    if not apply:
      return loss, updates, opt_state
    return loss, optax.apply_updates(params, updates), opt_state

  return step, inner.init


def peak_mib(step_and_init, params, batch, *extra):
  step, init = step_and_init
  opt_state = jax.eval_shape(init, params)
  memory = accum_jax.compiled_memory(step, params, opt_state, batch, *extra,
                                     donate_argnums=DONATE)
  return memory.peak_bytes / MIB


def rows(k=8, apply=True):
  """``(path, accum_jax step, twin step, extra args)`` for each path."""
  inner = optax.adam(1e-3)
  r = jax.ShapeDtypeStruct((), jnp.int32)
  plain = functools.partial(twin_step, inner, k, apply=apply)
  return [
      ('plain value_and_update', accum_step(inner, k, apply=apply), plain(),
       ()),
      ('weight_fn=', accum_step(inner, k, apply=apply, weighted=True),
       plain(weighted=True), ()),
      ('num_real_microbatches= (traced)',
       accum_step(inner, k, apply=apply, ragged=True), plain(ragged=True),
       (r,)),
      ("nonfinite='skip_step' (vs plain twin)",
       accum_step(inner, k, apply=apply, nonfinite='skip_step'), plain(), ()),
      ('track_noise_scale=True (vs plain twin)',
       accum_step(inner, k, apply=apply, noise=True), plain(), ()),
      ('track_noise_scale=True (vs twin taking each norm)',
       accum_step(inner, k, apply=apply, noise=True), plain(noise=True), ()),
      ('k=1 (vs full batch)', accum_step(inner, 1, apply=apply),
       full_batch_step(inner, apply=apply), ()),
      ('cross_step=False', accum_step(inner, k, apply=apply,
                                      cross_step=False), plain(), ()),
      ('cross_step=False, weight_fn=',
       accum_step(inner, k, apply=apply, weighted=True, cross_step=False),
       plain(weighted=True), ()),
      ('cross_step=False, k=1 (vs full batch)',
       accum_step(inner, 1, apply=apply, cross_step=False),
       full_batch_step(inner, apply=apply), ()),
      ("track_norms=('grad',) (vs plain twin)",
       accum_step(inner, k, apply=apply, norms=('grad',)), plain(), ()),
      ('track_norms=True (vs twin logging both)',
       accum_step(inner, k, apply=apply, norms=True), plain(norms=True), ()),
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--no-apply', action='store_true',
                      help='steps return the updates (no apply_updates)')
  parser.add_argument('-k', type=int, default=8)
  args = parser.parse_args()
  params, batch = setup()
  apply = not args.no_apply
  print(f'{jax.default_backend()}, 6 x 1024 x 1024 tanh MLP, adam, batch 64, '
        f'k={args.k}, {"with" if apply else "without"} apply_updates, params '
        'and opt_state donated')
  print('| path | accum_jax MiB | twin MiB | ratio |\n|---|---:|---:|---:|')
  for name, ours, twin, extra in rows(args.k, apply):
    a = peak_mib(ours, params, batch, *extra)
    b = peak_mib(twin, params, batch, *extra)
    print(f'| {name} | {a:.2f} | {b:.2f} | {a / b:.3f} |', flush=True)


if __name__ == '__main__':
  main()
