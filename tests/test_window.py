"""Ragged windows (in-step num_real_microbatches, weight-0 micro-batches),
windows ended early cross-step (end_window=, flush) and k schedules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax
from tests._helpers import (
    assert_trees_close,
    assert_trees_equal,
    linear_batch,
    linear_loss,
    linear_params,
    micro_grads,
)

K = 4
B = 16


def real_rows(batch, r, k=K):
  """The rows of micro-batches 0..r-1 of the strided split."""
  keep = np.arange(B) % k < r
  return jax.tree.map(lambda x: x[keep], batch)


@functools.lru_cache
def ragged_step():
  traces = []
  tx = accum_jax.accumulate(optax.adam(0.1), K)
  vu = accum_jax.value_and_update(linear_loss, tx)

  @jax.jit
  def step(params, opt_state, batch, r):
    traces.append(1)
    return vu(params, opt_state, batch, num_real_microbatches=r)

  return tx, step, traces


def test_in_step_ragged_matches_real_microbatches_without_retracing():
  tx, step, traces = ragged_step()
  params = linear_params()
  batch = linear_batch()
  adam = optax.adam(0.1)
  for r in range(1, K + 1):
    # Padding rows hold garbage (NaN): they must not leak into the update.
    padded = jax.tree.map(
        lambda x, r=r: jnp.where((jnp.arange(B) % K >= r).reshape(
            (B,) + (1,) * (x.ndim - 1)), jnp.nan, x), batch)
    loss, updates, state = step(params, tx.init(params), padded,
                                jnp.int32(r))
    ref_loss, ref_grads = jax.value_and_grad(linear_loss)(params,
                                                      real_rows(batch, r))
    ref_updates, ref_inner = adam.update(ref_grads, adam.init(params), params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert_trees_close(updates, ref_updates, rtol=1e-6, atol=1e-6)
    assert_trees_close(state.inner_state, ref_inner, rtol=1e-6, atol=1e-6)
    assert int(state.count) == 0 and int(state.step) == 1
  assert len(traces) == 1


def test_in_step_no_real_microbatch_is_no_step():
  tx, step, _ = ragged_step()
  params = linear_params()
  state = tx.init(params)
  loss, updates, new_state = step(params, state, linear_batch(), jnp.int32(0))
  assert float(loss) == 0.0
  assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert_trees_equal(new_state.inner_state, state.inner_state)


def test_value_and_grad_ragged():
  params = linear_params()
  batch = linear_batch()
  f = jax.jit(lambda p, b, r: accum_jax.value_and_grad(linear_loss, K)(
      p, b, num_real_microbatches=r))
  for r in (1, 3):
    loss, grads = f(params, batch, jnp.int32(r))
    ref_loss, ref_grads = jax.value_and_grad(linear_loss)(params,
                                                      real_rows(batch, r))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert_trees_close(grads, ref_grads, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('r', [-1, K + 1])
def test_concrete_num_real_out_of_range(r):
  f = accum_jax.value_and_grad(linear_loss, K)
  with pytest.raises(ValueError, match=rf'num_real_microbatches must be in '
                     rf'\[0, {K}\] \(num_microbatches\), got {r}'):
    f(linear_params(), linear_batch(), num_real_microbatches=r)


def test_num_real_must_be_an_integer_scalar():
  f = accum_jax.value_and_grad(linear_loss, K)
  with pytest.raises(TypeError, match='num_real_microbatches must be an '
                     'integer scalar, got shape \\(\\) and dtype float32'):
    f(linear_params(), linear_batch(), num_real_microbatches=jnp.float32(2))


@pytest.mark.parametrize('policy', ['skip_microbatch', 'skip_step'])
def test_weight_zero_padding_microbatch_with_nan_loss(policy):
  """A fully padded micro-batch has a 0/0 token-mean loss; weight 0 drops it.

  Under the skip policies only: 'propagate' adds 0 * NaN (plain arithmetic),
  which keeps a scatter gradient in place in the carry.
  """

  def token_loss(params, batch):
    err = (batch['x'] @ params['w'] + params['b'] - batch['y']) ** 2
    return jnp.sum(err * batch['mask']) / jnp.sum(batch['mask'])

  params = linear_params()
  batch = linear_batch()
  mask = jnp.ones(B).at[jnp.arange(B) % K == 3].set(0.0).at[0].set(0.0)
  batch = {**batch, 'mask': mask}
  tx = accum_jax.accumulate(optax.sgd(1.0), K, nonfinite=policy)
  loss, updates, state = accum_jax.value_and_update(
      token_loss, tx, weight_fn=lambda mb: jnp.sum(mb['mask']))(
          params, tx.init(params), batch)
  assert int(state.skipped_microbatches) == 0  # weight 0: not a skip
  assert int(state.skipped_steps) == 0
  ref_loss, ref_grads = jax.value_and_grad(token_loss)(params, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert_trees_close(updates, jax.tree.map(lambda g: -g, ref_grads), rtol=1e-6, atol=1e-6)


def test_cross_step_end_window_traced():
  params = linear_params()
  grads = micro_grads(linear_loss, params, linear_batch(), K)
  tx = accum_jax.accumulate(optax.sgd(1.0), K)
  update = jax.jit(lambda g, s, e: tx.update(g, s, params, end_window=e))
  state = tx.init(params)
  updates, state = update(grads[0], state, False)
  assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, params))
  updates, state = update(grads[1], state, True)
  # Normalised by the 2 micro-batches seen (not divided by k).
  assert_trees_close(updates, jax.tree.map(lambda a, b: -(a + b) / 2, *grads[:2]), rtol=1e-6, atol=1e-6)
  assert int(state.count) == 0 and int(state.step) == 1
  # The next window has the full length again.
  for j in range(K):
    updates, state = update(grads[j], state, False)
  assert_trees_close(updates, jax.tree.map(lambda *g: -sum(g) / K, *grads), rtol=1e-6, atol=1e-6)
  assert int(state.step) == 2


def test_end_window_must_be_scalar():
  tx = accum_jax.accumulate(optax.sgd(1.0), K)
  params = linear_params()
  with pytest.raises(ValueError, match='end_window must be a scalar bool, got '
                     r'an array of shape \(2,\)'):
    tx.update(params, tx.init(params), params, end_window=jnp.array([1, 0]))


def test_flush_weighted_and_empty():
  params = linear_params()
  grads = micro_grads(linear_loss, params, linear_batch(), K)
  tx = accum_jax.accumulate(optax.adam(0.1), K)
  flush = jax.jit(functools.partial(accum_jax.flush, tx))
  state = tx.init(params)
  updates, same = flush(state, params)  # empty: nothing to apply
  assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert_trees_equal(same, state)
  for g, w in zip(grads[:3], (1.0, 2.0, 3.0), strict=False):
    _, state = tx.update(g, state, params, weight=w)
  updates, state = flush(state, params)
  mean = jax.tree.map(lambda a, b, c: (a + 2 * b + 3 * c) / 6, *grads[:3])
  adam = optax.adam(0.1)
  ref_updates, ref_inner = adam.update(mean, adam.init(params), params)
  assert_trees_close(updates, ref_updates, rtol=1e-6, atol=1e-6)
  assert_trees_close(state.inner_state, ref_inner, rtol=1e-6, atol=1e-6)
  assert int(state.count) == 0 and int(state.step) == 1


def test_flush_checks_its_arguments():
  params = linear_params()
  with pytest.raises(TypeError, match='flush needs a transform made by '
                     'accum_jax.accumulate, got GradientTransformationExtraArgs'):
    accum_jax.flush(optax.adam(0.1), optax.adam(0.1).init(params))


def test_schedule_window_lengths_and_inner_schedule():
  """k = 1, 1, then 3: the inner lr schedule sees one step per window."""
  params = {'w': jnp.zeros(())}
  def k_schedule(step):
    return jnp.where(step < 2, 1, 3)
  def lr(count):
    return 1.0 / (count + 1.0)
  tx = accum_jax.accumulate(optax.sgd(lr), k_schedule)
  update = jax.jit(tx.update)
  state = tx.init(params)
  emitted = []
  for i in range(8):
    g = {'w': jnp.asarray(float(i + 1))}
    updates, state = update(g, state, params)
    emitted.append(float(updates['w']))
  # Windows: [1] [2] [3 4 5] [6 7 8]; inner steps 0, 1, 2, 3.
  expected = [-1.0, -2.0 / 2, 0, 0, -4.0 / 3, 0, 0, -7.0 / 4]
  np.testing.assert_allclose(emitted, expected, rtol=1e-6)
  assert int(state.step) == 4
  assert int(state.inner_state[-1].count) == 4


def test_schedule_rejected_in_step():
  tx = accum_jax.accumulate(optax.sgd(1.0), lambda step: 2)
  with pytest.raises(TypeError, match='value_and_update runs a fixed number '
                     'of micro-batches per step, but tx was built with a '
                     'num_microbatches schedule'):
    accum_jax.value_and_update(linear_loss, tx)


def test_schedule_must_return_an_integer():
  tx = accum_jax.accumulate(optax.sgd(1.0), lambda step: 2.0)
  params = linear_params()
  with pytest.raises(TypeError, match='A num_microbatches schedule must return '
                     r'an integer scalar, got shape \(\) and dtype float32'):
    tx.update(params, tx.init(params), params)


def test_padding_microbatches_are_not_computed():
  calls = []

  def counting_loss(params, batch):
    jax.debug.callback(lambda: calls.append(1))
    return linear_loss(params, batch)

  f = jax.jit(lambda p, b, r: accum_jax.value_and_grad(counting_loss, K)(
      p, b, num_real_microbatches=r))
  jax.block_until_ready(f(linear_params(), linear_batch(), jnp.int32(1)))
  jax.effects_barrier()
  assert len(calls) == 1
