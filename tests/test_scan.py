"""Tests of the in-step drivers against full-batch computations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax
from tests._helpers import assert_trees_close, optimizer_table

B = 16


def _init(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {'w1': jax.random.normal(k1, (3, 8)) * 0.5,
          'b1': jnp.zeros(8),
          'w2': jax.random.normal(k2, (8, 1)) * 0.5}, k3


def _batch(key, n=B):
  x = jax.random.normal(key, (n, 3))
  return {'x': x, 'y': jnp.sin(x.sum(1, keepdims=True))}


def loss_fn(params, batch):
  h = jnp.tanh(batch['x'] @ params['w1'] + params['b1'])
  return jnp.mean((h @ params['w2'] - batch['y']) ** 2)


def _close(a, b, rtol=1e-5, atol=1e-6):
  assert_trees_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize('k', [1, 2, 4, 8, 16])
def test_value_and_grad_equals_full_batch(k):
  params, key = _init()
  batch = _batch(key)
  value, grads = jax.jit(accum_jax.value_and_grad(loss_fn, k))(params, batch)
  ref_value, ref_grads = jax.value_and_grad(loss_fn)(params, batch)
  _close(value, ref_value)
  _close(grads, ref_grads)


def test_value_and_grad_with_aux_and_extra_args():
  params, key = _init()
  batch = _batch(key)

  def loss_aux(params, batch, scale, *, offset):
    err = scale * (batch['x'] @ params['w1']).sum(1) + offset
    return jnp.mean(err ** 2), {'mean_err': jnp.mean(err),
                                'n': jnp.asarray(err.shape[0], jnp.int32),
                                'any_big': jnp.any(err > 3.0)}

  f = accum_jax.value_and_grad(loss_aux, 4, has_aux=True)
  (value, aux), grads = f(params, batch, 2.0, offset=0.5)
  (ref_value, ref_aux), ref_grads = jax.value_and_grad(
      loss_aux, has_aux=True)(params, batch, 2.0, offset=0.5)
  _close(value, ref_value)
  _close(grads, ref_grads)
  _close(aux['mean_err'], ref_aux['mean_err'])
  assert aux['n'].dtype == jnp.int32 and int(aux['n']) == B  # counts add up
  assert bool(aux['any_big']) == bool(ref_aux['any_big'])


def test_strided_split_and_stacked_aux():
  params, _ = _init()
  batch = {'x': jnp.zeros((12, 3)), 'row': jnp.arange(12)}

  def loss_rows(params, batch):
    return jnp.sum(params['w1']) * 0.0, batch['row']

  (_, rows), _ = accum_jax.value_and_grad(loss_rows, 3, has_aux=True,
                                          aux='stack')(params, batch)
  np.testing.assert_array_equal(rows, [[0, 3, 6, 9], [1, 4, 7, 10],
                                       [2, 5, 8, 11]])
  np.testing.assert_array_equal(accum_jax.split_batch(batch, 3)['row'], rows)


def test_token_weighting_matches_full_batch_token_mean():
  # Padded sequences with very different numbers of real tokens per row.
  key = jax.random.key(3)
  n, t = 8, 6
  tokens = jax.random.normal(key, (n, t, 2))
  lengths = jnp.array([6, 1, 2, 6, 1, 1, 5, 3])
  mask = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)
  batch = {'x': tokens, 'mask': mask}
  w = jnp.array([0.3, -0.7])

  def token_mean_loss(w, batch):
    per_token = (batch['x'] @ w - 1.0) ** 2
    return jnp.sum(per_token * batch['mask']) / jnp.sum(batch['mask'])

  def num_tokens(mb):
    return jnp.sum(mb['mask'])

  ref_value, ref_grads = jax.value_and_grad(token_mean_loss)(w, batch)
  value, grads = accum_jax.value_and_grad(token_mean_loss, 4,
                                          weight_fn=num_tokens)(w, batch)
  _close(value, ref_value)
  _close(grads, ref_grads)
  # The mean of per-micro-batch means (the classic bug) is measurably off.
  _, naive = accum_jax.value_and_grad(token_mean_loss, 4)(w, batch)
  assert float(jnp.max(jnp.abs(naive - ref_grads))) > 1e-2


def test_rng_is_folded_per_microbatch():
  params, _ = _init()
  batch = {'x': jnp.ones((4, 64))}

  def noisy(params, batch, *, rng):
    mask = jax.random.bernoulli(rng, 0.5, batch['x'].shape)
    return jnp.sum(params['w1']) * 0.0, mask

  rng = jax.random.key(7)
  (_, masks), _ = accum_jax.value_and_grad(noisy, 4, has_aux=True,
                                           aux='stack')(params, batch,
                                                           rng=rng)
  for j in range(4):
    np.testing.assert_array_equal(
        masks[j], jax.random.bernoulli(jax.random.fold_in(rng, j), 0.5, (1, 64)))
  assert not np.array_equal(masks[0], masks[1])


def test_rng_pytree_of_raw_keys():
  params, _ = _init()
  batch = {'x': jnp.ones((2, 3))}

  def noisy(params, batch, *, rng):
    return jnp.sum(params['w1']) * 0.0, jax.random.uniform(rng['dropout'])

  rng = {'dropout': jax.random.PRNGKey(1)}
  (_, u), _ = accum_jax.value_and_grad(noisy, 2, has_aux=True,
                                       aux='stack')(params, batch, rng=rng)
  np.testing.assert_allclose(
      u, [jax.random.uniform(jax.random.fold_in(rng['dropout'], j))
          for j in range(2)])


def test_typed_keys_under_any_name_are_folded_per_microbatch():
  """A new-style key reaches micro-batch j as fold_in(key, j) under any
  name (Equinox's key=, Flax's rngs={...}, an unbatched positional argument,
  a key array); a raw uint32 key outside rng= is data and passes as is."""
  params, _ = _init()
  batch = {'x': jnp.ones((4, 8))}
  key, keys = jax.random.key(3), jax.random.split(jax.random.key(4), 2)
  raw = jax.random.PRNGKey(5)

  def draws(params, batch, pos_key, *, key, rngs, raw):
    del batch
    return jnp.sum(params['w1']) * 0.0, {
        'key': jax.random.uniform(key), 'pos': jax.random.uniform(pos_key),
        'rngs': jax.random.uniform(rngs['dropout']),
        'array': jax.vmap(jax.random.uniform)(keys_arg(rngs)),
        'raw': raw}

  def keys_arg(rngs):
    return rngs['pair']

  (_, got), _ = jax.jit(accum_jax.value_and_grad(
      draws, 4, has_aux=True, aux='stack', batch_argnums=1))(
          params, batch, key, key=key, rngs={'dropout': key, 'pair': keys},
          raw=raw)
  for j in range(4):
    folded = jax.random.uniform(jax.random.fold_in(key, j))
    for name in ('key', 'pos', 'rngs'):
      np.testing.assert_array_equal(got[name][j], folded)
    np.testing.assert_array_equal(got['array'][j], [
        jax.random.uniform(jax.random.fold_in(kk, j)) for kk in keys])
    np.testing.assert_array_equal(got['raw'][j], raw)
  assert len(set(np.asarray(got['key']).tolist())) == 4


def test_microbatches_run_inside_the_loop_only():
  params, key = _init()
  batch = _batch(key)
  runs = []

  def counted(params, batch):
    jax.debug.callback(lambda: runs.append(1))
    return loss_fn(params, batch)

  f = jax.jit(accum_jax.value_and_grad(counted, 4))
  f(params, batch)
  jax.effects_barrier()
  assert len(runs) == 4


OPTIMIZERS = optimizer_table(
    clip_norm=0.05, lr_schedule=optax.linear_schedule(0.05, 0.001, 3))


@functools.lru_cache
def full_batch_steps(name):
  """Four full-batch steps of one inner optimizer (the reference of every k):
  the loss and params of each step, and the final state."""
  inner = OPTIMIZERS[name]()
  params, key = _init()
  state = inner.init(params)

  @jax.jit
  def ref_step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = inner.update(grads, state, params)
    return loss, optax.apply_updates(params, updates), state

  steps = []
  for t in range(4):
    loss, params, state = ref_step(params, state,
                                   _batch(jax.random.fold_in(key, t)))
    steps.append((loss, params))
  return steps, state


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
@pytest.mark.parametrize('k', [2, 8])
def test_value_and_update_equals_full_batch_steps(name, k):
  inner = OPTIMIZERS[name]()
  tx = accum_jax.accumulate(inner, k)
  params, key = _init()
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, updates, state = accum_jax.value_and_update(loss_fn, tx)(
        params, state, batch)
    return loss, optax.apply_updates(params, updates), state

  ref_steps, ref_state = full_batch_steps(name)
  for t, (ref_loss, ref_params) in enumerate(ref_steps):
    batch = _batch(jax.random.fold_in(key, t))
    loss, params, state = step(params, state, batch)
    _close(loss, ref_loss)
    _close(params, ref_params)
  _close(state.inner_state, ref_state)
  assert int(state.count) == 0


def test_value_and_update_advances_inner_count_once_per_call():
  tx = accum_jax.accumulate(optax.adam(0.01), 4)
  params, key = _init()
  state = tx.init(params)
  step = jax.jit(accum_jax.value_and_update(loss_fn, tx), donate_argnums=(1,))
  for t in range(3):
    _, _, state = step(params, state, _batch(key))
    assert int(state.inner_state[0].count) == t + 1
    assert int(state.count) == 0 and float(state.weight) == 0.0
    assert all(not jnp.any(a) for a in jax.tree.leaves(state.acc))


def test_value_and_update_equals_cross_step_updates():
  k = 4
  tx = accum_jax.accumulate(optax.adamw(0.01, weight_decay=0.1), k)
  params, key = _init()
  batch = _batch(key)
  _, updates, state = accum_jax.value_and_update(loss_fn, tx)(
      params, tx.init(params), batch)
  cross_state = tx.init(params)
  micro = accum_jax.split_batch(batch, k)
  for j in range(k):
    grads = jax.grad(loss_fn)(params, jax.tree.map(lambda x: x[j], micro))
    cross_updates, cross_state = tx.update(grads, cross_state, params)
  _close(updates, cross_updates)
  _close(state, cross_state)


def test_value_and_update_zero_weights_gives_zero_updates():
  tx = accum_jax.accumulate(optax.adamw(0.01, weight_decay=0.1), 4)
  params, key = _init()
  state = tx.init(params)
  loss, updates, new_state = jax.jit(accum_jax.value_and_update(
      loss_fn, tx, weight_fn=lambda mb: 0.0))(params, state, _batch(key))
  assert float(loss) == 0.0
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  _close(new_state.inner_state, state.inner_state, rtol=0, atol=0)


def test_bf16_params_accumulate_in_float32():
  params, key = _init()
  params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  batch = _batch(key, 64)

  def loss16(params, batch):
    return loss_fn(params, jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                        batch))

  tx = accum_jax.accumulate(optax.sgd(1.0), 16)
  loss, updates, state = jax.jit(accum_jax.value_and_update(loss16, tx))(
      params16, tx.init(params16), batch)
  assert loss.dtype == jnp.bfloat16
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.acc))
  # Reference: the 16 bf16 micro-gradients summed in float64.
  micro = accum_jax.split_batch(batch, 16)
  grads = [jax.grad(loss16)(params16, jax.tree.map(lambda x: x[j], micro))
           for j in range(16)]
  exact = jax.tree.map(
      lambda *g: np.mean([np.asarray(x, np.float64) for x in g], 0), *grads)
  _close(jax.tree.map(lambda u: -np.asarray(u, np.float64), updates), exact,
         rtol=1e-2, atol=1e-3)


def test_no_retrace_on_second_call():
  traces = []
  tx = accum_jax.accumulate(optax.adam(0.01), 4)

  def counted(params, batch):
    traces.append(1)
    return loss_fn(params, batch)

  step = jax.jit(accum_jax.value_and_update(counted, tx), donate_argnums=(1,))
  params, key = _init()
  state = tx.init(params)
  _, _, state = step(params, state, _batch(key))
  n = len(traces)
  for t in range(3):
    _, _, state = step(params, state, _batch(jax.random.fold_in(key, t)))
  assert len(traces) == n


def test_remat_gives_the_same_gradients():
  params, key = _init()
  batch = _batch(key)
  ref = accum_jax.value_and_grad(loss_fn, 4)(params, batch)
  for remat in (True, jax.checkpoint_policies.nothing_saveable):
    _close(accum_jax.value_and_grad(loss_fn, 4, remat=remat)(params, batch),
           ref)
