"""accumulate against optax.MultiSteps: the same gradient streams, the same
updates and counters.

Cross-step, ``accumulate`` and ``optax.MultiSteps`` are driven side by side
on one stream of gradients (with NaNs, large updates, sum mode, schedules)
and must agree on every update, counter, ``skip_state`` and
``has_updated``. In-step, ``value_and_update`` is checked against the inner
optimizer driven by hand on the micro-batch gradients. The last part ports
optax's own MultiSteps tests (optax/transforms/_accumulation_test.py) where
the semantics coincide.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import accum_jax
from tests._helpers import assert_trees_close

PARAMS = {'w': jnp.array([0.5, -1.0, 2.0, 0.25]), 'b': jnp.array(0.1)}


def _stream(n, seed=0, nan_at=(), inf_at=(), large_at=()):
  """``n`` gradients like PARAMS; NaN, Inf or 10x-large ones where asked."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    g = {'w': rng.normal(size=4).astype(np.float32),
         'b': np.float32(rng.normal())}
    if i in large_at:
      g = jax.tree.map(lambda x: 10 * x, g)
    if i in nan_at:
      g['w'][1] = np.nan
    if i in inf_at:
      g['b'] = np.float32(-np.inf)
    out.append(jax.tree.map(jnp.asarray, g))
  return out


def _close(a, b, atol=1e-6):
  assert_trees_close(a, b, rtol=1e-5, atol=atol)


def _inner():
  return optax.chain(optax.clip_by_global_norm(3.0), optax.adam(0.1))


_LARGE = functools.partial(optax.skip_large_updates, max_squared_norm=50.0)
_SCHEDULE = lambda step: jnp.where(step < 2, 1, 3)  # noqa: E731 (optax's test)

CASES = {
    'mean, skip_not_finite': dict(
        k=3, use_grad_mean=True, fn=optax.skip_not_finite),
    'sum, skip_not_finite': dict(
        k=3, use_grad_mean=False, fn=optax.skip_not_finite),
    'mean, skip_large_updates': dict(k=3, use_grad_mean=True, fn=_LARGE),
    'sum, skip_large_updates': dict(k=4, use_grad_mean=False, fn=_LARGE),
    'schedule, skip_not_finite': dict(
        k=_SCHEDULE, use_grad_mean=True, fn=optax.skip_not_finite),
    'sum, no predicate': dict(k=3, use_grad_mean=False, fn=None),
}


@pytest.mark.parametrize('case', list(CASES))
def test_cross_step_matches_multisteps(case):
  c = CASES[case]
  ms = optax.MultiSteps(_inner(), c['k'], use_grad_mean=c['use_grad_mean'],
                        should_skip_update_fn=c['fn'])
  tx = accum_jax.accumulate(_inner(), c['k'], use_grad_mean=c['use_grad_mean'],
                            should_skip_update_fn=c['fn'])
  nan = () if c['fn'] is None else (2, 7, 8)
  stream = _stream(20, nan_at=nan, inf_at=(4,) if c['fn'] else (),
                   large_at=(1, 5, 6, 13))
  ms_state, state = ms.init(PARAMS), tx.init(PARAMS)
  _close(state.skip_state, ms_state.skip_state)
  ms_update, update = jax.jit(ms.update), jax.jit(tx.update)
  params = PARAMS
  skipped = 0
  for g in stream:
    ms_u, ms_state = ms_update(g, ms_state, params)
    u, state = update(g, state, params)
    _close(u, ms_u)
    assert int(state.count) == int(ms_state.mini_step)
    assert int(state.step) == int(ms_state.gradient_step)
    assert bool(accum_jax.has_updated(state)) == bool(
        ms.has_updated(ms_state))
    assert (jax.tree.structure(state.skip_state)
            == jax.tree.structure(ms_state.skip_state))
    _close(state.skip_state, ms_state.skip_state)
    _close(state.inner_state, ms_state.inner_opt_state)
    # MultiSteps keeps the running mean (or sum), accumulate the sum.
    scale = max(int(state.count), 1) if c['use_grad_mean'] else 1
    _close(jax.tree.map(lambda a: a / scale, state.acc), ms_state.acc_grads)
    params = optax.apply_updates(params, u)
    skipped += c['fn'] is not None and bool(state.skip_state['should_skip'])
  assert int(state.step) >= 3  # several windows ended
  assert skipped >= (3 if c['fn'] else 0)  # the stream exercised the skips
  assert int(state.skipped_microbatches) == 0  # nonfinite= was not involved


def _loss(params, batch):
  pred = batch['x'] @ params['w'] + params['b']
  return jnp.mean((pred - batch['y']) ** 2)


def _batch(n=16, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  return {'x': jnp.asarray(x),
          'y': jnp.asarray(x @ np.array([1.0, 2.0, -1.0, 0.5], np.float32)
                           + 0.3)}


_stacked_grads = jax.jit(jax.vmap(jax.grad(_loss), (None, 0)))


def _micro_grads(batch, k, params=PARAMS):
  """The gradient of each micro-batch of the strided split, in order."""
  grads = _stacked_grads(params, accum_jax.split_batch(batch, k))
  return [jax.tree.map(lambda g, j=j: g[j], grads) for j in range(k)]


@pytest.mark.parametrize('use_grad_mean', [True, False])
def test_in_step_matches_multisteps(use_grad_mean):
  """One value_and_update step = k MultiSteps calls on the micro-gradients."""
  k = 4
  batch = _batch()
  ms = optax.MultiSteps(_inner(), k, use_grad_mean=use_grad_mean)
  tx = accum_jax.accumulate(_inner(), k, use_grad_mean=use_grad_mean)
  step = jax.jit(accum_jax.value_and_update(_loss, tx))
  ms_update = jax.jit(ms.update)
  params, ms_params = PARAMS, PARAMS
  state, ms_state = tx.init(PARAMS), ms.init(PARAMS)
  for _ in range(3):
    _, u, state = step(params, state, batch)
    for g in _micro_grads(batch, k, ms_params):
      ms_u, ms_state = ms_update(g, ms_state, ms_params)
    _close(u, ms_u)
    assert int(state.step) == int(ms_state.gradient_step)
    assert bool(accum_jax.has_updated(state)) and bool(
        ms.has_updated(ms_state))
    params = optax.apply_updates(params, u)
    ms_params = optax.apply_updates(ms_params, ms_u)
  if not use_grad_mean:  # the sum is k times the full-batch gradient
    tx1 = accum_jax.accumulate(optax.sgd(1.0), k, use_grad_mean=False)
    _, u, _ = accum_jax.value_and_update(_loss, tx1)(PARAMS, tx1.init(PARAMS),
                                                     batch)
    _close(u, jax.tree.map(lambda g: -k * g, jax.grad(_loss)(PARAMS, batch)),
           atol=1e-5)


def test_in_step_predicate_drops_skipped_microbatches():
  """In-step, a skipped micro-batch is dropped from the mean and the loss;
  the window still ends, and skip_state is the last micro-batch's info."""
  k = 4
  batch = _batch()
  x = np.array(batch['x'])
  x[1::k][0, 2] = np.nan  # a NaN in micro-batch 1 (rows 1, 5, 9, ...)
  x[3::k] *= 30  # micro-batch 3 has a large gradient
  batch = {**batch, 'x': jnp.asarray(x)}
  grads = _micro_grads(batch, k)
  norms = [float(optax.tree.norm(g) ** 2) for g in grads]
  limit = 0.5 * (max(norms[0], norms[2]) + norms[3])
  assert np.isnan(norms[1]) and norms[3] > limit > max(norms[0], norms[2])
  fn = functools.partial(optax.skip_large_updates, max_squared_norm=limit)
  for use_grad_mean in (True, False):
    tx = accum_jax.accumulate(optax.adam(0.1), k, should_skip_update_fn=fn,
                              use_grad_mean=use_grad_mean)
    loss, u, state = jax.jit(accum_jax.value_and_update(_loss, tx))(
        PARAMS, tx.init(PARAMS), batch)
    kept = jax.tree.map(lambda a, b: a + b, grads[0], grads[2])
    if use_grad_mean:
      kept = jax.tree.map(lambda a: a / 2, kept)
    ref_u, _ = optax.adam(0.1).update(kept, optax.adam(0.1).init(PARAMS))
    _close(u, ref_u)
    split = accum_jax.split_batch(batch, k)
    ref_loss = np.mean([float(_loss(PARAMS, jax.tree.map(lambda a, j=j: a[j],
                                                         split)))
                        for j in (0, 2)])
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert int(state.step) == 1 and int(state.count) == 0
    assert bool(state.skip_state['should_skip'])  # micro-batch 3's info
    np.testing.assert_allclose(float(state.skip_state['norm_squared']),
                               norms[3], rtol=1e-4)


def test_in_step_predicate_sees_unweighted_gradients():
  """With weight_fn the predicate gets the micro-batch's own gradient (not
  the weight-scaled one the loop could add) and a skipped micro-batch's
  weight leaves the mean."""
  k = 4
  batch = _batch()
  weights = jnp.array([1.0, 3.0, 2.0, 5.0])
  batch = {**batch, 'w': jnp.tile(weights, 4)}  # row r has weights[r % k]

  def fn(updates, step, params):
    del step, params
    sq = optax.tree.norm(updates) ** 2
    return sq > 1e9, {'norm_squared': sq}

  tx = accum_jax.accumulate(optax.sgd(1.0), k, should_skip_update_fn=fn)
  _, u, state = accum_jax.value_and_update(
      _loss, tx, weight_fn=lambda mb: mb['w'][0])(PARAMS, tx.init(PARAMS),
                                                   batch)
  grads = _micro_grads(batch, k)
  seen = float(optax.tree.norm(grads[-1]) ** 2)
  np.testing.assert_allclose(float(state.skip_state['norm_squared']), seen,
                             rtol=1e-5)
  mean = jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights, g))
                      / weights.sum(), *grads)
  _close(u, jax.tree.map(lambda g: -g, mean))


def test_predicate_and_nonfinite_policy_combine():
  """The predicate is asked first; the nonfinite policy screens what it
  keeps (and counts only those)."""

  def large(updates, step, params):
    del step, params
    sq = optax.tree.norm(updates) ** 2
    return sq > 50.0, {'norm_squared': sq}  # NaN > 50 is False: kept

  tx = accum_jax.accumulate(optax.sgd(1.0), 3, nonfinite='skip_microbatch',
                            should_skip_update_fn=large)
  stream = _stream(7, nan_at=(2,), large_at=(1,))
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  outs = []
  for g in stream:
    u, state = update(g, state, PARAMS)
    outs.append(u)
  # Call 1 is skipped (not counted), call 2 dropped by the policy (counted):
  # the first window is calls 0, 2, 3 with the mean over calls 0 and 3.
  ref = jax.tree.map(lambda a, b: -(a + b) / 2, stream[0], stream[3])
  _close(outs[3], ref)
  assert int(state.skipped_microbatches) == 1
  assert int(state.step) == 2  # calls 4, 5, 6 make the second window
  _close(outs[6], jax.tree.map(lambda a, b, c: -(a + b + c) / 3,
                               *stream[4:7]))


def test_has_updated_in_a_chain_and_refusals():
  tx = optax.chain(optax.clip(1.0), accum_jax.accumulate(optax.sgd(0.1), 2))
  state = tx.init(PARAMS)
  flags = []
  for g in _stream(4):
    _, state = tx.update(g, state, PARAMS)
    flags.append(bool(accum_jax.has_updated(state)))
  assert flags == [False, True, False, True]
  with pytest.raises(TypeError, match='holding 0'):
    accum_jax.has_updated(optax.adam(0.1).init(PARAMS))
  with pytest.raises(TypeError, match='use_grad_mean must be a bool'):
    accum_jax.accumulate(optax.sgd(0.1), 2, use_grad_mean='sum')
  with pytest.raises(TypeError, match='should_skip_update_fn must be a'):
    accum_jax.accumulate(optax.sgd(0.1), 2, should_skip_update_fn=True)
  bad = accum_jax.accumulate(
      optax.sgd(0.1), 2, should_skip_update_fn=lambda u, s, p: (0, ()))
  with pytest.raises(ValueError, match='boolean scalar'):
    bad.update(_stream(1)[0], bad.init(PARAMS), PARAMS)
  # A state made without the predicate does not fit a transform with one.
  plain = accum_jax.accumulate(optax.sgd(0.1), 2).init(PARAMS)
  with_fn = accum_jax.accumulate(optax.sgd(0.1), 2,
                                 should_skip_update_fn=optax.skip_not_finite)
  with pytest.raises(ValueError, match='skip_state does not match'):
    with_fn.update(_stream(1)[0], plain, PARAMS)


def test_in_step_predicate_refused_on_a_mesh():
  code = textwrap.dedent('''
      import jax, jax.numpy as jnp, optax
      from jax.sharding import NamedSharding, PartitionSpec as P
      import accum_jax
      from accum_jax import _compat
      mesh = _compat.make_mesh((2,), ('data',))
      loss = lambda w, b: jnp.mean((b @ w) ** 2)
      tx = accum_jax.accumulate(optax.sgd(0.1), 2,
                                should_skip_update_fn=optax.skip_not_finite)
      w = jnp.ones(3)
      with _compat.set_mesh(mesh):
        batch = jax.device_put(jnp.ones((8, 3)), NamedSharding(mesh, P('data')))
        try:
          jax.jit(accum_jax.value_and_update(loss, tx))(w, tx.init(w), batch)
        except ValueError as e:
          print('REFUSED', e)
  ''')
  env = {**os.environ,
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
         'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', code], env=env,
                       capture_output=True, text=True, timeout=300)
  assert 'REFUSED should_skip_update_fn is asked' in out.stdout, out.stderr


# Extra arguments of the inner optimizer, in-step.


def _plateau_inner():
  return optax.chain(
      optax.adam(0.5),
      optax.contrib.reduce_on_plateau(factor=0.5, patience=1, rtol=1e-2,
                                      atol=0.0, cooldown=0))


def test_reduce_on_plateau_in_step_gets_the_batch_loss():
  """value_and_update passes value= the batch's loss: the same steps as the
  inner optimizer driven by hand with the full-batch loss and gradient."""
  k = 4
  batch = _batch()
  tx = accum_jax.accumulate(_plateau_inner(), k)
  step = jax.jit(accum_jax.value_and_update(_loss, tx))
  inner = _plateau_inner()

  @jax.jit
  def ref_step(params, state):
    loss, g = jax.value_and_grad(_loss)(params, batch)
    return (loss,) + inner.update(g, state, params, value=loss)

  params, ref_params = PARAMS, PARAMS
  state, ref_state = tx.init(PARAMS), inner.init(PARAMS)
  for _ in range(9):
    loss, u, state = step(params, state, batch)
    ref_loss, ref_u, ref_state = ref_step(ref_params, ref_state)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    _close(u, ref_u, atol=1e-5)
    params = optax.apply_updates(params, u)
    ref_params = optax.apply_updates(ref_params, ref_u)
  plateau = state.inner_state[1]
  _close(plateau, ref_state[1], atol=1e-5)
  assert float(plateau.scale) < 1.0  # the plateau logic did act


def test_inner_extra_args_override_the_value():
  k = 2
  batch = _batch(8)
  tx = accum_jax.accumulate(_plateau_inner(), k)
  step = jax.jit(accum_jax.value_and_update(_loss, tx))
  inner = _plateau_inner()
  state, ref_state = tx.init(PARAMS), inner.init(PARAMS)
  for _ in range(4):  # a constant value: a plateau after `patience` steps
    _, u, state = step(PARAMS, state, batch,
                       inner_extra_args={'value': jnp.float32(1.0)})
    g = jax.grad(_loss)(PARAMS, batch)
    ref_u, ref_state = inner.update(g, ref_state, PARAMS, value=1.0)
    _close(u, ref_u, atol=1e-5)
  assert float(state.inner_state[1].scale) < 1.0
  with pytest.raises(TypeError, match='inner_extra_args must be a dict'):
    step(PARAMS, state, batch, inner_extra_args=1.0)


def test_value_forwarded_only_when_taken():
  """An inner update with its own keyword arguments gets value= only if it
  names it; with_extra_args_support-wrapped ones get it and drop it."""

  def init(params):
    del params
    return jnp.zeros([], jnp.float32)

  def records(updates, state, params=None, *, value):
    del state, params
    return updates, jnp.asarray(value, jnp.float32)

  def no_value(updates, state, params=None, *, scale=1.0):
    del params
    return jax.tree.map(lambda u: scale * u, updates), state

  batch = _batch(8)
  full = float(_loss(PARAMS, batch))
  tx = accum_jax.accumulate(optax.GradientTransformationExtraArgs(init,
                                                                  records), 4)
  _, _, state = accum_jax.value_and_update(_loss, tx)(PARAMS, tx.init(PARAMS),
                                                      batch)
  np.testing.assert_allclose(float(state.inner_state), full, rtol=1e-6)
  tx = accum_jax.accumulate(optax.GradientTransformationExtraArgs(init,
                                                                  no_value), 4)
  f = accum_jax.value_and_update(_loss, tx)
  _, u, _ = f(PARAMS, tx.init(PARAMS), batch)
  _close(u, jax.grad(_loss)(PARAMS, batch))
  _, u, _ = f(PARAMS, tx.init(PARAMS), batch, inner_extra_args={'scale': 2.0})
  _close(u, jax.tree.map(lambda g: 2 * g, jax.grad(_loss)(PARAMS, batch)))


# optax's own MultiSteps tests (optax/transforms/_accumulation_test.py),
# against accumulate. Not ported: test_ema, test_ema_debias,
# test_skip_not_finite and test_skip_large_updates test optax functions
# that accumulate takes unchanged (used above).


def _dense_loss(params, data):
  return jnp.sum((data @ params['kernel'] + params['bias']) ** 2)


def _dense_params(dtype=jnp.float32):
  key = jax.random.key(0)
  return {'kernel': (0.3 * jax.random.normal(key, (7, 10))).astype(dtype),
          'bias': jnp.zeros(10, dtype)}


def test_optax_multi_steps():
  k_steps = 4
  data = jnp.ones([32, 7])
  params = _dense_params()
  tx = accum_jax.accumulate(
      optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-2),
                  optax.scale(-1e-4)), k_steps)

  @jax.jit
  def train_step(data, opt_state, params):
    grad = jax.grad(_dense_loss)(params, data)
    return tx.update(grad, opt_state, params)

  opt_state = tx.init(params)
  prev_loss = _dense_loss(params, data)
  for idx in range(5 * k_steps):
    updates, opt_state = train_step(data, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_loss = _dense_loss(new_params, data)
    if idx % k_steps < k_steps - 1:
      jax.tree.map(np.testing.assert_array_equal, new_params, params)
      np.testing.assert_equal(new_loss, prev_loss)
      assert not accum_jax.has_updated(opt_state)
    else:
      np.testing.assert_array_less(new_loss, prev_loss)
      prev_loss = new_loss
      assert accum_jax.has_updated(opt_state)
    params = new_params


def test_optax_multi_steps_every_k_schedule():
  tx = accum_jax.accumulate(optax.sgd(1e-4), _SCHEDULE)
  params = {'a': jnp.zeros([])}
  opt_state = tx.init(params)
  grad = {'a': jnp.zeros([])}
  assert not accum_jax.has_updated(opt_state)
  for _ in range(2):
    _, opt_state = tx.update(grad, opt_state, params)
    assert accum_jax.has_updated(opt_state)
  for _ in range(5):
    for _ in range(2):
      _, opt_state = tx.update(grad, opt_state, params)
      assert not accum_jax.has_updated(opt_state)
    _, opt_state = tx.update(grad, opt_state, params)
    assert accum_jax.has_updated(opt_state)


def test_optax_multi_steps_scan_dtype_stability():
  tx = accum_jax.accumulate(optax.sgd(1e-4), 2, accumulator_dtype=jnp.float32)
  params = {'a': jnp.zeros([], dtype=jnp.bfloat16)}

  def train_step(state, _):
    grad = {'a': jnp.ones([], dtype=jnp.bfloat16)}
    updates, opt_state = tx.update(grad, state, params)
    return opt_state, updates

  final_state, _ = jax.lax.scan(train_step, tx.init(params), jnp.arange(4))
  assert final_state.acc['a'].dtype == jnp.float32


def test_optax_multi_steps_zero_nans():
  tx = accum_jax.accumulate(optax.chain(optax.zero_nans(), optax.sgd(1e-4)),
                            2)
  params = {'a': jnp.zeros([])}
  updates, state = tx.update({'a': jnp.zeros([])}, tx.init(params), params)
  assert float(updates['a']) == 0.0 and int(state.count) == 1
  updates, state = tx.update({'a': jnp.array(jnp.nan)}, state, params)
  # zero_nans in the inner chain sees the window's mean once, at its end.
  assert float(updates['a']) == 0.0 and int(state.count) == 0


@pytest.mark.parametrize('use_grad_mean, expected', [(True, 2.5),
                                                     (False, 10.0)])
def test_optax_multi_steps_computes_mean(use_grad_mean, expected):
  tx = accum_jax.accumulate(optax.scale(1.0), 4, use_grad_mean=use_grad_mean)
  params = {'a': jnp.zeros([])}
  opt_state = tx.init(params)
  grads = [{'a': jnp.ones([]) * i} for i in [1, 2, 3, 4]]
  assert not accum_jax.has_updated(opt_state)
  for grad in grads[:-1]:
    _, opt_state = tx.update(grad, opt_state, params)
    assert not accum_jax.has_updated(opt_state)
  new_params, opt_state = tx.update(grads[-1], opt_state, params)
  assert accum_jax.has_updated(opt_state)
  np.testing.assert_array_equal(new_params['a'], expected)


def test_optax_multi_steps_skip_not_finite():
  tx = accum_jax.accumulate(optax.sgd(1.0), 2,
                            should_skip_update_fn=optax.skip_not_finite)
  opt_update = jax.jit(tx.update)
  params = {'a': jnp.zeros([])}
  opt_state = jax.jit(tx.init)(params)
  # good updates
  updates, opt_state = opt_update({'a': jnp.ones([])}, opt_state, params)
  assert int(opt_state.count) == 1
  params = optax.apply_updates(params, updates)
  updates, opt_state = opt_update({'a': jnp.ones([])}, opt_state, params)
  assert int(opt_state.count) == 0
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params['a'], -1.0)
  # inf, then NaN: no increase of the count, no change of the params
  for bad in (float('inf'), float('nan')):
    updates, opt_state = opt_update({'a': jnp.array(bad)}, opt_state, params)
    assert int(opt_state.count) == 0
    assert bool(opt_state.skip_state['should_skip'])
    assert int(opt_state.skip_state['num_not_finite']) == 1
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params['a'], -1.0)
  # final good updates
  updates, opt_state = opt_update({'a': jnp.ones([])}, opt_state, params)
  assert int(opt_state.count) == 1
  params = optax.apply_updates(params, updates)
  updates, opt_state = opt_update({'a': jnp.ones([])}, opt_state, params)
  assert int(opt_state.count) == 0
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params['a'], -2.0)


def test_optax_multi_steps_mixed_precision():
  # optax runs it for mu_dtype None and float32, with the steps run; the
  # dtype rules are the same for both, and the steps are traced abstractly
  # here (jax.eval_shape): only dtypes are checked, and every compile of the
  # nine dtype pairs would cost seconds.
  k_steps = 2
  opt = optax.adam(0.1)
  tx = accum_jax.accumulate(opt, k_steps)

  def dtypes(tree):
    return jax.tree.map(lambda x: x.dtype, tree)

  for upd_dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
    for param_dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
      params = _dense_params(param_dtype)
      x = jnp.ones([32, 7], param_dtype)
      opt_state, acc_state = opt.init(params), tx.init(params)
      for _ in range(k_steps + 1):
        grad = jax.eval_shape(
            lambda p: jax.tree.map(lambda g: g.astype(upd_dtype),
                                   jax.grad(_dense_loss)(p, x)), params)
        updates, opt_state = jax.eval_shape(opt.update, grad, opt_state,
                                            params)
        acc_updates, acc_state = jax.eval_shape(tx.update, grad, acc_state,
                                                params)
        assert dtypes(acc_updates) == dtypes(updates), (upd_dtype,
                                                         param_dtype)
        new_params = jax.eval_shape(optax.apply_updates, params, acc_updates)
        assert dtypes(new_params) == dtypes(params)
        params = new_params


def test_docs_examples_run():
  """The code blocks of docs/multisteps.md run, in order, as written."""
  path = os.path.join(os.path.dirname(__file__), '..', 'docs', 'multisteps.md')
  with open(path) as f:
    text = f.read()
  blocks = [b.split('```', 1)[0] for b in text.split('```python\n')[1:]]
  assert len(blocks) >= 4
  namespace = {}
  for block in blocks:
    exec(compile(block, path, 'exec'), namespace)  # noqa: S102
