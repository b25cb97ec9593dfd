"""Checkpoint and resume with orbax mid-window: bit-identical to no restart."""

import jax
import jax.numpy as jnp
import optax
import pytest

import accum_jax
from tests._helpers import assert_trees_equal

ocp = pytest.importorskip('orbax.checkpoint')

K = 3


def loss_fn(params, batch):
  h = jnp.tanh(batch['x'] @ params['w'].astype(jnp.float32))
  pred = h @ params['v'] + params['b']
  return jnp.mean((pred - batch['y']) ** 2)


def make_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {'w': jax.random.normal(k1, (4, 5)).astype(jnp.bfloat16),
          'v': jax.random.normal(k2, (5,)), 'b': jnp.zeros(())}


def batches(n, size):
  for i in range(n):
    k1, k2 = jax.random.split(jax.random.key(100 + i))
    x = jax.random.normal(k1, (size, 4))
    if i == 1:  # a non-finite micro-batch, so the skip counters are non-zero
      x = x.at[0, 0].set(jnp.nan)
    yield {'x': x, 'y': jax.random.normal(k2, (size,))}


def make_tx():
  return accum_jax.accumulate(optax.adamw(0.05), K,
                              nonfinite='skip_microbatch')


def save(path, tree):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def restore(path, tx, params_like):
  """Restores into the abstract state of a freshly made transform."""
  target = jax.eval_shape(
      lambda p: {'params': p, 'opt_state': tx.init(p)}, params_like)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)


def cross_step_run(tx, params, opt_state, data):
  @jax.jit
  def micro_step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for batch in data:
    params, opt_state = micro_step(params, opt_state, batch)
  return params, opt_state


def test_cross_step_resume_mid_window(tmp_path):
  data = list(batches(8, 4))
  tx = make_tx()
  params = make_params()
  full = cross_step_run(tx, params, tx.init(params), data)

  # Stop after 4 micro-steps: window 2 holds one micro-batch.
  params_4, state_4 = cross_step_run(tx, params, tx.init(params), data[:4])
  assert int(state_4.count) == 1 and int(state_4.step) == 1
  assert int(state_4.skipped_microbatches) == 1
  save(tmp_path / 'ckpt', {'params': params_4, 'opt_state': state_4})

  tx2 = make_tx()  # a new process would rebuild the transform
  restored = restore(tmp_path / 'ckpt', tx2, params)
  assert isinstance(restored['opt_state'], accum_jax.AccumulateState)
  assert_trees_equal(restored['opt_state'], state_4)
  resumed = cross_step_run(tx2, restored['params'], restored['opt_state'],
                           data[4:])
  assert_trees_equal(resumed, full)


def in_step_run(tx, params, opt_state, data):
  step = jax.jit(accum_jax.value_and_update(loss_fn, tx))
  for batch in data:
    _, updates, opt_state = step(params, opt_state, batch)
    params = optax.apply_updates(params, updates)
  return params, opt_state


def test_in_step_resume(tmp_path):
  data = list(batches(4, 4 * K))
  tx = make_tx()
  params = make_params()
  full = in_step_run(tx, params, tx.init(params), data)
  mid = in_step_run(tx, params, tx.init(params), data[:2])
  save(tmp_path / 'ckpt', {'params': mid[0], 'opt_state': mid[1]})
  tx2 = make_tx()
  restored = restore(tmp_path / 'ckpt', tx2, params)
  resumed = in_step_run(tx2, restored['params'], restored['opt_state'],
                        data[2:])
  assert_trees_equal(resumed, full)
  assert int(resumed[1].step) == 4 and int(resumed[1].skipped_microbatches) == 1


def test_resume_half_window_into_in_step(tmp_path):
  """A window started cross-step, saved with count != 0, restored, and
  finished by the in-step driver, as without the restart."""
  data = list(batches(3, 4 * K))
  tx = make_tx()
  params = make_params()
  micro = [jax.tree.map(lambda x, j=j: x[j::K], data[0]) for j in range(2)]
  params_a, state_a = cross_step_run(tx, params, tx.init(params), micro)
  assert int(state_a.count) == 2
  full = in_step_run(tx, params_a, state_a, data[1:])
  save(tmp_path / 'ckpt', {'params': params_a, 'opt_state': state_a})
  restored = restore(tmp_path / 'ckpt', make_tx(), params)
  resumed = in_step_run(make_tx(), restored['params'], restored['opt_state'],
                        data[1:])
  assert_trees_equal(resumed, full)
