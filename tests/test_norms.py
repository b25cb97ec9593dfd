"""The window's gradient and update norms (accumulate(track_norms=...),
accum_jax.window_norms) against the full-batch gradient's norm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax

B, K = 16, 4


def loss_fn(params, batch):
  h = jnp.tanh(batch['x'] @ params['w1'])
  err = (h @ params['w2'] - batch['y']) ** 2
  mask = batch['mask']
  return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def setup(seed=0):
  rng = np.random.default_rng(seed)
  params = {'w1': jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
            'w2': jnp.asarray(rng.normal(size=(7,)), jnp.float32)}
  batch = {'x': jnp.asarray(rng.normal(size=(B, 5)), jnp.float32),
           'y': jnp.asarray(rng.normal(size=(B,)), jnp.float32),
           'mask': jnp.asarray(rng.random(B) < 0.7, jnp.float32)}
  return params, batch


def token_count(mb):
  return jnp.sum(mb['mask'])


def inner():
  # Clipping inside the inner optimizer: the logged norm is the raw one.
  return optax.chain(optax.clip_by_global_norm(0.01), optax.adam(1e-2))


def test_in_step_norms_are_the_full_batch_gradients_and_the_updates():
  params, batch = setup()
  tx = accum_jax.accumulate(inner(), K, track_norms=True)
  step = jax.jit(accum_jax.value_and_update(loss_fn, tx, weight_fn=token_count))
  _, updates, state = step(params, tx.init(params), batch)
  norms = accum_jax.window_norms(state)
  full = optax.tree.norm(jax.grad(loss_fn)(params, batch))
  np.testing.assert_allclose(norms.grad, full, rtol=1e-6)
  assert norms.grad > 0.01  # above the clip: the norm is taken before it
  ref_updates, _ = inner().update(jax.grad(loss_fn)(params, batch),
                                  inner().init(params), params)
  np.testing.assert_allclose(norms.update, optax.tree.norm(ref_updates),
                             rtol=1e-6)
  np.testing.assert_allclose(norms.update, optax.tree.norm(updates),
                             rtol=1e-6)


@pytest.mark.parametrize('cross_step', [True, False])
def test_grad_only_and_a_second_step(cross_step):
  params, batch = setup()
  tx = accum_jax.accumulate(inner(), K, track_norms=('grad',),
                            cross_step=cross_step)
  step = jax.jit(accum_jax.value_and_update(loss_fn, tx, weight_fn=token_count))
  _, updates, state = step(params, tx.init(params), batch)
  params = optax.apply_updates(params, updates)
  _, _, state = step(params, state, setup(1)[1])
  norms = accum_jax.window_norms(state)
  assert norms.update == ()
  full = optax.tree.norm(jax.grad(loss_fn)(params, setup(1)[1]))
  np.testing.assert_allclose(norms.grad, full, rtol=1e-6)


def test_cross_step_norms_change_only_when_a_window_ends():
  params, batch = setup()
  tx = accum_jax.accumulate(optax.sgd(0.1), K, track_norms=True)
  state = tx.init(params)
  micro = [jax.tree.map(lambda x, j=j: x[j::K], batch) for j in range(K)]
  update = jax.jit(tx.update)
  for j, mb in enumerate(micro):
    grads = jax.grad(loss_fn)(params, mb)
    updates, state = update(grads, state, params, weight=token_count(mb))
    norms = accum_jax.window_norms(state)
    if j < K - 1:
      assert float(norms.grad) == 0.0 and float(norms.update) == 0.0
  full = optax.tree.norm(jax.grad(loss_fn)(params, batch))
  np.testing.assert_allclose(norms.grad, full, rtol=1e-6)
  np.testing.assert_allclose(norms.update, 0.1 * full, rtol=1e-6)
  np.testing.assert_allclose(norms.update, optax.tree.norm(updates),
                             rtol=1e-6)


def test_sum_mode_and_a_skipped_window():
  params, batch = setup()
  tx = accum_jax.accumulate(optax.sgd(1.0), K, use_grad_mean=False,
                            nonfinite='skip_step', track_norms=True)
  grads = [jax.grad(loss_fn)(params, jax.tree.map(lambda x, j=j: x[j::K],
                                                  batch)) for j in range(K)]
  state = tx.init(params)
  for g in grads:
    _, state = tx.update(g, state, params)
  total = jax.tree.map(lambda *g: sum(g), *grads)
  np.testing.assert_allclose(accum_jax.window_norms(state).grad,
                             optax.tree.norm(total), rtol=1e-6)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[0])
  for g in [bad] + grads[1:]:
    updates, state = tx.update(g, state, params)
  norms = accum_jax.window_norms(state)
  # Cross-step, the non-finite micro-batch is kept out of the sum; the
  # window is skipped and its norm is that of what it summed.
  rest = jax.tree.map(lambda *g: sum(g), *grads[1:])
  np.testing.assert_allclose(norms.grad, optax.tree.norm(rest), rtol=1e-6)
  assert float(norms.update) == 0.0 == float(optax.tree.norm(updates))
  assert int(state.skipped_steps) == 1


def test_norms_inside_a_flax_train_state():
  train_state = pytest.importorskip('flax.training.train_state')
  params, batch = setup()
  tx = accum_jax.accumulate(optax.sgd(0.1), K, track_norms=True)
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  state, _ = accum_jax.linen_train_step(
      state, batch, lambda p, b, rng: loss_fn(p, b), rng=jax.random.key(0),
      weight_fn=token_count)
  full = optax.tree.norm(jax.grad(loss_fn)(params, batch))
  np.testing.assert_allclose(accum_jax.window_norms(state.opt_state).grad,
                             full, rtol=1e-6)


def test_errors():
  params, _ = setup()
  state = accum_jax.accumulate(optax.sgd(0.1), K).init(params)
  with pytest.raises(ValueError, match=r'track_norms=True'):
    accum_jax.window_norms(state)
  with pytest.raises(ValueError, match=r"some of \('grad', 'update'\)"):
    accum_jax.accumulate(optax.sgd(0.1), K, track_norms=('loss',))
  tracked = accum_jax.accumulate(optax.sgd(0.1), K, track_norms=True)
  with pytest.raises(ValueError, match=r'keeps the window norms \(\) but'):
    tracked.update(params, state, params)
  with pytest.raises(TypeError, match='holding 0'):
    accum_jax.window_norms({'a': 1})
